"""Inbound HBONE (:15008): mTLS + HTTP/2 CONNECT to the workloads of this node.

Per connection: the address the client dialled picks the destination
workload's certificate (TLS is started only for an enrolled workload of this
node); the client's chain must verify against the mesh roots and its SPIFFE id
must be in our trust domain. Per stream, ``decide()`` (pure) checks the
``:authority``: only a workload on this node, and only the one whose identity
the client verified, may be the target; anything else gets 400 and no
connection is attempted (never an open proxy). Then the authorizer (policy
hook), then the upstream connection: 200 and relay, or 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from ztunnel_py import log
from ztunnel_py.config import HboneConfig
from ztunnel_py.hbone import core
from ztunnel_py.hbone.aio import HboneProtocol, StreamLeg
from ztunnel_py.hbone.core import Role
from ztunnel_py.identity.errors import IdentityError
from ztunnel_py.identity.manager import CertificateSource
from ztunnel_py.identity.tls import ALPN_H2, peer_identity
from ztunnel_py.policy.types import Connection
from ztunnel_py.proxy.guard import RelaySet
from ztunnel_py.proxy.outbound import Authorizer, allow_all, facts, peer_of
from ztunnel_py.proxy.pool import ContextCache
from ztunnel_py.proxy.relay import _LINGER_ZERO, Relay, dialled_leg
from ztunnel_py.proxy.sockets import (
    Address,
    OriginalDst,
    UpstreamError,
    UpstreamFactory,
    connect,
    plain_upstream,
    sockname_original_dst,
)
from ztunnel_py.state.model import Service, Workload
from ztunnel_py.state.snapshot import Snapshot, StateStore
from ztunnel_py.telemetry.connection import ConnectionResult, Peer

_log = log.get("inbound")


def local_workload(snapshot: Snapshot, ip: str, node: str) -> Workload | None:
    """The enrolled workload of this node that owns ``ip``, if any."""
    w = snapshot.by_ip.get(ip)
    if w is None or w.node != node or not w.enrolled:
        return None
    return w


def service_index(snapshot: Snapshot) -> dict[tuple[str, int], Service]:
    """(workload uid, target port) -> the first Service (in snapshot order) with that
    workload as an endpoint and a port targeting that port. Built once per snapshot."""
    if _service_index_cache and _service_index_cache[0][0] is snapshot:
        return _service_index_cache[0][1]
    index: dict[tuple[str, int], Service] = {}
    for s in snapshot.services:
        for ep in s.endpoints:
            for target in ep.ports.values():
                index.setdefault((ep.workload_uid, target), s)
    # snapshots are frozen and swapped whole: identity is a valid key (one slot is enough)
    _service_index_cache[:] = [(snapshot, index)]
    return index


_service_index_cache: list[tuple[Snapshot, dict[tuple[str, int], Service]]] = []


def guess_service(snapshot: Snapshot, w: Workload, port: int) -> Service | None:
    """The Service a connection to ``w``'s ``port`` most likely came through, for the
    destination reporter's ``destination_service`` (Istio's ztunnel guesses the same
    way, ``guess_inbound_service``): the first Service with ``w`` as an endpoint and a
    port that targets ``port``. The client dialled an address, not a Service, so this
    is a guess; None when no Service fronts that port."""
    return service_index(snapshot).get((w.uid, port))


@dataclass(frozen=True)
class Accept:
    destination: Workload
    address: tuple[str, int]


@dataclass(frozen=True)
class Refuse:
    status: int
    reason: str


def decide(
    authority: str, snapshot: Snapshot, node: str, served_identity: str
) -> Accept | Refuse:
    """What to do with a CONNECT to ``authority`` on a connection where we proved
    ``served_identity``. Pure."""
    try:
        ip, port = core.parse_authority(authority)
    except core.BadRequest as exc:
        return Refuse(core.BAD_REQUEST, str(exc))
    w = local_workload(snapshot, ip, node)
    if w is None:
        return Refuse(core.BAD_REQUEST, f"{authority} is not a mesh workload on node {node!r}")
    identity = facts(w).identity
    if identity != served_identity:
        return Refuse(
            core.BAD_REQUEST,
            f"{authority} is {identity}, but this connection was made to {served_identity}",
        )
    return Accept(w, (ip, port))


class Inbound:
    def __init__(
        self,
        config: HboneConfig,
        store: StateStore,
        node: str,
        certificates: CertificateSource,
        trust_domain: str,
        *,
        authorizer: Authorizer = allow_all,
        dialled: OriginalDst = sockname_original_dst,
        upstream: UpstreamFactory = plain_upstream,
        contexts: ContextCache | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.node = node
        self.certificates = certificates
        self.trust_domain = trust_domain
        self.authorizer = authorizer
        self.dialled = dialled
        self.upstream = upstream
        self.contexts = contexts or ContextCache()
        self.tasks: set[asyncio.Task[None]] = set()
        self.connections: set[HboneProtocol] = set()
        self.relays = RelaySet()
        self.upstream_attempts = 0  # connections tried towards workloads (tests: never for 400s)

    def _spawn(
        self, coro: Coroutine[Any, Any, None], loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        task = (loop or asyncio.get_running_loop()).create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def serve(self, listener: socket.socket) -> None:
        """Accept loop for one listening socket (runs until cancelled).

        Accepting by hand (not ``create_server``) lets us read the dialled address
        and pick the certificate *before* TLS starts, and hand the socket to
        ``connect_accepted_socket`` with the right context: no bytes of the
        ClientHello can be consumed by anyone else.
        """
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                _log.warning("hbone accept failed", error=str(exc))
                await asyncio.sleep(0.1)
                continue
            self._spawn(self._handshake(sock, (str(peer[0]), int(peer[1]))))

    async def _handshake(self, sock: socket.socket, peer: Address) -> None:
        owned = False
        try:
            owned = await self._tls(sock, peer)
        finally:
            # a failed handshake closes the socket in the loop (fileno -1); anything else
            # that did not end up owned by a transport is closed here
            if not owned and sock.fileno() != -1:
                sock.close()

    def _refuse(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        sock.close()

    async def _tls(self, sock: socket.socket, peer: Address) -> bool:
        """TLS and identity checks; True once a transport owns ``sock``."""
        loop = asyncio.get_running_loop()
        sock.setblocking(False)  # TCP_NODELAY: inherited from the listener, set by the loop
        try:
            local = sock.getsockname()
            dialled = self.dialled((str(local[0]), int(local[1])), peer)
        except OSError:
            sock.close()
            return False
        w = local_workload(self.store.current, dialled[0], self.node)
        if w is None:
            _log.info("hbone connection to an address that is not a local workload; reset",
                      dialled=core.format_authority(*dialled))
            self._refuse(sock)
            return False
        try:
            cert = await self.certificates.fetch(w.identity)
            ctx = self.contexts.server(cert)
        except IdentityError as exc:
            _log.warning("no certificate to serve HBONE", identity=w.identity, error=str(exc))
            self._refuse(sock)
            return False
        proto_box: list[HboneProtocol] = []

        def factory() -> HboneProtocol:
            proto = HboneProtocol(Role.SERVER, self.config, on_closed=self._closed, deferred=True)
            proto_box.append(proto)
            return proto

        try:
            tls, _ = await loop.connect_accepted_socket(
                factory, sock, ssl=ctx, ssl_handshake_timeout=self.config.connect_timeout_s
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            _log.info("hbone TLS handshake failed", peer=str(peer), error=str(exc))
            return False
        proto = proto_box[0]
        ssl_object = tls.get_extra_info("ssl_object")
        try:
            if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN_H2:
                raise IdentityError("the client did not negotiate ALPN h2")
            client_id = peer_identity(ssl_object, self.trust_domain)
        except IdentityError as exc:
            _log.info("hbone client refused", peer=str(peer), error=str(exc))
            tls.abort()
            return True
        if proto.lost:
            return True
        proto.set_connect_handler(
            lambda leg: self._spawn(self._stream(proto, leg, client_id, w.identity, peer),
                                    proto.loop)
        )
        self.connections.add(proto)
        proto.start()
        return True

    def _closed(self, proto: HboneProtocol, exc: BaseException | None) -> None:
        self.connections.discard(proto)

    async def _stream(
        self,
        conn: HboneProtocol,
        leg: StreamLeg,
        client_id: str,
        served: str,
        peer: tuple[str, int] | None,
    ) -> None:
        snapshot = self.store.current
        peer_ip = str(peer[0]) if peer else ""
        src_ip = core.parse_forwarded_for(leg.headers.get("forwarded", "")) or peer_ip
        src_w = snapshot.by_ip.get(src_ip)
        src = peer_of(src_w, src_ip)
        src.principal = client_id
        result = ConnectionResult("inbound", src, security="mutual_tls",
                                  hbone_target=leg.authority)
        decision = decide(leg.authority, snapshot, self.node, served)
        if isinstance(decision, Refuse):
            result.dst = Peer(address=leg.authority)
            _log.info("hbone CONNECT refused", authority=leg.authority, status=decision.status,
                      reason=decision.reason, client=client_id)
            conn.respond(leg, decision.status)
            result.close(decision.reason, "NR")
            return
        result.dst = peer_of(decision.destination, leg.authority,
                             guess_service(snapshot, decision.destination, decision.address[1]))
        authorized = Connection(src_ip, decision.address[0], decision.address[1],
                                decision.destination, client_id, 0)
        verdict = self.authorizer(authorized, snapshot)
        if not verdict.allowed:
            conn.respond(leg, core.UNAUTHORIZED)
            result.close(f"denied: {verdict.reason}", "DENY")
            return
        self.upstream_attempts += 1
        loop = conn.loop or asyncio.get_running_loop()
        try:
            sock = await connect(self.upstream, decision.address, self.config.connect_timeout_s,
                                 loop=loop)
        except UpstreamError as exc:
            conn.respond(leg, core.SERVICE_UNAVAILABLE)
            result.close(str(exc), "UF")
            return
        try:
            upstream = await dialled_leg(sock, loop)
        except OSError as exc:
            conn.respond(leg, core.SERVICE_UNAVAILABLE)
            result.close(str(exc), "UF")
            return
        if leg.done or conn.lost:
            upstream.reset()
            result.close("client went away during setup", "DC")
            return
        conn.respond(leg, core.OK)
        leg.attach(upstream)
        relay = Relay(leg, upstream, result, on_finished=self.relays.discard,
                      linger_s=self.config.linger_s)
        if not relay.finished:
            self.relays.add(relay, authorized)
