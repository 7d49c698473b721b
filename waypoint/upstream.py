"""Upstream connections: how the waypoint reaches an endpoint, and reuse of connections.

``Connector`` is the seam: ``TcpConnector`` dials the endpoint directly (tests
and benchmarks on loopback), ``waypoint.mesh.HboneConnector`` opens an HBONE
stream to the endpoint's node. ``Upstreams`` keeps HTTP/1.1 connections idle
per endpoint for keep-alive (at most ``maxRequestsPerConnection`` exchanges
each) and one multiplexed HTTP/2 connection per endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Final, Protocol

from waypoint.cluster import EndpointRef
from waypoint.http1 import H1Client
from waypoint.http2 import H2Client
from waypoint.pipe import Pipe, TcpPipe
from waypoint.request import Body, Request, RequestBody, Response, UpstreamError

IDLE_PER_ENDPOINT: Final = 64


class Connector(Protocol):
    async def connect(self, ep: EndpointRef, timeout_s: float) -> Pipe: ...


class TcpConnector:
    """Plain TCP to the endpoint (``resolve`` maps it elsewhere, e.g. loopback in tests)."""

    def __init__(self, resolve: Callable[[EndpointRef], tuple[str, int]] | None = None) -> None:
        self.resolve = resolve or (lambda ep: (ep.address, ep.port))
        self.dials = 0

    async def connect(self, ep: EndpointRef, timeout_s: float) -> Pipe:
        host, port = self.resolve(ep)
        loop = asyncio.get_running_loop()
        self.dials += 1
        try:
            _, proto = await asyncio.wait_for(loop.create_connection(TcpPipe, host, port),
                                              timeout_s)
        except (OSError, TimeoutError) as exc:
            raise UpstreamError("connect-failure",
                                f"cannot connect to {ep.key} ({host}:{port}): {exc}") from exc
        return proto


# RFC 9110 section 9.2.2: the idempotent methods
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def may_resend(client: H1Client, req: Request) -> bool:
    """Whether ``req``, which failed on the kept-alive connection ``client``, goes once more
    on a fresh connection: no byte of an answer came (most likely the upstream closed the
    connection as we reused it) and the method is idempotent. The upstream may still
    have applied the request before it closed; a non-idempotent one is not sent twice
    (RFC 9110 section 9.2.2; nginx does the same) and fails as the route's retry policy
    says."""
    return not client.answered and req.method in IDEMPOTENT


class Upstreams:
    def __init__(self, connector: Connector) -> None:
        self.connector = connector
        self._idle: dict[str, list[H1Client]] = {}
        self._h2: dict[str, H2Client] = {}
        self._h2_dialing: dict[str, asyncio.Lock] = {}
        self._busy: set[H1Client] = set()

    async def exchange(self, ep: EndpointRef, req: Request, body: Body, *,
                       connect_timeout_s: float = 10.0,
                       max_requests_per_connection: int = 0, stream: bool = False) -> Response:
        """One exchange with ``ep``. ``stream`` (HTTP/2 only): return at the response
        headers and relay the body as it comes (``Response.stream``)."""
        if req.http2:
            return await self._h2_exchange(ep, req, body, connect_timeout_s, stream)
        if isinstance(body, RequestBody):  # HTTP/1.1 upstream: it needs the whole body
            body = await body.wait_complete()
        client = self.idle_h1(ep)
        if client is not None:
            try:
                return await self._h1(client, ep, req, body, max_requests_per_connection)
            except UpstreamError:
                if not may_resend(client, req):
                    raise
        client = H1Client(await self.connector.connect(ep, connect_timeout_s))
        return await self._h1(client, ep, req, body, max_requests_per_connection)

    async def _h1(self, client: H1Client, ep: EndpointRef, req: Request, body: bytes,
                  max_requests_per_connection: int) -> Response:
        self._busy.add(client)
        ok = False
        try:
            resp = await client.request(req, body)
            ok = True
            return resp
        finally:
            self.done_h1(client, ep, ok, max_requests_per_connection)

    def idle_h1(self, ep: EndpointRef) -> H1Client | None:
        """A kept-alive HTTP/1.1 connection to ``ep`` taken for an exchange, if one is idle
        (``done_h1`` or ``idle_again`` gives it back)."""
        idle = self._idle.get(ep.key)
        while idle:
            c = idle.pop()
            if not c.closed:
                self._busy.add(c)
                return c
        return None

    def idle_again(self, client: H1Client, ep: EndpointRef) -> None:
        """``client`` (from ``idle_h1``) was not used after all."""
        self._busy.discard(client)
        self._idle.setdefault(ep.key, []).append(client)

    def done_h1(self, client: H1Client, ep: EndpointRef, ok: bool,
                max_requests_per_connection: int) -> None:
        """An exchange on ``client`` is over: kept for the next one if it may be reused."""
        self._busy.discard(client)
        limit = max_requests_per_connection
        if ok and client.recycle() and not (limit and client.requests >= limit):
            idle = self._idle.setdefault(ep.key, [])
            if len(idle) < IDLE_PER_ENDPOINT:
                idle.append(client)
            else:
                client.close()
        else:
            client.close()

    async def _h2_exchange(self, ep: EndpointRef, req: Request, body: Body,
                           connect_timeout_s: float, stream: bool) -> Response:
        client = self._h2.get(ep.key)
        if client is None or not client.usable:
            lock = self._h2_dialing.setdefault(ep.key, asyncio.Lock())
            async with lock:
                client = self._h2.get(ep.key)
                if client is None or not client.usable:
                    if client is not None:
                        client.close()
                    client = H2Client(await self.connector.connect(ep, connect_timeout_s))
                    self._h2[ep.key] = client
        return await client.request(req, body, stream=stream)

    async def raw(self, ep: EndpointRef, connect_timeout_s: float = 10.0) -> H1Client:
        """A fresh HTTP/1.1 connection for an Upgrade (never pooled)."""
        return H1Client(await self.connector.connect(ep, connect_timeout_s))

    def close(self) -> None:
        for idle in self._idle.values():
            for c in idle:
                c.close()
        self._idle.clear()
        for c in list(self._busy):
            c.close()
        for h in self._h2.values():
            with contextlib.suppress(Exception):
                h.close()
        self._h2.clear()
