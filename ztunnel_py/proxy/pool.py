"""The HBONE connection pool: one mTLS connection per (source identity, destination
identity, destination address), many streams on it.

* a connection carries up to ``max_streams_per_connection`` streams (and never
  more than the peer's SETTINGS_MAX_CONCURRENT_STREAMS); past that, a second
  connection is opened for the same key;
* establishment is single-flight: concurrent requests for a key with no
  usable connection wait for the one dial in progress;
* a connection with no streams is closed after ``idle_timeout_s``;
* a connection that breaks fails its streams at once (``connection_lost``)
  and leaves the pool; the next request dials a fresh one;
* the client checks the server's SPIFFE id against the destination identity
  it expected: a valid mesh certificate for someone else is refused.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from ztunnel_py import log
from ztunnel_py.config import HboneConfig
from ztunnel_py.hbone.aio import HboneProtocol, StreamLeg, TunnelBroken
from ztunnel_py.hbone.core import Role
from ztunnel_py.identity.certs import WorkloadCertificate
from ztunnel_py.identity.errors import IdentityError
from ztunnel_py.identity.manager import CertificateSource
from ztunnel_py.identity.tls import ALPN_H2, client_context, peer_identity, server_context
from ztunnel_py.proxy.sockets import UpstreamError, UpstreamFactory, connect, plain_upstream

_log = log.get("pool")


DialMap = Callable[[tuple[str, int]], tuple[str, int]]


def direct(address: tuple[str, int]) -> tuple[str, int]:
    """The default dial seam: HBONE goes to the destination's own ip:15008 (the capture on
    the destination node delivers it to that node's agent)."""
    return address


class PoolError(Exception):
    """An HBONE connection could not be established."""


class _NoAnswer(Exception):
    """The CONNECT got no response in time (becomes a PoolError)."""


def _give_up(response: asyncio.Future[StreamLeg]) -> None:
    if not response.done():
        response.set_exception(_NoAnswer())


class WrongPeerIdentity(PoolError):
    """The server proved an identity other than the destination's."""


@dataclass(frozen=True)
class PoolKey:
    src_identity: str
    dst_identity: str
    address: tuple[str, int]  # where the HBONE connection is dialled (…:15008)


class ContextCache:
    """TLS contexts per (identity, certificate serial); a rotated certificate gets a new one."""

    def __init__(self) -> None:
        self._client: dict[str, tuple[int, ssl.SSLContext]] = {}
        self._server: dict[str, tuple[int, ssl.SSLContext]] = {}

    def client(self, cert: WorkloadCertificate) -> ssl.SSLContext:
        return self._get(self._client, cert, client_context)

    def server(self, cert: WorkloadCertificate) -> ssl.SSLContext:
        return self._get(self._server, cert, server_context)

    @staticmethod
    def _get(
        cache: dict[str, tuple[int, ssl.SSLContext]],
        cert: WorkloadCertificate,
        build: Callable[[WorkloadCertificate], ssl.SSLContext],
    ) -> ssl.SSLContext:
        hit = cache.get(cert.identity)
        if hit is not None and hit[0] == cert.serial:
            return hit[1]
        ctx = build(cert)
        cache[cert.identity] = (cert.serial, ctx)
        return ctx


