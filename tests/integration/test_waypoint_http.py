"""The waypoint in-process on loopback: plain upstream HTTP servers behind it, real
HTTP/1.1 clients in front, routing config through the real translator.

Each test reads like a topology script: start backends for the pods, apply the
Istio YAML, send requests, look at what the backends saw and at the metrics.
Times are scaled down where the semantics survive (one real 3 s timeout case).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest
import yaml

from waypoint.cluster import EndpointRef
from waypoint.proxy import WaypointProxy
from waypoint.server import PlainListener
from waypoint.telemetry import WaypointMetrics
from waypoint.upstream import TcpConnector, Upstreams
from ztunnel_py.controller.translate import KubeObject, translate
from ztunnel_py.state.snapshot import StateStore

NS = "bookinfo"

# -- upstream test servers ---------------------------------------------------------------

Behaviour = Callable[[int, str, str], tuple[int, float]]  # (n, method, path) -> (status, delay)


def ok(_n: int, _m: str, _p: str) -> tuple[int, float]:
    return 200, 0.0


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Backend:
    """A tiny HTTP/1.1 server (h11 over asyncio streams) that names itself in each answer."""

    pod: str
    behaviour: Behaviour = ok
    seen: list[Seen] = field(default_factory=list)
    server: asyncio.Server | None = None
    port: int = 0
    connections: int = 0
    active: int = 0
    max_active: int = 0
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    # Answer this many requests per connection, then drop the connection when the next
    # request arrives (a keep-alive timeout racing with reuse); 0: no limit.
    per_connection: int = 0
    body_size: int = 0  # pad each answer's body to this many bytes

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = await asyncio.start_server(self._conn, host, port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.add(writer)
        me = asyncio.current_task()
        assert me is not None
        self.tasks.add(me)
        conn = h11.Connection(h11.SERVER)
        answered = 0
        try:
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    data = await reader.read(65536)
                    conn.receive_data(data)
                    if not data and conn.their_state is not h11.DONE:
                        return
                    continue
                if isinstance(ev, h11.Request):
                    req, body = ev, b""
                elif isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    if self.per_connection and answered >= self.per_connection:
                        return  # dropped without an answer
                    answered += 1
                    await self._answer(conn, writer, req, body)
                    if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
                elif isinstance(ev, h11.ConnectionClosed | type(h11.PAUSED)):
                    return
        except (ConnectionError, h11.RemoteProtocolError):
            return
        except asyncio.CancelledError:
            return  # stop(): the test is over
        finally:
            self.tasks.discard(me)
            self.writers.discard(writer)
            writer.transport.abort()

    async def _answer(self, conn: h11.Connection, writer: asyncio.StreamWriter,
                      req: h11.Request, body: bytes) -> None:
        headers = {k.decode(): v.decode() for k, v in req.headers}
        self.seen.append(Seen(req.method.decode(), req.target.decode(), headers, body,
                              time.monotonic()))
        n = len(self.seen)
        status, delay = self.behaviour(n, req.method.decode(), req.target.decode())
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if delay:
                await asyncio.sleep(delay)
        finally:
            self.active -= 1
        out = f"{self.pod} {req.method.decode()} {req.target.decode()}".encode()
        out += b"." * (self.body_size - len(out))
        head = conn.send(h11.Response(status_code=status, headers=[
            ("content-length", str(len(out))), ("x-served-by", self.pod),
            ("server", "backend")]))
        body = conn.send(h11.Data(data=out)) if req.method != b"HEAD" else b""
        writer.write(head + body + conn.send(h11.EndOfMessage()))
        await writer.drain()


# -- the world -------------------------------------------------------------------------------


def pod(name: str, ip: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {"nodeName": "node1", "serviceAccountName": labels.get("app", name)},
            "status": {"podIP": ip}}


def service(name: str, vip: str, port: int = 9080, app: str | None = None,
            port_name: str = "http") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS},
            "spec": {"selector": {"app": app or name}, "clusterIP": vip,
                     "ports": [{"name": port_name, "port": port, "targetPort": 8080}]}}


SUBSETS = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""


class Mesh:
    """Backends for pods reviews-v1 and reviews-v2 (and more on request), the waypoint on a
    plaintext loopback listener, and a config store to apply YAML to."""

    def __init__(self) -> None:
        self.backends: dict[str, Backend] = {}
        self.ips: dict[str, str] = {}
        self.ports: dict[str, int] = {}
        self.objects: list[dict[str, Any]] = []
        self.store = StateStore()
        self.metrics = WaypointMetrics()
        self.connector = TcpConnector(self._resolve)
        self.proxy: WaypointProxy | None = None
        self.listener: PlainListener | None = None
        self.address: tuple[str, int] = ("", 0)
        self._ip = itertools.count(1)

    def _resolve(self, ep: EndpointRef) -> tuple[str, int]:
        for name, ip in self.ips.items():
            if ip == ep.address:
                if name in self.ports:
                    return "127.0.0.1", self.ports[name]
                return "127.0.0.1", self.backends[name].port
        return "127.0.0.1", 1  # nothing listens: connection refused

    def external(self, name: str, labels: dict[str, str], port: int) -> None:
        """A pod served by a server the test runs itself on 127.0.0.1:``port``."""
        ip = f"10.1.0.{next(self._ip)}"
        self.ips[name] = ip
        self.ports[name] = port
        self.objects.append(pod(name, ip, labels))

    async def add(self, name: str, labels: dict[str, str], behaviour: Behaviour = ok) -> Backend:
        b = Backend(name, behaviour)
        await b.start()
        self.backends[name] = b
        ip = f"10.1.0.{next(self._ip)}"
        self.ips[name] = ip
        self.objects.append(pod(name, ip, labels))
        return b

    def apply(self, text: str = "", *extra: dict[str, Any]) -> None:
        docs = [d for d in yaml.safe_load_all(text) if d] + list(extra)
        objs = [KubeObject(f"o#{i}", b) for i, b in enumerate(self.objects + docs)]
        t = translate(objs, trust_domain="cluster.local", root_namespace="istio-system")
        assert not t.errors, [str(p) for p in t.errors]
        self.store.swap(t.snapshot)

    async def start(self, seed: int = 1) -> None:
        import random

        self.objects += [service("reviews", "10.96.0.10"), service("ratings", "10.96.0.11")]
        self.apply()
        self.proxy = WaypointProxy(self.store, NS, "waypoint", Upstreams(self.connector),
                                   metrics=self.metrics, rng=random.Random(seed))
        self.listener = PlainListener(self.proxy)
        self.address = await self.listener.start()

    async def stop(self) -> None:
        if self.listener is not None:
            await self.listener.stop()
        if self.proxy is not None:
            await self.proxy.close()
        for b in self.backends.values():
            await b.stop()


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    m = Mesh()
    await m.add("reviews-v1", {"app": "reviews", "version": "v1"})
    await m.add("reviews-v2", {"app": "reviews", "version": "v2"})
    try:
        yield m
    finally:
        await m.stop()


# -- a keep-alive HTTP/1.1 client ------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class Client:
    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.conn = h11.Connection(h11.CLIENT)

    async def request(self, path: str = "/", *, method: str = "GET", host: str = "reviews:9080",
                      headers: dict[str, str] | None = None, body: bytes = b"") -> Reply:
        if self.writer is None or self.conn.our_state is not h11.IDLE:
            await self.close()
            self.conn = h11.Connection(h11.CLIENT)
            self.reader, self.writer = await asyncio.open_connection(*self.address)
        assert self.reader is not None and self.writer is not None
        hdrs = [("host", host), ("content-length", str(len(body)))]
        hdrs += list((headers or {}).items())
        self.writer.write(self.conn.send(h11.Request(method=method, target=path, headers=hdrs))
                          + (self.conn.send(h11.Data(data=body)) if body else b"")
                          + self.conn.send(h11.EndOfMessage()))
        status, rh, rb = 0, {}, b""
        while True:
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA:
                self.conn.receive_data(await self.reader.read(65536))
                continue
            if isinstance(ev, h11.Response):
                status = ev.status_code
                rh = {k.decode(): v.decode() for k, v in ev.headers}
            elif isinstance(ev, h11.Data):
                rb += ev.data
            elif isinstance(ev, h11.EndOfMessage | h11.ConnectionClosed):
                break
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return Reply(status, rh, rb)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError):
                await self.writer.wait_closed()
            self.writer = None


async def many(mesh: Mesh, n: int, clients: int = 8, **kwargs: Any) -> list[Reply]:
    """``n`` requests over ``clients`` keep-alive connections."""
    out: list[Reply] = []
    counter = itertools.count()

    async def worker() -> None:
        c = Client(mesh.address)
        try:
            while next(counter) < n:
                out.append(await c.request(**kwargs))
        finally:
            await c.close()

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(clients))), 60)
    return out


# -- acceptance behaviours -------------------------------------------------------------------


async def test_default_route_keep_alive_and_headers(mesh: Mesh) -> None:
    await mesh.start()
    c = Client(mesh.address)
    try:
        replies = [await c.request("/p?x=1", headers={"traceparent":
                   "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}) for _ in range(5)]
    finally:
        await c.close()
    assert {r.status for r in replies} == {200}
    assert {r.headers["x-served-by"] for r in replies} <= {"reviews-v1", "reviews-v2"}
    seen = [s for b in mesh.backends.values() for s in b.seen]
    assert len(seen) == 5 and seen[0].path == "/p?x=1"
    # W3C trace context: same trace, a new span for this hop.
    tp = seen[0].headers["traceparent"].split("-")
    assert tp[1] == "0af7651916cd43dd8448eb211c80319c" and tp[2] != "b7ad6b7169203331"
    assert "x-request-id" in seen[0].headers
    # The client's 5 requests rode one downstream connection; upstream connections were reused.
    assert sum(b.connections for b in mesh.backends.values()) <= 2
    assert mesh.metrics.count(response_code="200", reporter="waypoint",
                              destination_service="reviews.bookinfo.svc.cluster.local") == 5


async def test_weighted_split_90_10_over_2000_requests(mesh: Mesh) -> None:
    await mesh.start()
    mesh.apply(SUBSETS + """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v2}, weight: 10}
