"""Issue 7 through real agents: L4 policy at the destination's agent, telemetry, ``ctl``.

    node1: allowed (front), meter (front), denied (other), outsider (legacy, not ambient)
    node2: server (back)     Service server.back 10.96.0.20: 80 -> 8080 (http), 9000 (tcp echo)

Every pod runs the HTTP service on :8080 and an "echo twice" TCP server on
:9000. Each test removes the policies it applied and waits until the
destination's agent has dropped them, so the shared mesh is back to "no
policy" for the next one.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import require_root
from tests.netns.mesh_fixtures import (
    ECHO_PORT,
    HTTP_PORT,
    Mesh,
    authorization_policy,
    eventually,
    peer_authentication,
    principal,
    running_mesh,
    world_of,
)
from ztunnel_py.demo.configdir import ObjectRef
from ztunnel_py.demo.mesh import ztunnel
from ztunnel_py.demo.world import DemoPod, DemoService, ServicePortDef

SERVICE_VIP = "10.96.0.20"
SERVICE_HOST = "server.back.svc.cluster.local"


POLICY_WORLD = world_of(
    {"front": True, "other": True, "back": True, "legacy": False},
    [
        DemoPod("allowed", "front", "node1", "allowed", "v1", "allowed"),
        DemoPod("meter", "front", "node1", "meter", "v1", "meter"),
        DemoPod("denied", "other", "node1", "denied", "v1", "denied"),
        DemoPod("outsider", "legacy", "node1", "outsider", "v1", "outsider"),
        DemoPod("server", "back", "node2", "server", "v2", "server"),
    ],
    [DemoService("server", "back", SERVICE_VIP, {"app": "server"},
                 (ServicePortDef("http", 80, HTTP_PORT),
                  ServicePortDef("tcp-echo", ECHO_PORT, ECHO_PORT)))],
)


@pytest.fixture(scope="module")
def mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Mesh]:
    require_root()
    with running_mesh(request.node.nodeid, POLICY_WORLD,
                      tmp_path_factory.mktemp("mesh-policy")) as m:
        yield m


class Applied:
    """Policies applied by one test; removed (and seen gone on the destination) at its end."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.refs: list[ObjectRef] = []

    def __call__(self, obj: dict[str, Any]) -> None:
        ref = self.mesh.apply(obj)
        if ref not in self.refs:
            self.refs.append(ref)
        self.mesh.wait_policy("node2", ref.name)

    def remove_all(self) -> None:
        for ref in self.refs:
            self.mesh.delete(ref)
        for ref in self.refs:
            self.mesh.wait_policy("node2", ref.name, present=False)


@pytest.fixture
def apply(mesh: Mesh) -> Iterator[Applied]:
    applied = Applied(mesh)
    yield applied
    applied.remove_all()


def test_namespace_allow_policy_admits_one_namespace_and_resets_the_other(
        mesh: Mesh, apply: Applied) -> None:
    apply(authorization_policy("allow-front", "back", "server", "ALLOW",
                               {"namespaces": ["front"]}))
    src_log, dst_log = mesh.access_log("node1"), mesh.access_log("node2")

    mark_a, mark_b = src_log.mark(), dst_log.mark()
    ok = mesh.curl("allowed", mesh.vip_url("server"))
    assert ok.returncode == 0 and ok.status == 200, ok.stderr
    [line] = dst_log.wait_for(mark_b, lambda x: x.get("src.workload") == "allowed", 1)
    assert line["direction"] == "inbound" and line["result"] == "ok"
    assert line["src.identity"] == principal("front", "allowed")
    assert line["dst.workload"] == "server" and line["security"] == "mutual_tls"
    [line] = src_log.wait_for(mark_a, lambda x: x.get("src.workload") == "allowed", 1)
    assert line["direction"] == "outbound" and line["result"] == "ok"

    mark_a, mark_b = src_log.mark(), dst_log.mark()
    refused = mesh.curl("denied", mesh.vip_url("server"))
    assert refused.returncode == 56, refused  # curl: (56) Recv failure: Connection reset
    assert "reset" in refused.stderr
    assert refused.status is None
    # The destination's agent decided, and says why, once.
    [line] = dst_log.wait_for(mark_b, lambda x: x.get("src.workload") == "denied", 1)
    assert line["direction"] == "inbound"
    assert line["response_flags"] == "DENY"
    assert line["src.identity"] == principal("other", "denied")
    assert "denied" in line["error"] and "allow-front" in line["error"]
    # The source's agent got the tunnel refused (401) and reset its client, once.
    [line] = src_log.wait_for(mark_a, lambda x: x.get("src.workload") == "denied", 1)
    assert line["direction"] == "outbound"
    assert line["result"] != "ok" and "401" in line["error"], line


def test_strict_peer_authentication_refuses_plaintext_and_permissive_accepts_it(
        mesh: Mesh, apply: Applied) -> None:
    dst_log = mesh.access_log("node2")
    assert mesh.curl("outsider", mesh.pod_url("server")).status == 200  # default: PERMISSIVE

    apply(peer_authentication("strict", "back", "STRICT"))
    mark = dst_log.mark()
    refused = mesh.curl("outsider", mesh.pod_url("server"))
    assert refused.returncode != 0 and refused.status is None, refused
    [line] = dst_log.wait_for(mark, lambda x: x.get("src.addr", "").startswith(
        mesh.pod("outsider").ip), 1)
    assert line["result"] != "ok" and line["security"] != "mutual_tls"
    # The mesh's own clients still get through (mTLS).
    assert mesh.curl("allowed", mesh.pod_url("server")).status == 200

    apply(peer_authentication("strict", "back", "PERMISSIVE"))  # same object, new mode
    eventually(lambda: mesh.curl("outsider", mesh.pod_url("server"), max_time=1).status == 200,
               3, "plaintext accepted again under PERMISSIVE")


