"""Acceptance through real agents, on loopback (the network-namespace tier with eBPF
capture comes later): a client pod's connection to a service VIP is captured by its
node agent (``LoopbackMesh``: outbound :15001 with an original-destination table),
which sees ``istio.io/use-waypoint`` and tunnels it over HBONE to the waypoint; the
waypoint routes and tunnels to the chosen endpoint's node agent (inbound :15008),
which delivers to the pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import h11
import pytest

from tests.integration.test_waypoint_http import Backend
from waypoint.mesh import HboneConnector, HboneListener
from waypoint.proxy import WaypointProxy
from waypoint.telemetry import WaypointMetrics
from waypoint.upstream import Upstreams
from ztunnel_py.config import HBONE_PORT, HboneConfig
from ztunnel_py.proxy.pool import ConnectionPool
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
    WaypointRef,
    Workload,
)
from ztunnel_py.state.snapshot import Snapshot

NS = "bookinfo"
VIP = "10.96.0.10"
TD = "cluster.local"


def _w(name: str, ip: str, node: str, labels: dict[str, str], *, enrolled: bool = True,
       waypoint: bool = False) -> Workload:
    return Workload(uid=f"{NS}/{name}", name=name, namespace=NS, service_account=name,
                    node=node, ips=(ip,), labels=FrozenMap(labels), enrolled=enrolled,
                    is_waypoint=waypoint)


@dataclass
class World:
    mesh: LoopbackMesh
    client: Workload
    backends: dict[str, Backend]
    metrics: WaypointMetrics
    base: Snapshot

    def apply(self, *routing: object, policies: tuple[AuthorizationPolicy, ...] = ()) -> None:
        self.mesh.store.swap(replace(self.base, version=str(random.random()),
                                     routing=tuple(routing), authorization_policies=policies))

    async def requests(self, n: int, path: str = "/", method: str = "GET",
                       headers: tuple[tuple[str, str], ...] = ()) -> list[tuple[int, str]]:
        """``n`` keep-alive requests on one connection from the client pod to the VIP."""
        reader, writer = await self.mesh.connect(self.client.ips[0], (VIP, 9080))
        conn = h11.Connection(h11.CLIENT)
        out: list[tuple[int, str]] = []
        try:
            for _ in range(n):
                writer.write(conn.send(h11.Request(method=method, target=path, headers=[
                    ("host", "reviews:9080"), ("content-length", "0"), *headers]))
                    + conn.send(h11.EndOfMessage()))
                status, served = 0, ""
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        data = await asyncio.wait_for(reader.read(65536), 10)
                        conn.receive_data(data)
                        continue
                    if isinstance(ev, h11.Response):
                        status = ev.status_code
                        served = dict(ev.headers).get(b"x-served-by", b"").decode()
                    elif isinstance(ev, h11.EndOfMessage | h11.ConnectionClosed):
                        break
                out.append((status, served))
                conn.start_next_cycle()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        return out


@pytest.fixture
async def world() -> AsyncIterator[World]:
    async with _world(HboneConfig()) as w:
        yield w


@contextlib.asynccontextmanager
async def _world(config: HboneConfig) -> AsyncIterator[World]:
    """The agents (``config``), the waypoint and the backends of this module's tests."""
    prefix = loopback_prefix()
    client = _w("productpage-v1", f"{prefix}10", "node-1", {"app": "productpage"})
    v1 = _w("reviews-v1", f"{prefix}11", "node-2", {"app": "reviews", "version": "v1"})
    v2 = _w("reviews-v2", f"{prefix}12", "node-2", {"app": "reviews", "version": "v2"})
    # The waypoint's pod: the agents do not listen for it, the waypoint does.
    wp = _w("waypoint", f"{prefix}20", "node-1",
            {"gateway.networking.k8s.io/gateway-name": "waypoint"}, enrolled=False,
            waypoint=True)
    mesh = LoopbackMesh([client, v1, v2, wp], ["node-1", "node-2"], prefix, config)
    await mesh.start()
    backends: dict[str, Backend] = {}
    port = 0
    for w in (v1, v2):
        b = Backend(w.name)
        await b.start(w.ips[0], port)
        port = b.port
        backends[w.name] = b
    svc = Service("reviews", NS, f"reviews.{NS}.svc.cluster.local", (VIP,),
                  (ServicePort(9080, port, "http"),),
                  tuple(Endpoint(w.uid, w.ips[0], FrozenMap({9080: port})) for w in (v1, v2)),
                  waypoint=WaypointRef("waypoint", NS))
    base = Snapshot(version="2", workloads=(client, v1, v2, wp), services=(svc,))
    mesh.store.swap(base)
    certs = CaCertificates(mesh.ca)
    pool = ConnectionPool(HboneConfig(), certs, TD)
    metrics = WaypointMetrics()
    proxy = WaypointProxy(mesh.store, NS, "waypoint", Upstreams(HboneConnector(pool, wp.identity)),
                          metrics=metrics, rng=random.Random(5))
    listener = HboneListener(proxy, certs, wp.identity, TD, host=wp.ips[0], port=HBONE_PORT)
    await listener.start()
    try:
        yield World(mesh, client, backends, metrics, base)
    finally:
        await listener.stop()
        await proxy.close()
        pool.close()
        await mesh.stop()
        for b in backends.values():
            await b.stop()


