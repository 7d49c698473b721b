"""Outbound (:15001): captured connections from the node's enrolled pods.

``plan()`` is the decision, pure over the frozen snapshot: where does a
connection to ``original_dst`` from ``source`` go? ``Outbound`` does the I/O:
it accepts, plans, then dials HBONE through the pool, connects in plaintext,
or hands the connection to the local inbound path.

Same-node destinations are delivered *in process*: the agent holds both ends'
identities, so an mTLS hop over loopback would prove nothing the agent does
not already know and would cost two handshakes' worth of CPU and a second
copy of every byte. The destination's inbound policy is still applied (the
authorizer sees the source workload's identity exactly as it would over
HBONE), then the agent connects straight to the workload.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from ztunnel_py import log
from ztunnel_py.config import HBONE_PORT, HboneConfig
from ztunnel_py.hbone.aio import Leg, StreamLeg, TunnelBroken, TunnelRefused
from ztunnel_py.hbone.core import format_authority, forwarded_for
from ztunnel_py.policy.types import Connection, Verdict
from ztunnel_py.proxy.guard import RelaySet
from ztunnel_py.proxy.pool import ConnectionPool, PoolError, PoolKey
from ztunnel_py.proxy.relay import Relay, TcpLeg, dialled_leg
from ztunnel_py.proxy.sockets import (
    OriginalDst,
    UpstreamError,
    UpstreamFactory,
    connect,
    plain_upstream,
    sockname_original_dst,
    transport_addresses,
)
from ztunnel_py.state.model import Endpoint, Service, Workload
from ztunnel_py.state.snapshot import Snapshot, StateStore
from ztunnel_py.telemetry.connection import ConnectionResult, Peer

_log = log.get("outbound")

Authorizer = Callable[[Connection, Snapshot], Verdict]


_ALLOW = Verdict.allow()  # (frozen: one for every connection)


def allow_all(conn: Connection, snapshot: Snapshot) -> Verdict:
    """The policy hook when none is wired (tests, benchmarks; the agent passes its L4
    authorization)."""
    return _ALLOW


# -- routes --------------------------------------------------------------------------


# One per connection: each writes its ``__init__`` (compiled, ``ztunnel_py.native``; a
# dataclass-made one stays interpreted and costs more than the rest of the plan). Not
# frozen: a frozen class cannot assign in its own ``__init__``; nothing changes a route.


@dataclass(init=False)
class Passthrough:
    """Not in the mesh: connect in plaintext to ``address``."""

    address: tuple[str, int]
    service: Service | None

    def __init__(self, address: tuple[str, int], service: Service | None = None) -> None:
        self.address = address
        self.service = service


@dataclass(init=False)
class Tunnel:
    """HBONE to ``dial`` (a node's :15008, or a waypoint's) asking for ``authority``."""

    dial: tuple[str, int]
    authority: str
    src_identity: str
    dst_identity: str
    destination: Workload
    service: Service | None
    via_waypoint: bool

    def __init__(self, dial: tuple[str, int], authority: str, src_identity: str,
                 dst_identity: str, destination: Workload, service: Service | None = None,
                 via_waypoint: bool = False) -> None:
        self.dial = dial
        self.authority = authority
        self.src_identity = src_identity
        self.dst_identity = dst_identity
        self.destination = destination
        self.service = service
        self.via_waypoint = via_waypoint


@dataclass(init=False)
class Local:
    """The destination lives on this node: inbound policy, then connect to ``address``."""

    address: tuple[str, int]
    destination: Workload
    service: Service | None

    def __init__(self, address: tuple[str, int], destination: Workload,
                 service: Service | None = None) -> None:
        self.address = address
        self.destination = destination
        self.service = service


@dataclass(init=False)
class Reject:
    reason: str

    def __init__(self, reason: str) -> None:
        self.reason = reason


Route = Passthrough | Tunnel | Local | Reject


def _healthy_endpoints(service: Service, snapshot: Snapshot) -> list[Endpoint]:
    out = []
    for ep in service.endpoints:
        if not ep.ready:
            continue
        w = snapshot.by_uid.get(ep.workload_uid)
        if w is not None and not w.healthy:
            continue
        out.append(ep)
    return out


def _target_port(service: Service, port: int, ep: Endpoint, w: Workload | None) -> int | None:
    if port in ep.ports:
        return ep.ports[port]
    sp = service.port(port)
    if sp is None:
        return None
    if isinstance(sp.target_port, int):
        return sp.target_port
    if w is not None and sp.target_port in w.named_ports:
        return w.named_ports[sp.target_port]
    if sp.target_port.isdigit():
        return int(sp.target_port)
    return None


def _waypoint_workload(
    service: Service | None, dst: Workload, snapshot: Snapshot, rr: int
) -> tuple[str, Workload] | None:
    """The waypoint's (address, workload) for a destination that uses one."""
    ref = (service.waypoint if service is not None else None) or dst.waypoint
    if ref is None:
        return None
    wp_service = snapshot.by_service_key.get(f"{ref.namespace}/{ref.name}")
    candidates: list[Workload] = []
    if wp_service is not None:
        for ep in _healthy_endpoints(wp_service, snapshot):
            w = snapshot.by_uid.get(ep.workload_uid)
            if w is not None and w.ips:
                candidates.append(w)
    if not candidates:
        candidates = [
            w for w in snapshot.workloads
            if w.is_waypoint and w.namespace == ref.namespace and w.ips and w.healthy
            and (w.labels.get("gateway.networking.k8s.io/gateway-name") or w.name).startswith(
                ref.name
            )
        ]
    if not candidates:
        return None
    w = candidates[rr % len(candidates)]
    return w.ips[0], w