""")
    replies = await many(mesh, 2000)
    served = Counter(r.headers["x-served-by"] for r in replies)
    assert sum(served.values()) == 2000
    assert abs(served["reviews-v1"] / 2000 - 0.90) <= 0.03, served
    assert mesh.metrics.count(destination_workload="reviews-v2") == served["reviews-v2"]


async def test_header_match_end_user_jason(mesh: Mesh) -> None:
    await mesh.start()
    mesh.apply(SUBSETS + """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route: [{destination: {host: reviews, subset: v1}}]
""")
    c = Client(mesh.address)
    try:
        jason = [await c.request(headers={"end-user": "jason"}) for _ in range(20)]
        others = [await c.request(headers={"end-user": "bob"}) for _ in range(20)]
    finally:
        await c.close()
    assert {r.headers["x-served-by"] for r in jason} == {"reviews-v2"}
    assert {r.headers["x-served-by"] for r in others} == {"reviews-v1"}


def _fault(delay: str, timeout: str) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: bookinfo}}
spec:
  hosts: [reviews]
  http:
  - match: [{{headers: {{end-user: {{exact: jason}}}}}}]
    fault: {{delay: {{percentage: {{value: 100.0}}, fixedDelay: {delay}}}}}
    timeout: {timeout}
    route: [{{destination: {{host: reviews}}}}]
  - match: [{{uri: {{prefix: /abort}}}}]
    fault: {{abort: {{percentage: {{value: 100.0}}, httpStatus: 500}}}}
    route: [{{destination: {{host: reviews}}}}]
  - route: [{{destination: {{host: reviews}}}}]
"""


