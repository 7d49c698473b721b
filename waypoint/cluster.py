"""Upstream clusters: a service (and subset, port) as the set of endpoints the waypoint
may send to, with the DestinationRule's traffic policy applied.

* ``endpoints_for`` is pure: the service's ready endpoints, narrowed to the
  subset's labels, with the target port resolved; the waypoint's own workloads
  are never endpoints (it never loops traffic back to itself).
* ``effective_policy`` merges the subset's traffic policy over the top level
  (field by field, as Istio does) and then the port-level settings.
* ``Cluster`` keeps the per-cluster state the policy needs: load-balancer
  position, requests in flight per endpoint (LEAST_REQUEST), the connection
  pool admission counters (overflow answers 503 ``UO``) and outlier detection
  (consecutive 5xx / gateway errors eject an endpoint for
  ``baseEjectionTime * times ejected``, never more than ``maxEjectionPercent``
  of the endpoints). Time and randomness are injected.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from waypoint.engine import Target
from waypoint.request import Request
from ztunnel_py.state import routing as r
from ztunnel_py.state.model import Service, Workload
from ztunnel_py.state.snapshot import Snapshot

UNLIMITED = 2**32 - 1

Clock = Callable[[], float]


@dataclass(frozen=True)
class EndpointRef:
    address: str
    port: int
    workload: Workload | None = None
    key: str = field(init=False, repr=False, compare=False)  # "address:port", made once

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.address}:{self.port}")


@dataclass(frozen=True)
class ClusterPolicy:
    load_balancer: r.LoadBalancerSettings | None = None
    connection_pool: r.ConnectionPoolSettings | None = None
    outlier_detection: r.OutlierDetection | None = None


def _merge(base: r.TrafficPolicy | None, over: r.TrafficPolicy | None, port: int) -> ClusterPolicy:
    lb = pool = od = None
    for tp in (base, over):
        if tp is None:
            continue
        lb = tp.load_balancer or lb
        pool = tp.connection_pool or pool
        od = tp.outlier_detection or od
        for pl in tp.port_level_settings:
            if pl.port is not None and pl.port.number == port:
                lb = pl.load_balancer or lb
                pool = pl.connection_pool or pool
                od = pl.outlier_detection or od
    return ClusterPolicy(lb, pool, od)


def effective_policy(dr: r.DestinationRule | None, subset: str | None, port: int) -> ClusterPolicy:
    """Top-level traffic policy, overridden by the subset's, each then by its port level."""
    if dr is None:
        return ClusterPolicy()
    sub = dr.subset(subset) if subset else None
    return _merge(dr.traffic_policy, sub.traffic_policy if sub else None, port)


class UnknownSubset(LookupError):
    pass


def _target_port(service: Service, port: int, ep_ports: dict[int, int], w: Workload | None) -> int:
    if port in ep_ports:
        return ep_ports[port]
    sp = service.port(port)
    if sp is None:
        return port
    if isinstance(sp.target_port, int):
        return sp.target_port or port
    if w is not None and sp.target_port in w.named_ports:
        return w.named_ports[sp.target_port]
    return port


def endpoints_for(
    target: Target,
    service: Service,
    dr: r.DestinationRule | None,
    snapshot: Snapshot,
    *,
    exclude: frozenset[str] = frozenset(),
) -> tuple[EndpointRef, ...]:
    """Ready endpoints of ``target``; ``UnknownSubset`` if the subset is not declared."""
    labels: dict[str, str] = {}
    if target.subset:
        sub = dr.subset(target.subset) if dr is not None else None
        if sub is None:
            raise UnknownSubset(
                f"subset {target.subset!r} of {target.host} is not defined by a DestinationRule"
            )
        labels = dict(sub.labels)
    out: list[EndpointRef] = []
    for ep in service.endpoints:
        if not ep.ready:
            continue
        w = snapshot.by_uid.get(ep.workload_uid)
        if w is not None and (w.is_waypoint or w.uid in exclude or not w.healthy):
            continue
        if labels and (w is None or any(w.labels.get(k) != v for k, v in labels.items())):
            continue
        out.append(EndpointRef(ep.address, _target_port(service, target.port, dict(ep.ports), w),
                               w))
    return tuple(out)