def plan(
    original_dst: tuple[str, int],
    source: Workload | None,
    snapshot: Snapshot,
    node: str,
    *,
    rr: int = 0,
    hbone_port: int = HBONE_PORT,
) -> Route:
    """Decide where a captured connection goes. Pure; ``rr`` drives round robin."""
    ip, port = original_dst
    if source is None:
        return Reject(f"source address of the connection to {ip}:{port} is not a known workload")
    service = snapshot.service_for(ip, port)
    dst: Workload | None
    if service is not None:
        endpoints = _healthy_endpoints(service, snapshot)
        if not endpoints:
            return Reject(f"service {service.key} has no healthy endpoints for port {port}")
        ep = endpoints[rr % len(endpoints)]
        dst = snapshot.by_uid.get(ep.workload_uid)
        target = _target_port(service, port, ep, dst)
        if target is None:
            return Reject(f"service {service.key} port {port} has no target on {ep.address}")
        dst_addr = (ep.address, target)
    else:
        dst = snapshot.by_ip.get(ip)
        dst_addr = (ip, port)
    if dst is None or not dst.enrolled or not source.enrolled:
        return Passthrough(dst_addr, service)
    if not source.is_waypoint:
        waypoint = _waypoint_workload(service, dst, snapshot, rr)
        if waypoint is not None:
            wp_ip, wp = waypoint
            # the waypoint gets the address the client asked for (the VIP, or the pod)
            return Tunnel(
                (wp_ip, hbone_port), format_authority(ip, port), facts(source).identity,
                facts(wp).identity, wp, service, via_waypoint=True,
            )
    if dst.node == node:
        return Local(dst_addr, dst, service)
    return Tunnel(
        (dst_addr[0], hbone_port), format_authority(*dst_addr), facts(source).identity,
        facts(dst).identity, dst, service,
    )


class Facts(NamedTuple):
    """What the data path says about a workload on every connection, derived once."""

    workload: Workload  # the object these facts are of (snapshots swap whole objects)
    identity: str
    app: str  # canonical service name
    version: str  # canonical revision
    baggage: str


# by uid; an entry counts only for the very Workload object it was made from
_facts: dict[str, Facts] = {}
_FACTS_MAX = 16_384  # more workloads than that: start over rather than grow without end


def facts(w: Workload) -> Facts:
    """``w``'s identity, canonical name and revision and HBONE baggage, remembered while
    the snapshot keeps the same object (each is a format or three label lookups)."""
    f = _facts.get(w.uid)
    if f is not None and f.workload is w:
        return f
    if len(_facts) >= _FACTS_MAX:
        _facts.clear()
    app, version = w.canonical_name, w.canonical_revision
    baggage = ",".join([
        f"k8s.namespace.name={w.namespace}",
        f"k8s.pod.name={w.name}",
        f"service.name={app}",
        f"service.version={version}",
    ])
    f = _facts[w.uid] = Facts(w, w.identity, app, version, baggage)
    return f


def baggage_for(w: Workload) -> str:
    """Istio's HBONE baggage: who is calling (names as in ztunnel)."""
    return facts(w).baggage


def peer_of(w: Workload | None, address: str, service: Service | None = None) -> Peer:
    hostname = service.hostname if service is not None else ""
    if w is None:
        return Peer(address, service=hostname)
    f = facts(w)
    return Peer(address, w.name, w.namespace, f.identity, f.app, f.version, hostname)


def _addr(a: tuple[str, int]) -> str:
    return format_authority(a[0], a[1])


