"""Issue 6 through real agents: eBPF capture seen from the wire and from the pods.

Two nodes, a controller on node1, an agent (``--capture ebpf``) per node,
real ``curl`` in the pods. Namespace ``mesh`` is ambient; ``plain`` is not;
``late`` starts outside the mesh and is labelled by a test.

    node1: client (mesh), tls-client (mesh), local (mesh), plain (plain), late (late)
    node2: server (mesh)            Service server.mesh  10.96.0.10:80 -> 8080

The shared mesh serves every test but the one that kills an agent, which
builds its own.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import require_root
from tests.netns.mesh_fixtures import (
    HTTP_PORT,
    Mesh,
    authorization_policy,
    eventually,
    first_success,
    namespace_object,
    read_pcap,
    running_mesh,
    tcp_streams,
    tls_records,
    world_of,
)
from ztunnel_py.config import HBONE_PORT
from ztunnel_py.demo import wire
from ztunnel_py.demo.world import DemoPod, DemoService, ServicePortDef

SERVICE_VIP = "10.96.0.10"

CAPTURE_WORLD = world_of(
    {"mesh": True, "plain": False, "late": False},
    [
        DemoPod("client", "mesh", "node1", "client", "v1", "client"),
        DemoPod("tls-client", "mesh", "node1", "tls-client", "v1", "tls-client"),
        DemoPod("local", "mesh", "node1", "local", "v1", "local"),
        DemoPod("plain", "plain", "node1", "plain", "v1", "plain"),
        DemoPod("late", "late", "node1", "late", "v1", "late"),
        DemoPod("server", "mesh", "node2", "server", "v1", "server"),
    ],
    [DemoService("server", "mesh", SERVICE_VIP, {"app": "server"},
                 (ServicePortDef("http", 80, HTTP_PORT),))],
)


KILL_WORLD = world_of(
    {"mesh": True},
    [DemoPod("client", "mesh", "node1", "client", "v1", "client"),
     DemoPod("server", "mesh", "node2", "server", "v1", "server")],
    [DemoService("server", "mesh", SERVICE_VIP, {"app": "server"},
                 (ServicePortDef("http", 80, HTTP_PORT),))],
)


@pytest.fixture(scope="module")
def mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Mesh]:
    require_root()
    with running_mesh(request.node.nodeid, CAPTURE_WORLD,
                      tmp_path_factory.mktemp("mesh-capture")) as m:
        yield m


@pytest.fixture
def own_mesh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Mesh]:
    require_root()
    with running_mesh(request.node.nodeid, KILL_WORLD, tmp_path) as m:
        yield m


def marker() -> str:
    return "marker-" + secrets.token_hex(6)


def test_cross_node_request_to_a_vip_crosses_the_underlay_only_as_tls_on_15008(
        mesh: Mesh) -> None:
    # tls-client talks to nobody else: its HBONE connection is new, so the capture
    # holds its whole TLS stream from the SYN on.
    m = marker()
    with wire.capture(mesh.topo) as cap:
        got = mesh.curl("tls-client", mesh.vip_url("server"), marker=m)
    assert got.returncode == 0, got.stderr
    assert got.status == 200
    assert got.header("x-served-by") == "server/v1"
    assert m in got.stdout  # /headers echoed the marker: the request did carry it

    assert not cap.saw(m), "the marker crossed the underlay in plaintext"
    assert cap.ports == {HBONE_PORT}, cap.packets_by_port
    segments = read_pcap(cap.raw)
    hbone = {k: v for k, v in tcp_streams(segments).items() if HBONE_PORT in (k[0][1], k[1][1])}
    assert hbone, "no HBONE connection opened during the request"
    for (src, dst), stream in hbone.items():
        records = tls_records(stream)  # raises if any byte is not inside a TLS record
        assert records, f"{src} -> {dst}: no payload"
        assert records[0][0] == 0x16, f"{src} -> {dst}: does not start with a handshake"
        assert 0x17 in {r[0] for r in records}, f"{src} -> {dst}: no application data"
        assert all(r[1] == 0x0303 for r in records[1:])
        print(f"figure: {src} -> {dst}: {len(records)} TLS records, {len(stream)} bytes")


def test_pod_outside_the_ambient_namespace_is_not_captured(mesh: Mesh) -> None:
    assert "bpf" in mesh.tc_filters("node1", mesh.pod("client").host_veth)  # the contrast
    assert mesh.tc_filters("node1", mesh.pod("plain").host_veth).strip() == ""

    m = marker()
    with wire.capture(mesh.topo) as cap:
        got = mesh.curl("plain", mesh.pod_url("server"), marker=m)
    assert got.returncode == 0, got.stderr
    assert cap.saw(m), "an unenrolled pod's request should cross in plaintext"
    assert HTTP_PORT in cap.ports


def vip_works(mesh: Mesh, pod: str) -> bool:
    # Nothing but the agent answers a Service VIP (there is no kube-proxy here).
    return mesh.curl(pod, mesh.vip_url("server"), max_time=1).returncode == 0


def test_labelling_a_namespace_captures_within_2s_and_unlabelling_releases_within_2s(
        mesh: Mesh) -> None:
    veth = mesh.pod("late").host_veth
    assert not vip_works(mesh, "late")
    assert mesh.tc_filters("node1", veth).strip() == ""

    labelled = time.monotonic()
    mesh.apply(namespace_object("late", ambient=True))
    try:
        took = first_success(lambda: vip_works(mesh, "late"), 5, "late captured")
        print(f"figure: the first connection begun {took:.2f}s after labelling the namespace "
              f"was captured (it completed {time.monotonic() - labelled:.2f}s after)")
        assert took < 2.0, f"captured {took:.2f}s after labelling"
        assert "bpf" in mesh.tc_filters("node1", veth)
    finally:
        mesh.apply(namespace_object("late", ambient=False))
    took = first_success(lambda: mesh.tc_filters("node1", veth).strip() == ""
                         and not vip_works(mesh, "late"), 5, "late released")
    print(f"figure: released {took:.2f}s after removing the label")
    assert took < 2.0, f"released {took:.2f}s after removing the label"
    m = marker()
    with wire.capture(mesh.topo) as cap:
        got = mesh.curl("late", mesh.pod_url("server"), marker=m)
    assert got.returncode == 0, got.stderr
    assert cap.saw(m), "released: the pod's traffic is its own again (plaintext)"


def test_same_node_call_goes_through_the_mesh_and_the_destinations_policy_applies(
        mesh: Mesh) -> None:
    log = mesh.access_log("node1")
    mark = log.mark()
    got = mesh.curl("client", mesh.pod_url("local"))
    assert got.returncode == 0, got.stderr
    assert got.header("x-served-by") == "local/v1"
    lines = log.wait_for(mark, lambda x: x.get("dst.workload") == "local", 1)
    assert len(lines) == 1 and lines[0]["src.workload"] == "client"
    assert lines[0]["result"] == "ok"

    policy = authorization_policy("deny-client", "mesh", "local", "DENY",
                                  {"principals": ["cluster.local/ns/mesh/sa/client"]})
    ref = mesh.apply(policy)
    try:
        mesh.wait_policy("node1", "deny-client")
        mark = log.mark()
        denied = mesh.curl("client", mesh.pod_url("local"))
        assert denied.returncode != 0 and denied.status is None, denied.stdout
        lines = log.wait_for(mark, lambda x: x.get("dst.workload") == "local", 1)
        assert len(lines) == 1
        assert lines[0]["response_flags"] == "DENY"
        assert "deny-client" in lines[0]["error"]
        # The policy is the destination's: another source still gets through.
        assert mesh.curl("tls-client", mesh.pod_url("local")).status == 200
    finally:
        mesh.delete(ref)
        mesh.wait_policy("node1", "deny-client", present=False)


def test_no_iptables_or_nftables_rules_in_any_node(mesh: Mesh) -> None:
    assert vip_works(mesh, "client")  # capture is active while we look
    for node in mesh.world.nodes:
        nft = mesh.topo.run(node, ["nft", "list", "ruleset"], timeout=10)
        assert nft.returncode == 0, nft.stderr
        assert nft.stdout.strip() == "", f"{node}: nftables rules:\n{nft.stdout}"
        ipt = mesh.topo.run(node, ["iptables-save"], timeout=10)
        assert ipt.returncode == 0, ipt.stderr
        rules = [line for line in ipt.stdout.splitlines() if line and not line.startswith("#")]
        assert rules == [], f"{node}: iptables rules:\n{ipt.stdout}"


def test_agent_rss_with_capture_active(mesh: Mesh) -> None:
    assert vip_works(mesh, "client")
    for node in mesh.world.nodes:
        rss_mib = mesh.agent_rss_kib(node) / 1024
        print(f"figure: agent on {node}: RSS {rss_mib:.1f} MiB with capture active")
        # A guard against gross regressions (bcc compiled in the agent itself, a leak),
        # not a benchmark: the compile runs in a short-lived child.
        assert rss_mib < 256


def test_killed_agent_fails_closed_and_a_restart_resumes_within_5s(own_mesh: Mesh) -> None:
    mesh = own_mesh
    veth = mesh.pod("client").host_veth
    assert mesh.curl("client", mesh.pod_url("server")).status == 200
    assert "bpf" in mesh.tc_filters("node1", veth)

    mesh.kill_agent("node1")
    assert "bpf" in mesh.tc_filters("node1", veth), "enrolled pod lost its capture"
    m = marker()
    with wire.capture(mesh.topo) as cap:
        got = mesh.curl("client", mesh.pod_url("server"), marker=m, max_time=2)
    assert got.returncode != 0, "a connection succeeded with the agent dead"
    assert not cap.saw(m), "plaintext left the node while the agent was down"
    assert HTTP_PORT not in cap.ports, cap.packets_by_port
    assert "bpf" in mesh.tc_filters("node1", veth)

    mesh.start_agent("node1")
    # Completed requests (not attempts begun): a SYN retransmitted into the new agent's
    # listener must not make a slow restart look fast.
    took = eventually(lambda: mesh.curl("client", mesh.pod_url("server"),
                                        max_time=1).status == 200,
                      10, "requests through the restarted agent", period=0.05)
    print(f"figure: requests work again {took:.2f}s after the agent's restart")
    assert took <= 5.0, f"connections worked again only {took:.1f}s after the restart"
    assert "bpf" in mesh.tc_filters("node1", veth)
    m = marker()
    with wire.capture(mesh.topo) as cap:
        got = mesh.curl("client", mesh.pod_url("server"), marker=m)
    assert got.status == 200
    assert not cap.saw(m) and HTTP_PORT not in cap.ports
    # The pinned counters outlived the agent: the new one reports what was dropped meanwhile.
    drops = {s.labels["reason"]: s.value
             for fam in text_string_to_metric_families(mesh.metrics_text("node1"))
             if fam.name == "ztunnel_capture_packets" for s in fam.samples}
    assert sum(v for r, v in drops.items() if r.startswith("drop")) > 0, drops