async def test_fault_delay_7s_with_3s_timeout_gives_504_after_3s(mesh: Mesh) -> None:
    await mesh.start()
    mesh.apply(_fault("7s", "3s"))
    c = Client(mesh.address)
    try:
        t0 = time.monotonic()
        r = await c.request(headers={"end-user": "jason"})
        elapsed = time.monotonic() - t0
        fast = await c.request(headers={"end-user": "bob"})
    finally:
        await c.close()
    assert r.status == 504 and r.body == b"upstream request timeout"
    assert 2.9 <= elapsed < 4.5, elapsed
    assert fast.status == 200
    assert not any(s.headers.get("end-user") == "jason"
                   for b in mesh.backends.values() for s in b.seen)
    assert mesh.metrics.count(response_code="504", response_flags="DI,UT") == 1


async def test_fault_delay_scaled_down_then_success(mesh: Mesh) -> None:
    await mesh.start()
    mesh.apply(_fault("200ms", "2s"))
    c = Client(mesh.address)
    try:
        t0 = time.monotonic()
        r = await c.request(headers={"end-user": "jason"})
        elapsed = time.monotonic() - t0
    finally:
        await c.close()
    assert r.status == 200 and elapsed >= 0.19
    assert mesh.metrics.count(response_code="200", response_flags="DI") == 1