SUBSETS = r.DestinationRule("reviews", NS, host="reviews", subsets=(
    r.Subset("v1", FrozenMap({"version": "v1"})), r.Subset("v2", FrozenMap({"version": "v2"}))))


def _to(subset: str, weight: int | None = None) -> r.HTTPRouteDestination:
    return r.HTTPRouteDestination(r.Destination("reviews", subset), weight)


async def test_weighted_split_through_agents_and_waypoint(world: World) -> None:
    world.apply(r.VirtualService("reviews", NS, hosts=("reviews",), http=(
        r.HTTPRoute(route=(_to("v1", 90), _to("v2", 10))),)), SUBSETS)
    replies = await asyncio.wait_for(world.requests(2000), 120)
    served = Counter(s for _, s in replies)
    assert {st for st, _ in replies} == {200}
    assert abs(served["reviews-v1"] / 2000 - 0.90) <= 0.03, served
    # The waypoint saw the client pod's own identity (the agent tunnels as the pod).
    assert world.metrics.count(source_principal=world.client.identity,
                               source_workload="productpage-v1") == 2000


async def test_header_match_and_l7_deny_through_agents(world: World) -> None:
    jason = r.HTTPMatchRequest(headers=FrozenMap({"end-user": r.StringMatch(exact="jason")}))
    deny = AuthorizationPolicy(
        "no-admin-delete", NS, Action.DENY,
        target_refs=(PolicyTargetRef("Gateway", "waypoint", "gateway.networking.k8s.io"),),
        rules=(Rule(operations=(Operation(methods=("DELETE",), paths=("/admin*",)),)),))
    world.apply(r.VirtualService("reviews", NS, hosts=("reviews",), http=(
        r.HTTPRoute(match=(jason,), route=(_to("v2"),)), r.HTTPRoute(route=(_to("v1"),)))),
        SUBSETS, policies=(deny,))
    assert {s for _, s in await world.requests(5, headers=(("end-user", "jason"),))} == \
        {"reviews-v2"}
    assert {s for _, s in await world.requests(5)} == {"reviews-v1"}
    assert await world.requests(1, "/admin/x", "DELETE") == [(403, "")]
    assert await world.requests(1, "/admin/x", "GET") == [(200, "reviews-v1")]


