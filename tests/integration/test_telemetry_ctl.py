"""``ztunnel-py ctl`` against the real admin server and the real config_dump encoding."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml

from ztunnel_py import cli
from ztunnel_py.state.codec import snapshot_to_json
from ztunnel_py.state.model import (
    Action,
    AuthorizationPolicy,
    Endpoint,
    FrozenMap,
    MtlsMode,
    PeerAuthentication,
    Rule,
    Service,
    ServicePort,
    Source,
    WaypointRef,
    Workload,
)
from ztunnel_py.state.snapshot import Snapshot
from ztunnel_py.telemetry.accesslog import connection_json
from ztunnel_py.telemetry.admin import AdminServer
from ztunnel_py.telemetry.connection import ConnectionResult, Peer
from ztunnel_py.telemetry.metrics import Metrics

SNAPSHOT = Snapshot(
    version="12",
    workloads=(
        Workload("foo/httpbin-1", "httpbin-1", "foo", "httpbin", "node-b", ("10.0.2.9",),
                 labels=FrozenMap({"app": "httpbin"}), enrolled=True,
                 waypoint=WaypointRef("waypoint", "foo")),
        Workload("bar/sleep-1", "sleep-1", "bar", "sleep", "node-a", ("10.0.1.5",)),
    ),
    services=(
        Service("httpbin", "foo", "httpbin.foo.svc.cluster.local", ("10.96.0.10",),
                (ServicePort(80, 8000),),
                endpoints=(Endpoint("foo/httpbin-1", "10.0.2.9", FrozenMap({80: 8000})),)),
    ),
    authorization_policies=(
        AuthorizationPolicy("allow-bar", "foo",
                            rules=(Rule(sources=(Source(namespaces=("bar",)),)),)),
        AuthorizationPolicy("deny-all", "istio-system", Action.DENY, rules=(Rule(),)),
    ),
    peer_authentications=(
        PeerAuthentication("httpbin", "foo", FrozenMap({"app": "httpbin"}), MtlsMode.STRICT,
                           FrozenMap({8080: MtlsMode.PERMISSIVE})),
    ),
)


@pytest.fixture
async def admin() -> AsyncIterator[tuple[AdminServer, Metrics]]:
    metrics = Metrics()
    server = AdminServer("127.0.0.1", 0)
    await server.start()
    server.route("/config_dump", lambda: snapshot_to_json(SNAPSHOT))
    server.route("/certs", lambda: [{
        "identity": "spiffe://cluster.local/ns/foo/sa/httpbin", "serial": "abc",
        "not_before": "2026-01-01T00:00:00+00:00", "not_after": "2099-01-01T00:00:00+00:00",
        "rotate_in_s": 42.0,
    }])
    server.route("/connections",
                 lambda: [connection_json(r) for r in metrics.connections.snapshot()])
    metrics.attach()
    try:
        yield server, metrics
    finally:
        metrics.detach()
        await server.close()


async def ctl(*argv: str) -> tuple[int, str]:
    """Run the (blocking) CLI in a thread while the admin server runs on this loop."""
    out = io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out):
            return cli.main(["ctl", *argv])

    rc = await asyncio.wait_for(asyncio.to_thread(run), 20)
    return rc, out.getvalue()


async def test_config_views_from_the_real_encoding(admin: tuple[AdminServer, Metrics]) -> None:
    server, _ = admin
    address = f"127.0.0.1:{server.port}"
    rc, out = await ctl("--admin", address, "workloads")
    assert rc == 0
    lines = [line.split() for line in out.splitlines()]
    assert lines[1] == ["bar", "sleep-1", "10.0.1.5", "node-a", "None", "TCP"]
    assert lines[2] == ["foo", "httpbin-1", "10.0.2.9", "node-b", "foo/waypoint", "HBONE"]

    rc, out = await ctl("--admin", address, "policies")
    rows = {tuple(line.split()[:2]): line.split()[2:5] for line in out.splitlines()[1:]}
    assert rows[("foo", "allow-bar")] == ["AuthorizationPolicy", "ALLOW", "Namespace"]
    assert rows[("istio-system", "deny-all")] == ["AuthorizationPolicy", "DENY", "Global"]
    assert rows[("foo", "httpbin")] == ["PeerAuthentication", "STRICT", "(8080:PERMISSIVE)"]

    rc, out = await ctl("--admin", address, "services", "-o", "json")
    assert rc == 0
    (svc,) = json.loads(out)
    assert svc["hostname"] == "httpbin.foo.svc.cluster.local"

    rc, out = await ctl("--admin", address, "config-dump")
    assert rc == 0
    assert json.loads(out)["version"] == "12"

    rc, out = await ctl("--admin", address, "policies", "-o", "yaml")
    view: dict[str, Any] = yaml.safe_load(out)
    assert [p["name"] for p in view["authorization_policies"]] == ["allow-bar", "deny-all"]


async def test_live_connections_and_certs(admin: tuple[AdminServer, Metrics]) -> None:
    server, _ = admin
    address = f"127.0.0.1:{server.port}"
    live = ConnectionResult("inbound", src=Peer("10.0.1.5:40000", principal="spiffe://a"),
                            dst=Peer("10.0.2.9:8000"), security="mutual_tls")
    live.open()
    live.bytes_sent = 99
    done = ConnectionResult("inbound", src=Peer("10.0.1.6:1"), dst=Peer("10.0.2.9:8000"))
    done.open()
    done.close()
    try:
        rc, out = await ctl("--admin", address, "connections", "-o", "json")
        assert rc == 0
        (conn,) = json.loads(out)  # only the open one
        assert conn["src"]["address"] == "10.0.1.5:40000" and conn["bytes_sent"] == 99
        rc, out = await ctl("--admin", address, "connections")
        assert "10.0.1.5:40000" in out and "mutual_tls" in out
    finally:
        live.close()
    rc, out = await ctl("--admin", address, "certs")
    assert rc == 0
    assert out.splitlines()[1].split()[:3] == [
        "spiffe://cluster.local/ns/foo/sa/httpbin", "Active", "true"
    ]