# -- connection pool admission ----------------------------------------------------------


class Overflow(Exception):
    """The connection pool limits are reached (Envoy: response flag UO)."""


@dataclass
class Limits:
    max_active: int = UNLIMITED
    max_pending: int = UNLIMITED
    max_retries: int = UNLIMITED
    max_requests_per_connection: int = 0  # 0: unlimited
    connect_timeout_s: float = 10.0

    @staticmethod
    def of(pool: r.ConnectionPoolSettings | None, http2: bool) -> Limits:
        out = Limits()
        if pool is None:
            return out
        if pool.tcp is not None:
            if pool.tcp.max_connections is not None and not http2:
                out.max_active = pool.tcp.max_connections
            if pool.tcp.connect_timeout:
                out.connect_timeout_s = r.parse_duration(pool.tcp.connect_timeout)
        if pool.http is not None:
            h = pool.http
            if http2 and h.http2_max_requests is not None:
                out.max_active = h.http2_max_requests
            if h.http1_max_pending_requests is not None:
                out.max_pending = h.http1_max_pending_requests
            if h.max_retries is not None:
                out.max_retries = h.max_retries
            if h.max_requests_per_connection is not None:
                out.max_requests_per_connection = h.max_requests_per_connection
        return out


class Gate:
    """At most ``max_active`` requests in flight, ``max_pending`` more waiting; the rest
    overflow at once."""

    def __init__(self) -> None:
        self.active = 0
        self.waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self.retries = 0
        self.overflows = 0

    def try_acquire(self, limits: Limits) -> bool:
        """A slot at once if one is free (no coroutine on the common path)."""
        if self.active < limits.max_active and not self.waiting:
            self.active += 1
            return True
        return False

    async def acquire(self, limits: Limits) -> None:
        if self.active < limits.max_active and not self.waiting:
            self.active += 1
            return
        if len(self.waiting) >= limits.max_pending:
            self.overflows += 1
            raise Overflow("upstream connection pool is full (maxConnections / "
                           "http1MaxPendingRequests)")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # handed a slot while being cancelled: pass it on
            else:
                self.waiting.remove(fut)
            raise

    def release(self) -> None:
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes to the waiter
                return
        self.active -= 1

    def retry_allowed(self, limits: Limits) -> bool:
        return self.retries < limits.max_retries


# -- outlier detection ------------------------------------------------------------------


@dataclass
class _Health:
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    ejected_until: float = 0.0
    times_ejected: int = 0


@dataclass(frozen=True)
class OutlierSettings:
    consecutive_5xx: int
    consecutive_gateway: int
    base_ejection_s: float
    max_ejection_percent: int

    @staticmethod
    def of(od: r.OutlierDetection | None) -> OutlierSettings | None:
        if od is None:
            return None
        return OutlierSettings(
            consecutive_5xx=5 if od.consecutive_5xx_errors is None else od.consecutive_5xx_errors,
            consecutive_gateway=od.consecutive_gateway_errors or 0,
            base_ejection_s=r.parse_duration(od.base_ejection_time or "30s"),
            max_ejection_percent=(
                10 if od.max_ejection_percent is None else od.max_ejection_percent
            ),
        )


# -- the cluster --------------------------------------------------------------------------


def _hash(key: str, endpoint: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}|{endpoint}".encode(), digest_size=8).digest(),
                          "big")


def _cookie(header: str | None, name: str) -> str | None:
    if not header:
        return None
    for part in header.split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return None


def hash_key(ch: r.ConsistentHashLB, req: Request) -> str | None:
    if ch.http_header_name:
        return req.header(ch.http_header_name.lower())
    if ch.http_cookie is not None:
        return _cookie(req.header("cookie"), ch.http_cookie.name)
    if ch.use_source_ip:
        return req.source.ip or None
    if ch.http_query_parameter_name:
        for part in req.query.split("&"):
            k, _, v = part.partition("=")
            if k == ch.http_query_parameter_name:
                return v
    return None