async def test_fault_abort_500_counted_with_flag_fi(mesh: Mesh) -> None:
    await mesh.start()
    mesh.apply(_fault("1s", "2s"))
    replies = await many(mesh, 10, clients=2, path="/abort")
    assert {r.status for r in replies} == {500}
    assert not any(b.seen for b in mesh.backends.values())
    assert mesh.metrics.count(response_code="500", response_flags="FI") == 10
    assert b'istio_requests_total{' in mesh.metrics.render()
    assert b'response_flags="FI"' in mesh.metrics.render()


def _every_other(n: int, _m: str, _p: str) -> tuple[int, float]:
    return (503 if n % 2 == 1 else 200), 0.0


def ratings_route(**fields: str) -> str:
    """A VirtualService sending ratings to ratings, its one http route with ``fields``."""
    return ("apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
            "metadata: {name: ratings, namespace: bookinfo}\n"
            "spec:\n  hosts: [ratings]\n  http:\n  - route: [{destination: {host: ratings}}]\n"
            + "".join(f"    {k}: {v}\n" for k, v in fields.items()))


@pytest.mark.parametrize(("retries", "want_failures"), [("{attempts: 3}", False),
                                                        ("{attempts: 0}", True)])
async def test_retries_over_a_backend_failing_every_other_request(
        retries: str, want_failures: bool) -> None:
    m = Mesh()
    await m.add("ratings-v1", {"app": "ratings", "version": "v1"}, _every_other)
    try:
        await m.start()
        m.apply(ratings_route(retries=retries))
        replies = await many(m, 40, clients=1, host="ratings:9080")
    finally:
        await m.stop()
    statuses = Counter(r.status for r in replies)
    if want_failures:
        assert statuses == {503: 20, 200: 20}
    else:
        assert statuses == {200: 40}
        assert len(m.backends["ratings-v1"].seen) == 80


async def test_plain_forwards_run_on_callbacks_and_a_retry_goes_on_in_a_task() -> None:
    # After the first request (which dials), an HTTP/1.1 forward on a kept-alive upstream
    # connection is served without a task; a first try that must be retried hands the
    # request over to the general path, which makes only the tries still due.
    m = Mesh()
    await m.add("ratings-v1", {"app": "ratings", "version": "v1"},
                lambda n, _m, _p: (503 if n == 5 else 200, 0.0))  # its 5th answer fails
    try:
        await m.start()
        m.apply(ratings_route(retries="{attempts: 3, retryOn: 5xx}"))
        assert m.proxy is not None
        spawned = m.proxy.spawned
        replies = await many(m, 11, clients=1, host="ratings:9080")
    finally:
        await m.stop()
    assert [r.status for r in replies] == [200] * 11
    # request 1 dials (a task); 2-4 on callbacks; 5 meets the 503 on callbacks and its
    # retry (the second try only) runs in a task; 6-11 on callbacks again
    assert len(m.backends["ratings-v1"].seen) == 12
    assert m.proxy.spawned - spawned == 2
    assert m.backends["ratings-v1"].connections == 1


async def test_a_failure_after_the_upstream_answered_on_callbacks_is_a_500_not_a_hang(
        mesh: Mesh) -> None:
    await mesh.start()
    mesh.apply(SUBSETS + reviews_to("v1"))
    assert mesh.proxy is not None
    c = Client(mesh.address)
    try:
        assert (await c.request("/")).status == 200  # dials: the upstream is kept alive

        calls = 0

        def broken() -> float:  # the request's start reads the clock, its end fails
            nonlocal calls
            calls += 1
            if calls > 1:
                raise RuntimeError("a bug past the upstream's answer")
            return 0.0

        mesh.proxy.clock = broken
        reply = await asyncio.wait_for(c.request("/"), 5)
        assert reply.status == 500 and reply.body == b"internal error"
    finally:
        await c.close()


