"""``ztunnel-py ctl`` against a fake admin server on loopback."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import yaml

from ztunnel_py import cli
from ztunnel_py.ctl import cert_rows, policy_scope, render

CONFIG_DUMP: dict[str, Any] = {
    "version": "7",
    "root_namespace": "istio-system",
    "workloads": [
        {"uid": "foo/httpbin-1", "name": "httpbin-1", "namespace": "foo",
         "service_account": "httpbin", "node": "node-b", "ips": ["10.0.2.9"],
         "labels": {"app": "httpbin"}, "enrolled": True,
         "waypoint": {"name": "waypoint", "namespace": "foo"}},
        {"uid": "bar/sleep-1", "name": "sleep-1", "namespace": "bar", "service_account": "sleep",
         "node": "node-a", "ips": ["10.0.1.5"], "labels": {}, "enrolled": False,
         "waypoint": None},
    ],
    "services": [
        {"name": "httpbin", "namespace": "foo", "hostname": "httpbin.foo.svc.cluster.local",
         "vips": ["10.96.0.10"], "ports": [{"port": 80, "target_port": 8000}],
         "endpoints": [{"workload_uid": "foo/httpbin-1", "address": "10.0.2.9", "ready": True},
                       {"workload_uid": "foo/httpbin-2", "address": "10.0.2.10",
                        "ready": False}]},
    ],
    "authorization_policies": [
        {"name": "allow-bar", "namespace": "foo", "action": "ALLOW", "selector": None,
         "target_refs": [], "rules": [{"sources": [{"namespaces": ["bar"]}]}]},
        {"name": "deny-all", "namespace": "istio-system", "action": "DENY", "selector": None,
         "target_refs": [], "rules": []},
    ],
    "peer_authentications": [
        {"name": "default", "namespace": "istio-system", "selector": None, "mode": "STRICT",
         "port_level": {}},
        {"name": "httpbin", "namespace": "foo", "selector": {"app": "httpbin"},
         "mode": "STRICT", "port_level": {"8080": "PERMISSIVE"}},
    ],
}
CERTS = [
    {"identity": "spiffe://cluster.local/ns/foo/sa/httpbin", "serial": "1f2e",
     "not_before": "2026-01-01T00:00:00Z", "not_after": "2099-01-01T00:00:00Z",
     "rotate_in_s": 3600.0},
    {"identity": "spiffe://cluster.local/ns/bar/sa/old", "serial": "0a",
     "not_before": 1_000_000_000, "not_after": 1_000_086_400, "rotate_in_s": 0.0},
]
CONNECTIONS = [
    {"direction": "inbound", "src": {"address": "10.0.1.5:40000", "namespace": "bar",
                                     "principal": "spiffe://cluster.local/ns/bar/sa/sleep"},
     "dst": {"address": "10.0.2.9:8000", "namespace": "foo", "principal": ""},
     "security": "mutual_tls", "bytes_sent": 12, "bytes_received": 34, "duration_s": 1.5},
]


class FakeAdmin:
    """An admin port on loopback serving canned JSON; counts requests per path."""

    def __init__(self, routes: dict[str, Any]) -> None:
        self.routes = routes
        self.hits: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.hits.append(self.path)
                if self.path not in fake.routes:
                    self.send_error(404)
                    return
                body = json.dumps(fake.routes[self.path]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeAdmin:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def agent() -> Iterator[FakeAdmin]:
    with FakeAdmin({"/config_dump": CONFIG_DUMP, "/certs": CERTS,
                    "/connections": CONNECTIONS}) as fake:
        yield fake


@pytest.fixture
def controller() -> Iterator[FakeAdmin]:
    with FakeAdmin({"/config_dump": CONFIG_DUMP}) as fake:
        yield fake


def ctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(["ctl", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize(
    ("resource", "path"),
    [("workloads", "/config_dump"), ("services", "/config_dump"), ("policies", "/config_dump"),
     ("certs", "/certs"), ("connections", "/connections"), ("config-dump", "/config_dump")],
)
def test_every_resource_json_yaml_table(
    agent: FakeAdmin, capsys: pytest.CaptureFixture[str], resource: str, path: str
) -> None:
    rc, out, err = ctl(capsys, "--admin", agent.address, resource, "-o", "json")
    assert rc == 0, err
    as_json = json.loads(out)
    rc, out, _ = ctl(capsys, "--admin", agent.address, resource, "-o", "yaml")
    assert rc == 0
    assert yaml.safe_load(out) == as_json
    rc, out, _ = ctl(capsys, resource, "--admin", agent.address, "-o", "table")  # option after
    assert rc == 0
    assert out.splitlines()[0].split()[0].isupper()  # a table header
    assert agent.hits == [path] * 3


def test_workloads_table(agent: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = ctl(capsys, "--admin", agent.address, "workloads")
    assert rc == 0
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["NAMESPACE", "POD", "NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"]
    assert rows[1] == ["bar", "sleep-1", "10.0.1.5", "node-a", "None", "TCP"]
    assert rows[2] == ["foo", "httpbin-1", "10.0.2.9", "node-b", "foo/waypoint", "HBONE"]


def test_namespace_filter(agent: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = ctl(capsys, "--admin", agent.address, "workloads", "-n", "foo", "-o", "json")
    assert rc == 0
    assert [w["name"] for w in json.loads(out)] == ["httpbin-1"]


def test_services_table_counts_ready_endpoints(
    agent: FakeAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = ctl(capsys, "--admin", agent.address, "services")
    assert out.splitlines()[1].split() == ["foo", "httpbin", "10.96.0.10", "80", "None", "1/2"]


def test_policies_view(agent: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = ctl(capsys, "--admin", agent.address, "policies", "-o", "json")
    view = json.loads(out)
    assert [p["name"] for p in view["authorization_policies"]] == ["allow-bar", "deny-all"]
    _, out, _ = ctl(capsys, "--admin", agent.address, "policies")
    rows = {tuple(line.split()[:2]): line.split() for line in out.splitlines()[1:]}
    assert rows[("istio-system", "deny-all")][2:5] == ["AuthorizationPolicy", "DENY", "Global"]
    assert rows[("foo", "allow-bar")][2:5] == ["AuthorizationPolicy", "ALLOW", "Namespace"]
    assert rows[("foo", "httpbin")][2:5] == ["PeerAuthentication", "STRICT", "(8080:PERMISSIVE)"]


def test_policy_scope() -> None:
    assert policy_scope({"namespace": "x", "selector": {"a": "b"}}, "istio-system") == (
        "WorkloadSelector"
    )
    assert policy_scope({"namespace": "x", "target_refs": [{"kind": "Service"}]}, "r") == (
        "Waypoint"
    )


def test_cert_status() -> None:
    _, rows = cert_rows(CERTS)
    by_id = {r[0]: r for r in rows}
    assert by_id["spiffe://cluster.local/ns/foo/sa/httpbin"][1:3] == ("Active", "true")
    old = by_id["spiffe://cluster.local/ns/bar/sa/old"]
    assert old[1:3] == ("Expired", "false")
    assert old[4] == "2001-09-10T01:46:40Z"


def test_controller_admin(controller: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = ctl(capsys, "--controller-admin", controller.address, "services", "-o", "json")
    assert rc == 0 and json.loads(out)[0]["name"] == "httpbin"
    rc, _, err = ctl(capsys, "--controller-admin", controller.address, "certs")
    assert rc == 2 and "only served by an agent" in err


def test_missing_endpoint_says_why(
    controller: FakeAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = ctl(capsys, "--admin", controller.address, "connections")
    assert rc == 1
    assert "has no /connections endpoint" in err


def test_unreachable_admin(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        rc, out, err = ctl(capsys, "--admin", f"127.0.0.1:{port}", "--timeout", "2", "workloads")
    assert rc == 1 and out == ""
    assert "cannot reach the admin port" in err and "running on this node" in err


def test_not_json(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeAdmin({"/config_dump": "plain"}) as fake:
        rc, _, err = ctl(capsys, "--admin", fake.address, "workloads")
    assert rc == 1 and "expected a JSON object" in err


def test_render_accepts_objects_keyed_by_id() -> None:
    dump = {**CONFIG_DUMP, "workloads": {w["uid"]: w for w in CONFIG_DUMP["workloads"]}}
    rows = json.loads(render("workloads", dump, "json"))
    assert [w["name"] for w in rows] == ["sleep-1", "httpbin-1"]
