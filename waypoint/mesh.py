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
from ztunnel_py.state.model import WaypointRef
from ztunnel_py.state.snapshot import Snapshot


def _log() -> Any:
    """Resolved at each use, so that ``log.configure`` (run after imports) applies."""
    return log.get("waypoint.hbone")


def serves(snapshot: Snapshot, authority: str, namespace: str, name: str) -> str | None:
    """Why a CONNECT to ``authority`` is refused, or None when the waypoint serves it:
    a service VIP or a workload IP of the mesh bound to this waypoint (by
    ``istio.io/use-waypoint``), as Istio's waypoint serves only what uses it. Pure."""
    try:
        ip, port = core.parse_authority(authority)
    except core.BadRequest as exc:
        return str(exc)
    me = WaypointRef(name, namespace)
    svc = snapshot.service_for(ip, port)
    if svc is not None:
        if svc.waypoint == me:
            return None
        return (f"service {svc.namespace}/{svc.name} does not use the waypoint "
                f"{namespace}/{name}")
    w = snapshot.by_ip.get(ip)
    if w is not None and not w.is_waypoint:
        if w.waypoint == me:
            return None
        return f"workload {w.namespace}/{w.name} does not use the waypoint {namespace}/{name}"
    return f"{authority} is neither a service nor a workload the waypoint {namespace}/{name} serves"


class _ServerConnection(HboneProtocol):
    """An accepted HBONE connection, handed over once TLS is up: checks ALPN and the
    client's SPIFFE id, then serves CONNECT streams."""

    def __init__(self, listener: HboneListener) -> None:
        super().__init__(Role.SERVER, listener.config, on_closed=listener._closed)
        self.listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = typing.cast(asyncio.Transport, transport)
        listener = self.listener
        peer = t.get_extra_info("peername")
        ssl_object = t.get_extra_info("ssl_object")
        try:
            if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN_H2:
                raise IdentityError("the client did not negotiate ALPN h2")
            client_id = peer_identity(ssl_object, listener.trust_domain)
        except IdentityError as exc:
            _log().info("HBONE client refused", peer=str(peer), error=str(exc))
            listener.refused += 1
            t.abort()
            return
        peer_ip = str(peer[0]) if peer else ""
        self.set_connect_handler(lambda leg: listener._stream(self, leg, client_id, peer_ip))
        listener.connections.add(self)
        listener.refresh_soon()
        super().connection_made(t)


class HboneListener:
    """HBONE on ``host:port`` with the waypoint's certificate.

    TLS is set up by the listening server itself (``create_server(ssl=...)``), so that
    no client byte can arrive before TLS is in place; a rotated certificate is swapped
    in for new handshakes through the context's SNI callback (OpenSSL calls it for
    every ClientHello)."""

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
        refresh_s: float = 30.0,
    ) -> None:
        self.proxy = proxy
        self.certificates = certificates
        self.identity = identity
        self.trust_domain = trust_domain
        self.host = host
        self.port = port
        self.config = config or HboneConfig()
        self.contexts = contexts or ContextCache()
        self.refresh_s = refresh_s
        self.server: asyncio.Server | None = None
        self.connections: set[HboneProtocol] = set()
        self.pipes: set[StreamPipe] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.refused = 0
        self._ctx: ssl.SSLContext | None = None
        self._refreshing = False
        self._last_refresh = 0.0

    def spawn(self, coro: typing.Coroutine[typing.Any, typing.Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _context(self) -> ssl.SSLContext:
        ctx = self.contexts.server(await self.certificates.fetch(self.identity))
        if ctx is not self._ctx:
            ctx.sni_callback = self._sni
            self._ctx = ctx
        return ctx

    def _sni(self, ssl_object: ssl.SSLObject, _name: str | None,
             _ctx: ssl.SSLContext) -> None:
        if self._ctx is not None and ssl_object.context is not self._ctx:
            ssl_object.context = self._ctx  # the latest certificate
        return None

    def refresh_soon(self) -> None:
        """Pick up a rotated certificate (at most every ``refresh_s``)."""
        now = asyncio.get_running_loop().time()
        if self._refreshing or now - self._last_refresh < self.refresh_s:
            return
        self._refreshing = True
        self._last_refresh = now

        async def refresh() -> None:
            try:
                await self._context()
            except IdentityError as exc:
                _log().warning("cannot refresh the waypoint certificate", error=str(exc))
            finally:
                self._refreshing = False

        self.spawn(refresh())

    async def start(self) -> tuple[str, int]:
        """Listen; raises ``IdentityError`` if the waypoint has no certificate."""
        ctx = await self._context()
        self._last_refresh = asyncio.get_running_loop().time()
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _ServerConnection(self), self.host, self.port, backlog=4096, ssl=ctx,
            ssl_handshake_timeout=self.config.connect_timeout_s)
        sock = self.server.sockets[0].getsockname()
        self.port = int(sock[1])
        return str(sock[0]), self.port

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