async def test_head_on_a_kept_alive_connection_gets_the_length_and_no_body(
        mesh: Mesh) -> None:
    await mesh.start()
    mesh.apply(SUBSETS + reviews_to("v1"))
    c = Client(mesh.address)
    try:
        first = await c.request("/x")  # dials; the HEAD below reuses the connection
        head = await asyncio.wait_for(c.request("/x", method="HEAD"), 5)
        after = await asyncio.wait_for(c.request("/x"), 5)
    finally:
        await c.close()
    assert first.status == head.status == after.status == 200
    # the length the upstream announced for the HEAD (its GET's body would be that long)
    assert head.body == b"" and head.headers["content-length"] == str(len(b"reviews-v1 HEAD /x"))
    assert after.body == first.body
    assert mesh.backends["reviews-v1"].connections == 1


async def test_connection_pool_overflow_gives_503_uo(mesh: Mesh) -> None:
    await mesh.start()
    slow = await mesh.add("ratings-v1", {"app": "ratings", "version": "v1"},
                          lambda n, m, p: (200, 0.2))
    mesh.apply("""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: bookinfo}
spec:
  host: ratings
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
""")
    replies = await many(mesh, 20, clients=20, host="ratings:9080")
    statuses = Counter(r.status for r in replies)
    assert statuses[503] > 0 and statuses[200] >= 2, statuses
    assert statuses[200] + statuses[503] == 20
    # Envoy's mark on a circuit-breaker 503, on those only
    assert all((r.headers.get("x-envoy-overloaded") == "true") == (r.status == 503)
               for r in replies)
    assert slow.max_active == 1
    assert mesh.metrics.count(response_code="503", response_flags="UO") == statuses[503]


async def test_outlier_detection_ejects_a_failing_endpoint(mesh: Mesh) -> None:
    now = [0.0]
    await mesh.add("ratings-v1", {"app": "ratings", "version": "v1"}, lambda n, m, p: (500, 0))
    good = await mesh.add("ratings-v2", {"app": "ratings", "version": "v2"})
    await mesh.start()
    assert mesh.proxy is not None
    mesh.proxy.clock = lambda: now[0]
    mesh.apply("""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: bookinfo}
spec:
  host: ratings
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 30s,
                       maxEjectionPercent: 50}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: bookinfo}
spec:
  hosts: [ratings]
  http:
  - retries: {attempts: 0}
    route: [{destination: {host: ratings}}]
""")
    bad = mesh.backends["ratings-v1"]
    for c in list(mesh.proxy.clusters.values()):
        c.clock = mesh.proxy.clock
    replies = await many(mesh, 20, clients=1, host="ratings:9080")
    assert len(bad.seen) == 3  # ejected after the third consecutive 500
    assert Counter(r.status for r in replies) == {500: 3, 200: 17}
    before = len(good.seen)
    now[0] = 29.0
    await many(mesh, 4, clients=1, host="ratings:9080")
    assert len(bad.seen) == 3 and len(good.seen) == before + 4
    now[0] = 31.0  # baseEjectionTime passed: back in rotation
    await many(mesh, 4, clients=1, host="ratings:9080")
    assert len(bad.seen) > 3


async def test_mirroring_100_percent_to_v2(mesh: Mesh) -> None:
    mesh.backends["reviews-v2"].behaviour = lambda n, m, p: (200, 1.0)  # a slow mirror
    await mesh.start()
    mesh.apply(SUBSETS + """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews, subset: v1}, weight: 100}]
    mirror: {host: reviews, subset: v2}
    mirrorPercentage: {value: 100.0}
""")
    t0 = time.monotonic()
    replies = await many(mesh, 10, clients=1)
    elapsed = time.monotonic() - t0
    assert {r.headers["x-served-by"] for r in replies} == {"reviews-v1"}
    assert elapsed < 0.9, elapsed  # the slow mirror never delays the clients
    v2 = mesh.backends["reviews-v2"]
    deadline = time.monotonic() + 5
    while len(v2.seen) < 10 and time.monotonic() < deadline:  # noqa: ASYNC110 - bounded poll
        await asyncio.sleep(0.05)
    assert len(v2.seen) == 10
    assert {s.headers["host"] for s in v2.seen} == {"reviews-shadow:9080"}