@dataclass
class Cluster:
    name: str
    policy: ClusterPolicy = field(default_factory=ClusterPolicy)
    rng: random.Random = field(default_factory=random.Random)
    clock: Clock = field(default=lambda: 0.0)
    gate: Gate = field(default_factory=Gate)
    in_flight: dict[str, int] = field(default_factory=dict)  # (a plain dict: compiled, a
    # Counter's missing keys cost an interpreted __missing__ call per request)
    health: dict[str, _Health] = field(default_factory=dict)
    _rr: int = 0
    _limits: tuple[ClusterPolicy, Limits, Limits] | None = None
    _outlier: tuple[ClusterPolicy, OutlierSettings | None] | None = None

    def limits(self, http2: bool) -> Limits:
        """The connection-pool limits (remembered per policy: a policy is immutable)."""
        cached = self._limits
        if cached is None or cached[0] is not self.policy:
            pool = self.policy.connection_pool
            cached = self._limits = (self.policy, Limits.of(pool, False), Limits.of(pool, True))
        return cached[2] if http2 else cached[1]

    # -- outlier detection --

    def is_ejected(self, ep: EndpointRef) -> bool:
        h = self.health.get(ep.key)
        return h is not None and self.clock() < h.ejected_until

    def ejected(self, endpoints: tuple[EndpointRef, ...]) -> list[EndpointRef]:
        return [e for e in endpoints if self.is_ejected(e)]

    def record(
        self, ep: EndpointRef, status: int | None, endpoints: tuple[EndpointRef, ...]
    ) -> None:
        """One response (``status``) or connection failure (None) from ``ep``."""
        cached = self._outlier
        if cached is None or cached[0] is not self.policy:  # parsed once per policy
            cached = self._outlier = (self.policy,
                                      OutlierSettings.of(self.policy.outlier_detection))
        settings = cached[1]
        if settings is None:
            return
        h = self.health.setdefault(ep.key, _Health())
        if status is not None and status < 500:
            h.consecutive_5xx = h.consecutive_gateway = 0
            return
        h.consecutive_5xx += 1
        if status is None or status in (502, 503, 504):
            h.consecutive_gateway += 1
        else:
            h.consecutive_gateway = 0
        tripped = (settings.consecutive_5xx and h.consecutive_5xx >= settings.consecutive_5xx) or (
            settings.consecutive_gateway and h.consecutive_gateway >= settings.consecutive_gateway
        )
        if not tripped or self.is_ejected(ep):
            return
        already = len(self.ejected(endpoints))
        total = max(len(endpoints), 1)
        if already and 100 * (already + 1) / total > settings.max_ejection_percent:
            return
        if not already and settings.max_ejection_percent <= 0:
            return
        h.times_ejected += 1
        h.ejected_until = self.clock() + settings.base_ejection_s * h.times_ejected
        h.consecutive_5xx = h.consecutive_gateway = 0

    # -- load balancing --

    def pick(self, endpoints: tuple[EndpointRef, ...], req: Request) -> EndpointRef | None:
        healthy = [e for e in endpoints if not self.is_ejected(e)] if self.health else endpoints
        if not healthy:
            return None
        if len(healthy) == 1:  # no choice to make (nor a random draw to spend on it)
            return healthy[0]
        lb = self.policy.load_balancer
        if lb is not None and lb.consistent_hash is not None:
            key = hash_key(lb.consistent_hash, req)
            if key is not None:
                return max(healthy, key=lambda e: _hash(key, e.key))
            return self.rng.choice(healthy)
        simple = (lb.simple if lb is not None else None) or "LEAST_REQUEST"
        if simple == "ROUND_ROBIN":
            ep = healthy[self._rr % len(healthy)]
            self._rr += 1
            return ep
        if simple == "RANDOM":
            return self.rng.choice(healthy)
        # LEAST_REQUEST (Istio's default): power of two choices.
        a, b = self.rng.sample(healthy, 2)
        return a if self.in_flight.get(a.key, 0) <= self.in_flight.get(b.key, 0) else b

    def begin(self, ep: EndpointRef) -> None:
        self.in_flight[ep.key] = self.in_flight.get(ep.key, 0) + 1

    def end(self, ep: EndpointRef) -> None:
        n = self.in_flight.get(ep.key, 0) - 1
        if n > 0:
            self.in_flight[ep.key] = n
        else:
            self.in_flight.pop(ep.key, None)