class ConnectionPool:
    def __init__(
        self,
        config: HboneConfig,
        certificates: CertificateSource,
        trust_domain: str,
        *,
        upstream: UpstreamFactory = plain_upstream,
        contexts: ContextCache | None = None,
        dial: DialMap | None = None,
    ) -> None:
        self.config = config
        self._certs = certificates
        self._trust_domain = trust_domain
        self._upstream = upstream
        self._contexts = contexts or ContextCache()
        self._dial_map = dial or direct
        self._conns: dict[PoolKey, list[HboneProtocol]] = {}
        self._dialing: dict[PoolKey, asyncio.Task[HboneProtocol]] = {}
        self._idle: dict[HboneProtocol, asyncio.TimerHandle] = {}
        self._keys: dict[HboneProtocol, PoolKey] = {}
        self.dials = 0  # connections established (for tests and the admin page)

    # -- public ------------------------------------------------------------------------

    async def open_stream(
        self,
        key: PoolKey,
        authority: str,
        *,
        forwarded: str = "",
        baggage: str = "",
        first: Callable[[StreamLeg], None] | None = None,
    ) -> StreamLeg:
        """A tunnel to ``authority`` through a pooled connection; raises on refusal.

        ``first(stream)`` runs once the CONNECT is queued, before the answer: what it
        sends on the stream (the client's first bytes, already read) goes out with the
        CONNECT, in the same TLS write, and waits at the far end until its upstream is
        connected; on a refusal it is dropped with the stream."""
        for attempt in range(2):
            conn = self._ready(key) or await self._connection(key)
            try:
                leg = conn.open_leg(authority, forwarded=forwarded, baggage=baggage)
            except TunnelBroken:
                if attempt:
                    raise
                continue
            self._touch(conn)
            if first is not None:
                first(leg)
            response = leg.response
            assert response is not None
            # a plain timer, not wait_for(shield(...)): two futures and their callbacks
            # fewer per tunnel
            timer = response.get_loop().call_later(
                self.config.connect_timeout_s * 2, _give_up, response
            )
            try:
                return await response
            except _NoAnswer:
                leg.reset()
                raise PoolError(
                    f"HBONE CONNECT {authority} via {key.address[0]}:{key.address[1]} got no "
                    "answer in time"
                ) from None
            except asyncio.CancelledError:
                leg.reset()  # nobody will use the stream: tell the peer
                raise
            finally:
                timer.cancel()
        raise PoolError("unreachable")  # pragma: no cover

    def connections(self, key: PoolKey | None = None) -> list[HboneProtocol]:
        if key is not None:
            return list(self._conns.get(key, ()))
        return [c for conns in self._conns.values() for c in conns]

    def close(self) -> None:
        """Close every pooled connection (their streams are failed)."""
        for task in self._dialing.values():
            task.cancel()
        for handle in self._idle.values():
            handle.cancel()
        self._idle.clear()
        for conn in self.connections():
            conn.close()

    async def wait_dials(self) -> None:
        tasks = list(self._dialing.values())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- internals -----------------------------------------------------------------

    def _usable(self, conn: HboneProtocol) -> bool:
        return (
            not conn.lost
            and conn.core.can_open
            and conn.active_streams < self.config.max_streams_per_connection
        )

    def _ready(self, key: PoolKey) -> HboneProtocol | None:
        for conn in self._conns.get(key, ()):
            if self._usable(conn):
                return conn
        return None

    async def _connection(self, key: PoolKey) -> HboneProtocol:
        while True:
            for conn in self._conns.get(key, ()):
                if self._usable(conn):
                    return conn
            task = self._dialing.get(key)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._dial(key))
                self._dialing[key] = task
                task.add_done_callback(functools.partial(self._dial_done, key))
            await asyncio.shield(task)
            # done callbacks run later: register now, or a done task would spin this loop
            self._dial_done(key, task)

    def _dial_done(self, key: PoolKey, task: asyncio.Task[HboneProtocol]) -> None:
        """Record a finished dial (idempotent: runs as a callback and from waiters)."""
        if self._dialing.get(key) is task:
            del self._dialing[key]
        if task.cancelled():
            return
        if task.exception() is None:
            conn = task.result()
            if not conn.lost and conn not in self._keys:
                self._conns.setdefault(key, []).append(conn)
                self._keys[conn] = key
                self._touch(conn)

    async def _dial(self, key: PoolKey) -> HboneProtocol:
        loop = asyncio.get_running_loop()
        timeout = self.config.connect_timeout_s
        host, port = address = self._dial_map(key.address)
        try:
            cert = await self._certs.fetch(key.src_identity)
            ctx = self._contexts.client(cert)
        except IdentityError as exc:
            raise PoolError(f"no certificate for {key.src_identity}: {exc}") from None
        try:
            sock = await connect(self._upstream, address, timeout)
        except UpstreamError as exc:
            raise PoolError(
                f"HBONE to {host}:{port}: {exc} (is the destination node's agent up, and port "
                f"{port} reachable?)"
            ) from None
        try:
            transport, proto = await loop.create_connection(
                lambda: HboneProtocol(
                    Role.CLIENT,
                    self.config,
                    on_closed=self._on_closed,
                    on_stream_done=self._on_stream_done,
                ),
                sock=sock,
                ssl=ctx,
                server_hostname="",
                ssl_handshake_timeout=timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            if sock.fileno() != -1:
                sock.close()
            raise PoolError(
                f"TLS handshake with {host}:{port} failed: {exc} (does the server trust our "
                "mesh root, and do we trust its?)"
            ) from None
        except BaseException:
            if sock.fileno() != -1:
                sock.close()
            raise
        try:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN_H2:
                raise PoolError(f"{host}:{port} did not negotiate ALPN h2: not an HBONE server")
            try:
                got = peer_identity(ssl_object, self._trust_domain)
            except IdentityError as exc:
                raise WrongPeerIdentity(f"HBONE server {host}:{port}: {exc}") from None
            if got != key.dst_identity:
                raise WrongPeerIdentity(
                    f"HBONE server {host}:{port} is {got}, expected {key.dst_identity}: "
                    "refusing to send traffic to the wrong workload"
                )
        except BaseException:
            transport.abort()
            raise
        self.dials += 1
        return proto

    def _touch(self, conn: HboneProtocol) -> None:
        """A stream started or ended: (re)arm or cancel the idle timer."""
        handle = self._idle.pop(conn, None)
        if handle is not None:
            handle.cancel()
        if conn.active_streams == 0 and not conn.lost and conn in self._keys:
            self._idle[conn] = asyncio.get_running_loop().call_later(
                self.config.idle_timeout_s, self._expire, conn
            )

    def _expire(self, conn: HboneProtocol) -> None:
        self._idle.pop(conn, None)
        if conn.active_streams == 0:
            self._remove(conn)
            conn.close()

    def _on_stream_done(self, conn: HboneProtocol, leg: StreamLeg) -> None:
        if not conn.lost:
            self._touch(conn)

    def _on_closed(self, conn: HboneProtocol, exc: BaseException | None) -> None:
        if exc is not None:
            _log.info("hbone connection lost", error=str(exc))
        self._remove(conn)

    def _remove(self, conn: HboneProtocol) -> None:
        handle = self._idle.pop(conn, None)
        if handle is not None:
            handle.cancel()
        key = self._keys.pop(conn, None)
        if key is None:
            return
        conns = self._conns.get(key, [])
        if conn in conns:
            conns.remove(conn)
        if not conns:
            self._conns.pop(key, None)