async def test_l7_policy_denies_delete_admin(mesh: Mesh) -> None:
    await mesh.start()
    mesh.apply("""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin-delete, namespace: bookinfo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules:
  - to: [{operation: {methods: [DELETE], paths: ["/admin*"]}}]
""")
    c = Client(mesh.address)
    try:
        denied = await c.request("/admin/users", method="DELETE")
        allowed = await c.request("/admin/users", method="GET")
    finally:
        await c.close()
    assert (denied.status, denied.body) == (403, b"RBAC: access denied")
    assert allowed.status == 200
    assert [s.method for b in mesh.backends.values() for s in b.seen] == ["GET"]
    assert mesh.metrics.count(response_code="403") == 1


async def test_direct_response_redirect_and_response_headers(mesh: Mesh) -> None:
    await mesh.start()
    mesh.apply("""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {exact: /teapot}}]
    directResponse: {status: 418, body: {string: short and stout}}
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new}
  - match: [{uri: {prefix: /v1}}]
    rewrite: {uri: /v2}
    headers:
      request: {set: {x-added: yes-please}}
      response: {set: {x-resp: done}, remove: [server]}
    route: [{destination: {host: reviews}}]
""")
    c = Client(mesh.address)
    try:
        tea = await c.request("/teapot")
        red = await c.request("/old/x")
        rw = await c.request("/v1/items")
    finally:
        await c.close()
    assert (tea.status, tea.body) == (418, b"short and stout")
    assert red.status == 301 and red.headers["location"] == "http://reviews:9080/new"
    assert rw.status == 200 and rw.headers["x-resp"] == "done" and "server" not in rw.headers
    seen = [s for b in mesh.backends.values() for s in b.seen]
    assert seen[0].path == "/v2/items" and seen[0].headers["x-added"] == "yes-please"


async def test_unreachable_endpoint_is_503_uf_after_retries(mesh: Mesh) -> None:
    await mesh.start()
    mesh.objects.append(pod("ratings-v9", "10.1.0.99", {"app": "ratings"}))  # nothing listens
    mesh.apply()
    c = Client(mesh.address)
    try:
        r = await c.request(host="ratings:9080")
    finally:
        await c.close()
    assert r.status == 503
    assert mesh.metrics.count(response_code="503", response_flags="URX,UF") == 1