def test_deny_policy_closes_an_open_connection_within_2s(mesh: Mesh, apply: Applied) -> None:
    held = mesh.hold("allowed", mesh.vip("server", ECHO_PORT))
    try:
        held.wait_open()
        assert held.closed_at(0.5) is None  # it stays open by itself
        applied_at = time.monotonic()
        apply(authorization_policy("deny-front", "back", "server", "DENY",
                                   {"namespaces": ["front"]}))
        closed = held.closed_at(5.0)
        assert closed is not None, "the denied connection stayed open"
        print(f"figure: held connection closed {closed - applied_at:.2f}s after the DENY")
        assert closed - applied_at < 2.0, f"closed {closed - applied_at:.2f}s after the policy"
        # ...and new connections are denied too.
        assert mesh.curl("allowed", mesh.vip_url("server")).status is None
    finally:
        held.stop()


def tcp_samples(text: str, family: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != family:
            continue
        for s in fam.samples:
            if s.name == family + "_total":
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def meter_series(text: str, reporter: str) -> dict[str, tuple[dict[str, str], float]]:
    """Per TCP family, the one series of ``meter``'s connections seen by ``reporter``."""
    out = {}
    for family in ("istio_tcp_connections_opened", "istio_tcp_connections_closed",
                   "istio_tcp_received_bytes", "istio_tcp_sent_bytes"):
        rows = [(dict(k), v) for k, v in tcp_samples(text, family).items()
                if dict(k)["source_workload"] == "meter" and dict(k)["reporter"] == reporter]
        assert len(rows) == 1, f"{family} reporter={reporter}: {rows}"
        out[family] = rows[0]
    return out


def test_metrics_count_exactly_n_connections_and_their_bytes_on_both_agents(
        mesh: Mesh) -> None:
    n, request_bytes = 3, 1000
    for _ in range(n):
        echoed = mesh.send("meter", mesh.vip("server", ECHO_PORT), request_bytes)
        assert echoed == 2 * request_bytes
    expected_labels = {
        "source_workload": "meter",
        "source_workload_namespace": "front",
        "source_principal": principal("front", "meter"),
        "source_app": "meter",
        "source_version": "v1",
        "destination_workload": "server",
        "destination_workload_namespace": "back",
        "destination_principal": principal("back", "server"),
        "destination_app": "server",
        "destination_version": "v2",
        "destination_service": SERVICE_HOST,
        "destination_service_name": "server",
        "destination_service_namespace": "back",
        "request_protocol": "tcp",
        "response_flags": "-",
        "connection_security_policy": "mutual_tls",
    }
    for node, reporter in (("node1", "source"), ("node2", "destination")):
        series: dict[str, tuple[dict[str, str], float]] = {}

        def all_closed(node: str = node, reporter: str = reporter,
                       series: dict[str, tuple[dict[str, str], float]] = series) -> bool:
            try:
                series.update(meter_series(mesh.metrics_text(node), reporter))
            except AssertionError:
                return False
            return series["istio_tcp_connections_closed"][1] >= n

        eventually(all_closed, 5, f"{n} closed connections on {reporter}")
        labels, _ = series["istio_tcp_connections_opened"]
        assert {k: labels[k] for k in expected_labels} == expected_labels
        assert series["istio_tcp_connections_opened"][1] == n
        assert series["istio_tcp_connections_closed"][1] == n
        # request bytes: towards the server; response bytes: the echo (twice as many)
        assert series["istio_tcp_received_bytes"][1] == n * request_bytes
        assert series["istio_tcp_sent_bytes"][1] == n * 2 * request_bytes


def ctl(mesh: Mesh, node: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(mesh.topo.argv_in(node, ztunnel("ctl", *args, "-o", "json")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_ctl_commands_give_valid_json_with_the_agents_view(mesh: Mesh, apply: Applied) -> None:
    apply(authorization_policy("allow-front-ctl", "back", "server", "ALLOW",
                               {"namespaces": ["front"]}))
    held = mesh.hold("allowed", mesh.vip("server", ECHO_PORT))
    try:
        held.wait_open()
        resources = ("workloads", "services", "policies", "certs", "connections",
                     "config-dump")
        procs = {r: ctl(mesh, "node2", r) for r in resources}
        out: dict[str, Any] = {}
        for r, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=30)
            assert proc.returncode == 0, f"ctl {r}: {stderr}"
            assert "PRIVATE KEY" not in stdout
            out[r] = json.loads(stdout)
    finally:
        held.stop()

    server = mesh.pod("server")
    workloads = {w["name"]: w for w in out["workloads"]}
    assert set(workloads) >= {"allowed", "meter", "denied", "outsider", "server"}
    assert workloads["server"]["ips"] == [server.ip] and workloads["server"]["enrolled"]
    assert not workloads["outsider"].get("enrolled", False)
    [svc] = [s for s in out["services"] if s["name"] == "server"]
    assert SERVICE_VIP in json.dumps(svc) and server.ip in json.dumps(svc)
    names = [p["name"] for p in out["policies"]["authorization_policies"]]
    assert names == ["allow-front-ctl"]
    assert principal("back", "server") in {c["identity"] for c in out["certs"]}
    conns = out["connections"]
    assert any(c["src"]["workload"] == "allowed" and c["dst"]["workload"] == "server"
               for c in conns), conns
    dump = out["config-dump"]
    assert dump["version"] and dump["workload"] and dump["authorization_policy"]
    assert {w["name"] for w in dump["workload"]} == set(workloads)
    assert {"ips", "name", "namespace"} <= set(workloads["server"])
    assert HTTP_PORT in workloads["server"]["named_ports"].values()