def _normalise(ip: str) -> str:
    if ":" not in ip:  # IPv4 from the kernel: already canonical
        return ip
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


class Outbound:
    """Accepts captured connections and carries them where ``plan`` says."""

    def __init__(
        self,
        config: HboneConfig,
        store: StateStore,
        node: str,
        pool: ConnectionPool,
        *,
        authorizer: Authorizer = allow_all,
        original_dst: OriginalDst = sockname_original_dst,
        upstream: UpstreamFactory = plain_upstream,
        hbone_port: int = HBONE_PORT,
    ) -> None:
        self.config = config
        self.store = store
        self.node = node
        self.pool = pool
        self.authorizer = authorizer
        self.original_dst = original_dst
        self.upstream = upstream
        self.hbone_port = hbone_port
        self._rr = itertools.count()
        self.tasks: set[asyncio.Task[None]] = set()
        # the loop the listener runs on (``Proxy.start`` sets it): saves a getpid() per
        # connection on Python 3.11, where get_running_loop() makes one
        self.loop: asyncio.AbstractEventLoop | None = None
        self.relays = RelaySet()

    def protocol(self) -> TcpLeg:
        # not started paused: the client's first bytes wait in the leg (up to EARLY_LIMIT)
        return TcpLeg(on_made=self._accepted)

    def _accepted(self, leg: TcpLeg) -> None:
        assert leg.transport is not None
        try:
            local, peer = transport_addresses(leg.transport)
            dst = self.original_dst(local, peer)
        except OSError as exc:
            _log.warning("no original destination; resetting", error=str(exc))
            leg.reset()
            return
        task = (self.loop or asyncio.get_running_loop()).create_task(
            self._serve(leg, (_normalise(peer[0]), peer[1]), (_normalise(dst[0]), dst[1]))
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(
        self, leg: TcpLeg, src: tuple[str, int], dst: tuple[str, int]
    ) -> None:
        snapshot = self.store.current
        source = snapshot.by_ip.get(src[0])
        route = plan(
            dst, source, snapshot, self.node, rr=next(self._rr), hbone_port=self.hbone_port
        )
        result = ConnectionResult("outbound", peer_of(source, _addr(src)))
        if isinstance(route, Reject):
            result.dst = Peer(address=_addr(dst))
            _log.info("outbound connection rejected", src=_addr(src), dst=_addr(dst),
                      reason=route.reason)
            leg.reset()
            result.close(route.reason, "NR")
            return
        upstream: Leg
        authorized: Connection | None = None  # same-node delivery: the inbound policy applied
        try:
            if isinstance(route, Tunnel):
                result.dst = peer_of(route.destination, route.authority, route.service)
                result.security = "mutual_tls"
                result.hbone_target = route.authority
                stream = await self.pool.open_stream(
                    PoolKey(route.src_identity, route.dst_identity, route.dial),
                    route.authority,
                    forwarded=forwarded_for(src[0]),
                    baggage=baggage_for(source) if source is not None else "",
                    first=leg.hand_early,  # the client's first bytes go with the CONNECT
                )
                upstream = stream
            else:
                result.dst = peer_of(
                    route.destination if isinstance(route, Local) else None,
                    _addr(route.address), route.service,
                )
                if isinstance(route, Local):
                    assert source is not None
                    authorized = Connection(src[0], route.address[0], route.address[1],
                                            route.destination, facts(source).identity, src[1])
                    verdict = self.authorizer(authorized, snapshot)
                    if not verdict.allowed:
                        leg.reset()
                        result.close(f"denied: {verdict.reason}", "DENY")
                        return
                upstream = await self._plain(route.address)
        except (PoolError, TunnelRefused, TunnelBroken, UpstreamError) as exc:
            _log.info("outbound connection failed", src=_addr(src), dst=_addr(dst), error=str(exc))
            leg.reset()
            result.close(str(exc), "UF")
            return
        except BaseException:
            leg.reset()
            result.close("agent shutting down", "UF")
            raise
        if leg.done:  # the client went away while we were connecting
            upstream.reset()
            result.close("downstream closed during setup", "DC")
            return
        if isinstance(upstream, StreamLeg):
            upstream.attach(leg)
        relay = Relay(leg, upstream, result, on_finished=self.relays.discard,
                      linger_s=self.config.linger_s)
        if not relay.finished:
            self.relays.add(relay, authorized)

    async def _plain(self, address: tuple[str, int]) -> TcpLeg:
        sock = await connect(self.upstream, address, self.config.connect_timeout_s)
        return await dialled_leg(sock)
