"""The waypoint as a mesh destination: HBONE in on :15008, HBONE out to endpoints.

This is the adapter between the waypoint and the agent's HBONE machinery
(``ztunnel_py.hbone.aio`` and ``ztunnel_py.proxy.pool``), kept in one file so
that the rest of the waypoint only sees byte pipes:

* ``HboneListener`` accepts TCP, starts TLS with the waypoint's own
  certificate (mutual: the client's chain must verify against the mesh roots
  and its SPIFFE id must be in our trust domain), and serves HTTP/2 CONNECT
  streams. A stream's ``:authority`` is the address the client meant (a
  service VIP or a pod IP, with the port); anything the waypoint does not serve
  gets 400 (never an open proxy). Accepted streams carry HTTP to the
  ``WaypointProxy`` with the client's verified identity.
* ``HboneConnector`` is the ``Connector`` for upstreams: an HBONE stream to
  ``<pod ip>:15008`` (the endpoint's node agent captures it), CONNECT
  ``<pod ip>:<target port>``, as the waypoint's identity, expecting the
  endpoint's identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import typing
from typing import Any

from waypoint.cluster import EndpointRef
from waypoint.http1 import ConnInfo
from waypoint.pipe import Pipe, StreamPipe
from waypoint.proxy import WaypointProxy
from waypoint.request import Peer, UpstreamError
from waypoint.server import Sniff
from ztunnel_py import log
from ztunnel_py.config import HBONE_PORT, HboneConfig
from ztunnel_py.hbone import core
from ztunnel_py.hbone.aio import HboneProtocol, StreamLeg, TunnelBroken, TunnelRefused
from ztunnel_py.hbone.core import Role
from ztunnel_py.identity.errors import IdentityError
from ztunnel_py.identity.manager import CertificateSource
from ztunnel_py.identity.tls import ALPN_H2, peer_identity
from ztunnel_py.proxy.pool import ConnectionPool, ContextCache, PoolError, PoolKey
from ztunnel_py.state.snapshot import Snapshot


def _log() -> Any:
    """Resolved at each use, so that ``log.configure`` (run after imports) applies."""
    return log.get("waypoint.hbone")


def serves(snapshot: Snapshot, authority: str, namespace: str, name: str) -> str | None:
    """Why a CONNECT to ``authority`` is refused, or None when the waypoint serves it:
    a service VIP or a workload IP of the mesh. Pure."""
    try:
        ip, port = core.parse_authority(authority)
    except core.BadRequest as exc:
        return str(exc)
    if snapshot.service_for(ip, port) is not None:
        return None
    w = snapshot.by_ip.get(ip)
    if w is not None and not w.is_waypoint:
        return None
    return f"{authority} is neither a service nor a workload the waypoint {namespace}/{name} serves"


class _Handshake(asyncio.Protocol):
    def __init__(self, listener: HboneListener) -> None:
        self.listener = listener
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = typing.cast(asyncio.Transport, transport)
        t.pause_reading()
        self.listener.spawn(self.listener.tls(t, self))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class HboneListener:
    def __init__(
        self,
        proxy: WaypointProxy,
        certificates: CertificateSource,
        identity: str,
        trust_domain: str,
        *,
        host: str = "0.0.0.0",
        port: int = HBONE_PORT,
        config: HboneConfig | None = None,
        contexts: ContextCache | None = None,
    ) -> None:
        self.proxy = proxy
        self.certificates = certificates
        self.identity = identity
        self.trust_domain = trust_domain
        self.host = host
        self.port = port
        self.config = config or HboneConfig()
        self.contexts = contexts or ContextCache()
        self.server: asyncio.Server | None = None
        self.connections: set[HboneProtocol] = set()
        self.pipes: set[StreamPipe] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.refused = 0

    def spawn(self, coro: typing.Coroutine[typing.Any, typing.Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Handshake(self), self.host, self.port,
                                               backlog=4096)
        sock = self.server.sockets[0].getsockname()
        self.port = int(sock[1])
        return str(sock[0]), self.port

    async def tls(self, transport: asyncio.Transport, handshake: _Handshake) -> None:
        loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        try:
            ctx = self.contexts.server(await self.certificates.fetch(self.identity))
        except IdentityError as exc:
            _log().warning("no certificate to serve HBONE", identity=self.identity, error=str(exc))
            transport.abort()
            return
        if handshake.lost:
            transport.abort()
            return
        proto = HboneProtocol(Role.SERVER, self.config, on_closed=self._closed)
        try:
            tls = await loop.start_tls(transport, proto, ctx, server_side=True,
                                       ssl_handshake_timeout=self.config.connect_timeout_s)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            _log().info("HBONE TLS handshake failed", peer=str(peer), error=str(exc))
            transport.abort()
            return
        except BaseException:
            transport.abort()
            raise
        if tls is None:  # pragma: no cover - closed during the handshake
            transport.abort()
            return
        ssl_object = tls.get_extra_info("ssl_object")
        try:
            if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN_H2:
                raise IdentityError("the client did not negotiate ALPN h2")
            client_id = peer_identity(ssl_object, self.trust_domain)
        except IdentityError as exc:
            _log().info("HBONE client refused", peer=str(peer), error=str(exc))
            self.refused += 1
            tls.abort()
            return
        peer_ip = str(peer[0]) if peer else ""
        proto.set_connect_handler(lambda leg: self._stream(proto, leg, client_id, peer_ip))
        self.connections.add(proto)
        proto.connection_made(tls)

    def _closed(self, proto: HboneProtocol, exc: BaseException | None) -> None:
        self.connections.discard(proto)

    def _stream(self, conn: HboneProtocol, leg: StreamLeg, client_id: str, peer_ip: str) -> None:
        snapshot = self.proxy.table.snapshot
        why = serves(snapshot, leg.authority, self.proxy.namespace, self.proxy.name)
        if why is not None:
            _log().info("HBONE CONNECT refused", authority=leg.authority, reason=why,
                      client=client_id)
            self.refused += 1
            conn.respond(leg, core.BAD_REQUEST)
            return
        ip, port = core.parse_authority(leg.authority)
        src_ip = core.parse_forwarded_for(leg.headers.get("forwarded", "")) or peer_ip
        conn.respond(leg, core.OK)
        pipe = StreamPipe(leg, (src_ip, 0))
        self.pipes.add(pipe)
        leg.on_done = lambda _leg: self._stream_done(pipe)
        info = ConnInfo(Peer(src_ip, client_id, snapshot.by_ip.get(src_ip)), (ip, port))
        Sniff(pipe, info, self.proxy)

    def _stream_done(self, pipe: StreamPipe) -> None:
        self.pipes.discard(pipe)
        pipe._leg_done(pipe.leg)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for c in list(self.connections):
            c.abort()
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2.0)


class HboneConnector:
    """Upstream byte pipes over HBONE, as the waypoint's identity."""

    def __init__(self, pool: ConnectionPool, identity: str, *, hbone_port: int = HBONE_PORT,
                 forwarded: str = "") -> None:
        self.pool = pool
        self.identity = identity
        self.hbone_port = hbone_port
        self.forwarded = forwarded

    async def connect(self, ep: EndpointRef, timeout_s: float) -> Pipe:
        if ep.workload is None:
            raise UpstreamError("connect-failure",
                                f"{ep.key} is not a mesh workload: no identity to expect")
        key = PoolKey(self.identity, ep.workload.identity, (ep.address, self.hbone_port))
        try:
            leg = await asyncio.wait_for(
                self.pool.open_stream(key, core.format_authority(ep.address, ep.port),
                                      forwarded=self.forwarded), timeout_s)
        except TunnelRefused as exc:
            kind = "connect-failure" if exc.status == core.SERVICE_UNAVAILABLE else "reset"
            raise UpstreamError(kind, str(exc)) from None
        except (PoolError, TunnelBroken, TimeoutError, OSError) as exc:
            raise UpstreamError("connect-failure", f"HBONE to {ep.key}: {exc}") from None
        return StreamPipe(leg)
