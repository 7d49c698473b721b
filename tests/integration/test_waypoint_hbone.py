"""The waypoint as a mesh destination, end to end on loopback with real TLS:

client (HBONE, its own SPIFFE identity) -> waypoint :15008 (its own identity)
-> HBONE to the endpoint's pod address :15008 (the real node agent's inbound)
-> the backend pod.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import pytest
from cryptography import x509

from tests.integration.test_waypoint_http import Backend
from waypoint.http1 import H1Client
from waypoint.mesh import HboneConnector, HboneListener, serves
from waypoint.pipe import StreamPipe
from waypoint.proxy import WaypointProxy
from waypoint.request import Request
from waypoint.telemetry import WaypointMetrics
from waypoint.upstream import Upstreams
from ztunnel_py.config import HBONE_PORT, HboneConfig
from ztunnel_py.hbone.aio import TunnelRefused
from ztunnel_py.hbone.core import forwarded_for
from ztunnel_py.identity.certs import WorkloadCertificate
from ztunnel_py.identity.testing import InMemoryCA
from ztunnel_py.identity.tls import client_context
from ztunnel_py.proxy.pool import ConnectionPool, PoolError, PoolKey
from ztunnel_py.proxy.testing import CaCertificates, LoopbackMesh, loopback_prefix
from ztunnel_py.state import routing as r
from ztunnel_py.state.model import (
    Action,
    AuthorizationPolicy,
    Endpoint,
    FrozenMap,
    Operation,
    PolicyTargetRef,
    Rule,
    Service,
    ServicePort,
    Source,
    WaypointRef,
    Workload,
)
from ztunnel_py.state.snapshot import Snapshot

NS = "bookinfo"
WAYPOINT = WaypointRef("waypoint", NS)
VIP = "10.96.0.10"
TD = "cluster.local"


def _w(name: str, ip: str, node: str, labels: dict[str, str], *, sa: str = "",
       enrolled: bool = True, waypoint: bool = False) -> Workload:
    # every workload but the waypoint itself uses it (istio.io/use-waypoint on the namespace)
    return Workload(uid=f"{NS}/{name}", name=name, namespace=NS, service_account=sa or name,
                    node=node, ips=(ip,), labels=FrozenMap(labels), enrolled=enrolled,
                    is_waypoint=waypoint, waypoint=None if waypoint else WAYPOINT)


@dataclass
class World:
    prefix: str
    mesh: LoopbackMesh
    backends: dict[str, Backend]
    waypoint: Workload
    client: Workload
    proxy: WaypointProxy
    listener: HboneListener
    pool: ConnectionPool
    certs: CaCertificates
    metrics: WaypointMetrics
    base: Snapshot

    def apply(self, *routing: object, policies: tuple[AuthorizationPolicy, ...] = ()) -> None:
        from dataclasses import replace

        self.mesh.store.swap(replace(self.base, routing=tuple(routing),
                                     authorization_policies=policies))

    async def stream(self, authority: str = f"{VIP}:9080",
                     identity: str | None = None) -> StreamPipe:
        key = PoolKey(identity or self.client.identity, self.waypoint.identity,
                      (self.waypoint.ips[0], HBONE_PORT))
        leg = await asyncio.wait_for(self.pool.open_stream(
            key, authority, forwarded=forwarded_for(self.client.ips[0])), 5)
        return StreamPipe(leg)

    async def get(self, path: str = "/", headers: tuple[tuple[str, str], ...] = (),
                  method: str = "GET", authority: str = f"{VIP}:9080",
                  ) -> tuple[int, dict[str, str], bytes]:
        client = H1Client(await self.stream(authority))
        try:
            resp = await asyncio.wait_for(
                client.request(Request(method, path, "reviews:9080", headers), b""), 5)
        finally:
            client.close()
        return resp.status, dict(resp.headers), resp.body


@pytest.fixture
async def world() -> AsyncIterator[World]:
    prefix = loopback_prefix()
    client = _w("productpage-v1", f"{prefix}10", "node-1", {"app": "productpage"}, sa="front")
    v1 = _w("reviews-v1", f"{prefix}11", "node-2", {"app": "reviews", "version": "v1"})
    v2 = _w("reviews-v2", f"{prefix}12", "node-2", {"app": "reviews", "version": "v2"})
    # The agents do not listen for the waypoint's pod: the waypoint itself does.
    wp = _w("waypoint", f"{prefix}20", "node-1", {}, enrolled=False, waypoint=True)
    ca = InMemoryCA()
    mesh = LoopbackMesh([client, v1, v2, wp], ["node-1", "node-2"], prefix, ca=ca)
    await mesh.start()
    backends: dict[str, Backend] = {}
    port = 0
    for w in (v1, v2):
        b = Backend(w.name)
        await b.start(w.ips[0], port)
        port = b.port  # the same target port on every pod address
        backends[w.name] = b
    svc = Service("reviews", NS, f"reviews.{NS}.svc.cluster.local", (VIP,),
                  (ServicePort(9080, port, "http"),),
                  tuple(Endpoint(w.uid, w.ips[0], FrozenMap({9080: port})) for w in (v1, v2)),
                  waypoint=WAYPOINT)
    base = Snapshot(version="2", workloads=(client, v1, v2, wp), services=(svc,))
    mesh.store.swap(base)
    certs = CaCertificates(ca)
    metrics = WaypointMetrics()
    config = HboneConfig()
    out_pool = ConnectionPool(config, certs, TD)
    proxy = WaypointProxy(mesh.store, NS, "waypoint",
                          Upstreams(HboneConnector(out_pool, wp.identity)),
                          metrics=metrics, rng=random.Random(3),
                          own_workloads=frozenset({wp.uid}))
    listener = HboneListener(proxy, certs, wp.identity, TD, host=wp.ips[0], port=HBONE_PORT)
    await listener.start()
    client_pool = ConnectionPool(config, certs, TD)
    w = World(prefix, mesh, backends, wp, client, proxy, listener, client_pool, certs, metrics,
              base)
    try:
        yield w
    finally:
        client_pool.close()
        await listener.stop()
        await proxy.close()
        out_pool.close()
        await mesh.stop()
        for b in backends.values():
            await b.stop()


async def test_request_through_the_waypoint_over_hbone(world: World) -> None:
    statuses = [await world.get(f"/r{i}") for i in range(4)]
    assert {s for s, _, _ in statuses} == {200}
    seen = [s for b in world.backends.values() for s in b.seen]
    assert sorted(s.path for s in seen) == ["/r0", "/r1", "/r2", "/r3"]
    # The waypoint saw the client's verified identity and reports it.
    assert world.metrics.count(
        source_principal=world.client.identity, reporter="waypoint",
        destination_principal=f"spiffe://{TD}/ns/{NS}/sa/reviews-v1") + world.metrics.count(
        source_principal=world.client.identity,
        destination_principal=f"spiffe://{TD}/ns/{NS}/sa/reviews-v2") == 4
    assert world.metrics.count(source_workload="productpage-v1",
                               connection_security_policy="mutual_tls") == 4


async def test_header_routing_and_l7_policy_by_principal(world: World) -> None:
    subsets = r.DestinationRule("reviews", NS, host="reviews", subsets=(
        r.Subset("v1", FrozenMap({"version": "v1"})), r.Subset("v2", FrozenMap({"version": "v2"}))))
    vs = r.VirtualService("reviews", NS, hosts=("reviews",), http=(
        r.HTTPRoute(match=(r.HTTPMatchRequest(headers=FrozenMap(
            {"end-user": r.StringMatch(exact="jason")})),),
            route=(r.HTTPRouteDestination(r.Destination("reviews", "v2")),)),
        r.HTTPRoute(route=(r.HTTPRouteDestination(r.Destination("reviews", "v1")),)),
    ))
    deny = AuthorizationPolicy(
        "no-admin", NS, Action.DENY,
        target_refs=(PolicyTargetRef("Gateway", "waypoint", "gateway.networking.k8s.io"),),
        rules=(Rule(sources=(Source(principals=(f"{TD}/ns/{NS}/sa/front",)),),
                    operations=(Operation(methods=("DELETE",), paths=("/admin*",)),)),))
    world.apply(vs, subsets, policies=(deny,))
    _, h, _ = await world.get(headers=(("end-user", "jason"),))
    assert h["x-served-by"] == "reviews-v2"
    _, h, _ = await world.get()
    assert h["x-served-by"] == "reviews-v1"
    status, _, body = await world.get("/admin/x", method="DELETE")
    assert (status, body) == (403, b"RBAC: access denied")
    status, _, _ = await world.get("/admin/x", method="GET")
    assert status == 200


async def test_connect_to_an_address_the_waypoint_does_not_serve_is_refused(
        world: World) -> None:
    with pytest.raises(TunnelRefused) as err:
        await world.stream("192.0.2.1:80")
    assert err.value.status == 400
    assert world.listener.refused == 1
    assert serves(world.base, f"{world.waypoint.ips[0]}:15008", NS, "waypoint") is not None
    assert serves(world.base, f"{VIP}:9080", NS, "waypoint") is None
    # Only what uses this waypoint: not another namespace's waypoint's service, nor a
    # workload that uses none.
    assert "does not use the waypoint other/waypoint" in (
        serves(world.base, f"{VIP}:9080", "other", "waypoint") or "")
    unbound = replace(world.base, workloads=tuple(
        replace(w, waypoint=None) for w in world.base.workloads))
    assert "workload bookinfo/reviews-v1 does not use" in (
        serves(unbound, f"{world.prefix}11:8080", NS, "waypoint") or "")


async def test_client_from_another_trust_domain_is_refused(world: World) -> None:
    foreign = ConnectionPool(HboneConfig(), CaCertificates(InMemoryCA(trust_domain="evil.org")),
                             TD)
    try:
        key = PoolKey(f"spiffe://evil.org/ns/{NS}/sa/x", world.waypoint.identity,
                      (world.waypoint.ips[0], HBONE_PORT))
        with pytest.raises((PoolError, TunnelRefused, ConnectionError, OSError)):
            await asyncio.wait_for(foreign.open_stream(key, f"{VIP}:9080"), 5)
    finally:
        foreign.close()
    assert not any(b.seen for b in world.backends.values())


async def test_waypoint_never_routes_to_itself(world: World) -> None:
    from dataclasses import replace

    svc = world.base.services[0]
    wp = world.waypoint
    looped = replace(svc, endpoints=(Endpoint(wp.uid, wp.ips[0], FrozenMap({9080: 15008})),))
    world.mesh.store.swap(replace(world.base, services=(looped,)))
    status, _, body = await world.get()
    assert status == 503 and body == b"no healthy upstream"


async def test_a_pod_addressed_directly_gets_the_request_whatever_the_routes(
        world: World) -> None:
    vs = r.VirtualService("reviews", NS, hosts=("reviews",), http=(
        r.HTTPRoute(route=(r.HTTPRouteDestination(r.Destination("reviews", "v2")),)),))
    subsets = r.DestinationRule("reviews", NS, host="reviews", subsets=(
        r.Subset("v2", FrozenMap({"version": "v2"})),))
    world.apply(vs, subsets)
    v1 = world.backends["reviews-v1"]
    port = world.base.services[0].endpoints[0].ports[9080]
    for _ in range(3):
        _, h, _ = await world.get(authority=f"{world.prefix}11:{port}")
        assert h["x-served-by"] == "reviews-v1"
    _, h, _ = await world.get()
    assert h["x-served-by"] == "reviews-v2"  # by the service: the route applies
    assert len(v1.seen) == 3
    assert world.metrics.count(destination_workload="reviews-v1",
                               destination_service="unknown") == 3


class Rotating:
    """A certificate source that issues a new certificate when told to."""

    def __init__(self, ca: InMemoryCA) -> None:
        self.ca = ca
        self.certs: dict[str, WorkloadCertificate] = {}

    def rotate(self, identity: str) -> None:
        self.certs.pop(identity, None)

    async def fetch(self, identity: str) -> WorkloadCertificate:
        if identity not in self.certs:
            self.certs[identity] = self.ca.issue(identity)
        return self.certs[identity]


async def _server_serial(address: tuple[str, int], client_cert: WorkloadCertificate) -> int:
    ctx = client_context(client_cert)
    _reader, writer = await asyncio.wait_for(
        asyncio.open_connection(*address, ssl=ctx, server_hostname=""), 5)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        writer.transport.abort()


async def test_a_rotated_waypoint_certificate_is_served_to_new_connections(
        world: World) -> None:
    ca = world.mesh.ca
    certs = Rotating(ca)
    wp = world.waypoint
    listener = HboneListener(world.proxy, certs, wp.identity, TD, host=wp.ips[0], port=0,
                             refresh_s=0.0)
    address = await listener.start()
    client_cert = ca.issue(world.client.identity)
    try:
        first = await _server_serial(address, client_cert)
        assert await _server_serial(address, client_cert) == first
        certs.rotate(wp.identity)
        listener.refresh_soon()
        await asyncio.sleep(0.05)
        second = await _server_serial(address, client_cert)
        assert second != first
    finally:
        await listener.stop()