async def test_chunked_request_body_and_post(mesh: Mesh) -> None:
    await mesh.start()
    reader, writer = await asyncio.open_connection(*mesh.address)
    try:
        writer.write(b"POST /upload HTTP/1.1\r\nHost: reviews:9080\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    seen = [s for b in mesh.backends.values() for s in b.seen]
    assert seen[0].body == b"hello world" and seen[0].method == "POST"
    assert seen[0].headers.get("content-length") == "11"


def v1_without_retries(extra: str = "") -> str:
    """Reviews to v1 with no retries (after ``SUBSETS``); ``extra``: one more line of the
    rule (``timeout: 5s``)."""
    return f"""---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: bookinfo}}
spec:
  hosts: [reviews]
  http:
  - retries: {{attempts: 0}}
    {extra}
    route: [{{destination: {{host: reviews, subset: v1}}}}]
"""


async def test_a_stale_keep_alive_connection_is_retried_on_a_fresh_one(mesh: Mesh) -> None:
    await mesh.start()
    for b in mesh.backends.values():
        b.per_connection = 1
    mesh.apply(SUBSETS + v1_without_retries())
    replies = await many(mesh, 5, clients=1)
    assert [r.status for r in replies] == [200] * 5
    assert mesh.backends["reviews-v1"].connections >= 5
    # PUT is idempotent: sent again too
    replies = await many(mesh, 3, clients=1, method="PUT", body=b"same")
    assert [r.status for r in replies] == [200] * 3


@pytest.mark.parametrize("route_extra", ["", "timeout: 5s"], ids=["callbacks", "general-path"])
async def test_a_post_is_not_sent_twice_when_its_kept_alive_connection_fails(
    mesh: Mesh, route_extra: str
) -> None:
    # the upstream takes a request on a kept-alive connection and drops the connection
    # without an answer: it may have applied it, so a POST is not sent again (RFC 9110
    # 9.2.2); with no retries configured the client gets the failure. A route timeout
    # sends the exchange down the general path (Upstreams.exchange), not the callbacks
    await mesh.start()
    backend = mesh.backends["reviews-v1"]
    backend.per_connection = 1
    mesh.apply(SUBSETS + v1_without_retries(route_extra))
    c = Client(mesh.address)
    try:
        first = await c.request("/order", method="POST", body=b"one")
        second = await c.request("/order", method="POST", body=b"two")
    finally:
        await c.close()
    assert first.status == 200
    assert second.status == 503
    assert backend.connections == 1  # the failed POST went to no second connection


def reviews_to(subset: str) -> str:
    """A VirtualService sending everything for reviews to one subset (after ``SUBSETS``)."""
    return ("---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n"
            "metadata: {name: reviews, namespace: bookinfo}\n"
            "spec:\n  hosts: [reviews]\n  http:\n"
            f"  - route: [{{destination: {{host: reviews, subset: {subset}}}}}]\n")


async def test_describe_for_the_admin_port(mesh: Mesh) -> None:
    await mesh.start()
    mesh.apply(SUBSETS + reviews_to("v1"))
    await many(mesh, 2, clients=1)
    assert mesh.proxy is not None
    d = mesh.proxy.describe()
    reviews = d["services"]["reviews.bookinfo.svc.cluster.local"]  # type: ignore[index]
    assert reviews == {"routes": "VirtualService bookinfo/reviews", "http_routes": 1,
                       "destination_rule": "bookinfo/reviews"}
    assert "outbound|9080|v1|reviews.bookinfo.svc.cluster.local" in d["clusters"]  # type: ignore[operator]


async def test_a_new_snapshot_replaces_what_was_remembered_per_request_shape(mesh: Mesh) -> None:
    """Resolution, policies and protocol choice are remembered per routing table: the same
    request (same address, port and Host) follows a configuration change at once."""
    await mesh.start()
    c = Client(mesh.address)
    try:
        before = await c.request("/x", host="reviews:9080")
        assert before.status == 200 and (await c.request("/x", host="nope")).status == 404
        mesh.apply(SUBSETS + reviews_to("v2") + """
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-x, namespace: bookinfo}
spec:
  targetRefs: [{kind: Service, group: "", name: ratings}]
  action: DENY
  rules:
  - to: [{operation: {paths: ["/x"]}}]
""", service("nope", "10.96.0.12", app="reviews"))
        after = [await c.request("/x", host="reviews:9080") for _ in range(4)]
        assert {r.headers["x-served-by"] for r in after} == {"reviews-v2"}
        assert (await c.request("/x", host="ratings:9080")).status == 403
        assert (await c.request("/x", host="nope")).status == 200
    finally:
        await c.close()


def _slow_first(n: int, _m: str, _p: str) -> tuple[int, float]:
    return 200, (2.0 if n == 1 else 0.0)


@pytest.mark.parametrize(("route_timeout", "want"), [("3s", 200), ("300ms", 504)])
async def test_per_try_timeout_retries_within_the_route_timeout(
        route_timeout: str, want: int) -> None:
    """perTryTimeout 200ms: the first (slow) try is abandoned and retried; a route timeout
    shorter than the slow try ends the whole request first."""
    m = Mesh()
    await m.add("ratings-v1", {"app": "ratings", "version": "v1"}, _slow_first)
    try:
        await m.start()
        per_try = "200ms" if route_timeout == "3s" else "1s"
        m.apply(ratings_route(timeout=route_timeout, retries="{attempts: 2, perTryTimeout: "
                              f"{per_try}, retryOn: gateway-error}}"))
        c = Client(m.address)
        try:
            t0 = time.monotonic()
            r = await c.request(host="ratings:9080")
            elapsed = time.monotonic() - t0
        finally:
            await c.close()
    finally:
        await m.stop()
    assert r.status == want
    if want == 200:
        assert 0.19 <= elapsed < 1.5, elapsed
        assert len(m.backends["ratings-v1"].seen) == 2
        assert m.metrics.count(response_code="200") == 1
    else:
        assert 0.29 <= elapsed < 0.9, elapsed
        assert m.metrics.count(response_code="504", response_flags="UT") == 1