async def test_retries_and_mirroring_through_agents(world: World) -> None:
    v1, v2 = world.backends["reviews-v1"], world.backends["reviews-v2"]
    v1.behaviour = lambda n, m, p: ((503 if n % 2 else 200), 0.0)  # fails every other
    v2.behaviour = lambda n, m, p: (200, 0.5)  # a slow mirror
    world.apply(r.VirtualService("reviews", NS, hosts=("reviews",), http=(
        r.HTTPRoute(route=(_to("v1", 100),), retries=r.HTTPRetry(attempts=3),
                    mirror=r.Destination("reviews", "v2"),
                    mirror_percentage=r.Percent(100.0)),)), SUBSETS)
    loop = asyncio.get_running_loop()
    started = loop.time()
    replies = await world.requests(10)
    elapsed = loop.time() - started
    assert replies == [(200, "reviews-v1")] * 10  # every request succeeds, from v1 only
    assert len(v1.seen) == 20  # each one took a retry
    assert elapsed < 5.0  # ten 0.5 s mirrors did not hold the client up (a bound, not a benchmark)
    for _ in range(100):
        if len(v2.seen) == 10:
            break
        await asyncio.sleep(0.05)
    assert len(v2.seen) == 10
    assert {s.headers["host"] for s in v2.seen} == {"reviews-shadow:9080"}


async def test_a_big_answer_to_a_closing_request_reaches_a_slow_client_in_full(
        world: World) -> None:
    """``connection: close``: the waypoint answers in full and closes while the client has
    not half-closed, so it ends its stream with END_STREAM and RST_STREAM NO_ERROR (RFC
    9113 section 8.1). The client's agent must still deliver the whole answer, then the
    FIN, to a client that reads late: the answer sits in the agent's buffers when the
    RST_STREAM comes (it used to reset the client: a truncated answer, then ECONNRESET)."""
    world.apply(r.VirtualService("reviews", NS, hosts=("reviews",), http=(
        r.HTTPRoute(route=(_to("v1"),)),)), SUBSETS)
    size = 8 << 20
    world.backends["reviews-v1"].body_size = size
    reader, writer = await world.mesh.connect(world.client.ips[0], (VIP, 9080))
    try:
        writer.write(b"GET /big HTTP/1.1\r\nhost: reviews:9080\r\nconnection: close\r\n\r\n")
        await asyncio.sleep(1.0)  # not reading: the answer backs up in the agents
        got = bytearray()
        async with asyncio.timeout(30):
            while data := await reader.read(1 << 20):
                got += data
        head, _, body = bytes(got).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert len(body) == size and body.startswith(b"reviews-v1 GET /big")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_a_client_that_goes_on_sending_after_a_complete_answer_is_closed_in_time(
) -> None:
    """After a complete answer ended with RST_STREAM NO_ERROR the client's agent reads and
    drops what the client still sends (so that unread bytes cannot turn its close into a
    reset of the answer), for ``linger_s`` at most: then it closes the connection, which
    a client that neither stops nor closes would otherwise keep open for good."""
    async with _world(HboneConfig(linger_s=0.5)) as world:
        world.apply(r.VirtualService("reviews", NS, hosts=("reviews",), http=(
            r.HTTPRoute(route=(_to("v1"),)),)), SUBSETS)
        relays = world.mesh.agents["node-1"].proxy.outbound.relays
        reader, writer = await world.mesh.connect(world.client.ips[0], (VIP, 9080))
        try:
            writer.write(b"GET / HTTP/1.1\r\nhost: reviews:9080\r\nconnection: close\r\n\r\n")
            got = bytearray()
            async with asyncio.timeout(10):
                while data := await reader.read(1 << 16):
                    got += data
            assert got.startswith(b"HTTP/1.1 200") and b"reviews-v1" in got
            assert len(relays) == 1  # answered, and the FIN came; the client did not close
            writer.write(b"x" * 100_000)  # more of a request nobody reads: dropped
            await writer.drain()
            loop = asyncio.get_running_loop()
            started = loop.time()
            for _ in range(200):
                if not relays:
                    break
                await asyncio.sleep(0.05)
            assert not relays and loop.time() - started < 2.0
            with pytest.raises(ConnectionError):  # the agent's end is closed
                for _ in range(20):
                    writer.write(b"y" * 10_000)
                    await writer.drain()
                    await asyncio.sleep(0.05)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
