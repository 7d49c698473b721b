"""HTTP/1.1 on ``h11``: the downstream server connection and the upstream client.

Both are ``Sink``s over a ``Pipe`` (``waypoint.pipe``). Bodies are buffered
whole (bounded by ``MAX_BODY``): the waypoint needs the full request to retry
it and to mirror it. Keep-alive is h11's: after a complete exchange both sides
start the next cycle; ``Connection: close`` or an HTTP/1.0 peer end the
connection. A request with ``Upgrade`` (WebSocket) is handed to the handler's
``upgrade``, which relays raw bytes both ways once the upstream agrees (101).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import h11

from waypoint.pipe import Pipe
from waypoint.request import (
    HOP_BY_HOP,
    Body,
    Headers,
    Peer,
    Request,
    Response,
    UpstreamError,
    normalise,
)
from ztunnel_py import log


def _log() -> Any:
    """Resolved at each use, so that ``log.configure`` (run after imports) applies."""
    return log.get("waypoint.http1")

MAX_BODY = 16 << 20
MAX_HEAD = 64 << 10


@dataclass(frozen=True)
class ConnInfo:
    """What the transport under an HTTP connection says about the client."""

    source: Peer
    dst: tuple[str, int]  # the address the client dialled (HBONE authority, or the listener)


class Handler(Protocol):
    async def handle(self, req: Request, body: Body) -> Response: ...

    async def upgrade(self, req: Request, server: H1Server) -> None: ...


class Serving(Handler, Protocol):
    """A handler that also runs the per-request tasks (``WaypointProxy``)."""

    def spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]: ...


def reason(status: int) -> bytes:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _response_headers(resp: Response, body_len: int) -> list[tuple[str, str]]:
    out = [(k, v) for k, v in resp.headers if k not in HOP_BY_HOP]
    out.append(("content-length", str(body_len)))
    return out


class H1Server:
    """One downstream HTTP/1.1 connection."""

    def __init__(self, pipe: Pipe, info: ConnInfo, handler: Handler,
                 spawn: Callable[[Awaitable[None]], asyncio.Task[None]]) -> None:
        self.pipe = pipe
        self.info = info
        self.handler = handler
        self.spawn = spawn
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._req: h11.Request | None = None
        self._body = bytearray()
        self._busy = False
        self._task: asyncio.Task[None] | None = None
        self.raw: Callable[[bytes], None] | None = None  # set once upgraded
        self.raw_eof: Callable[[], None] | None = None
        self.closed = False

    # -- Sink --

    def on_data(self, data: bytes) -> None:
        if self.raw is not None:
            self.raw(data)
            return
        try:
            self.conn.receive_data(data)
        except h11.RemoteProtocolError:
            self._fail(400)
            return
        self._process()

    def on_eof(self) -> None:
        if self.raw_eof is not None:
            self.raw_eof()
            return
        with contextlib.suppress(h11.RemoteProtocolError):
            self.conn.receive_data(b"")
        self._process()

    def on_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        if self.raw_eof is not None:
            self.raw_eof()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    # -- parsing --

    def _process(self) -> None:
        while not self._busy and not self.closed:
            try:
                ev = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._fail(exc.error_status_hint)
                return
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return
            if isinstance(ev, h11.Request):
                self._req = ev
                self._body = bytearray()
            elif isinstance(ev, h11.Data):
                self._body += ev.data
                if len(self._body) > MAX_BODY:
                    self._fail(413)
                    return
            elif isinstance(ev, h11.EndOfMessage):
                assert self._req is not None
                self._busy = True
                self._task = self.spawn(self._serve(self._req, bytes(self._body)))
            elif isinstance(ev, h11.ConnectionClosed):
                self._close()
                return

    def request_of(self, ev: h11.Request) -> Request:
        headers = normalise(ev.headers)
        authority = next((v for k, v in headers if k == "host"), "")
        upgrade = any(k == "upgrade" for k, _ in headers)
        kept = tuple((k, v) for k, v in headers if k not in HOP_BY_HOP)
        if upgrade:
            kept += tuple((k, v) for k, v in headers if k in ("upgrade", "connection"))
        content_type = next((v for k, v in kept if k == "content-type"), "")
        return Request(
            method=ev.method.decode(), path=ev.target.decode("latin-1"), authority=authority,
            headers=kept, port=self.info.dst[1], source=self.info.source, dst=self.info.dst[0],
            grpc=content_type.startswith("application/grpc"),
        )

    async def _serve(self, ev: h11.Request, body: bytes) -> None:
        req = self.request_of(ev)
        if any(k == "upgrade" for k, _ in req.headers):
            await self.handler.upgrade(req, self)
            return
        try:
            resp = await self.handler.handle(req, body)
            if resp.stream is not None:  # HTTP/1.1 downstream: collect it
                stream, resp.stream = resp.stream, None
                try:
                    resp.body = await stream.read_all()
                    resp.trailers = stream.trailers
                finally:
                    if not stream.finished:
                        stream.cancel()
        except asyncio.CancelledError:
            raise
        except UpstreamError as exc:
            resp = Response(503, (("content-type", "text/plain"),),
                            f"upstream reset: {exc}".encode())
        except Exception:
            _log().exception("waypoint handler failed")
            resp = Response(500, (("content-type", "text/plain"),), b"internal error")
        self.respond(resp)

    def respond(self, resp: Response) -> None:
        if self.closed:
            return
        try:
            data = self.conn.send(h11.Response(
                status_code=resp.status, headers=_response_headers(resp, len(resp.body)),
                reason=reason(resp.status),
            ))
            data = (data or b"") + (self.conn.send(h11.Data(data=resp.body)) or b"") \
                if resp.body else (data or b"")
            data += self.conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            self._close()
            return
        self.pipe.write(data)
        self._next_cycle()

    def _next_cycle(self) -> None:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            self._busy = False
            self._req = None
            self._process()
        else:
            self._close()

    def switch(self, status_line: h11.InformationalResponse) -> bytes:
        """Send the upstream's 101 and go raw; returns bytes the client sent after the
        request (already part of the new protocol)."""
        self.pipe.write(self.conn.send(status_line) or b"")
        trailing, _closed = self.conn.trailing_data
        return bytes(trailing)

    def _fail(self, status: int) -> None:
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(h11.LocalProtocolError):
                body = reason(status)
                data = self.conn.send(h11.Response(
                    status_code=status,
                    headers=[("content-length", str(len(body))), ("connection", "close")],
                ))
                data = (data or b"") + (self.conn.send(h11.Data(data=body)) or b"")
                data += self.conn.send(h11.EndOfMessage()) or b""
                self.pipe.write(data)
        self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pipe.close()


# -- upstream ----------------------------------------------------------------------------


class H1Client:
    """One upstream HTTP/1.1 connection: one exchange at a time, reused when clean."""

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self.closed = False
        self.requests = 0
        self.answered = False  # any byte of a response to the current request
        self._waiter: asyncio.Future[None] | None = None
        self._head: h11.Response | h11.InformationalResponse | None = None
        self._body = bytearray()
        self._done = False
        self._error: UpstreamError | None = None
        self.raw: Callable[[bytes], None] | None = None
        self.raw_eof: Callable[[], None] | None = None
        pipe.set_sink(self)

    def on_data(self, data: bytes) -> None:
        if self.raw is not None:
            self.raw(data)
            return
        self.answered = True
        try:
            self.conn.receive_data(data)
        except h11.RemoteProtocolError as exc:
            self._fail(UpstreamError("reset", f"bad HTTP/1.1 from upstream: {exc}"))
            return
        self._process()

    def on_eof(self) -> None:
        if self.raw_eof is not None:
            self.raw_eof()
            return
        with contextlib.suppress(h11.RemoteProtocolError):
            self.conn.receive_data(b"")
        self._process()

    def on_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        if self.raw_eof is not None:
            self.raw_eof()
        self._fail(UpstreamError("reset", f"upstream connection closed: {exc or 'EOF'}"))

    def _fail(self, err: UpstreamError) -> None:
        self._error = err
        self.closed = True
        self.pipe.close()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _process(self) -> None:
        while True:
            try:
                ev = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._fail(UpstreamError("reset", f"bad HTTP/1.1 from upstream: {exc}"))
                return
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                if ev is h11.PAUSED and isinstance(self._head, h11.InformationalResponse):
                    self._wake()
                return
            if isinstance(ev, h11.InformationalResponse):
                if ev.status_code == 101:
                    self._head = ev
                    self._wake()
                    return
            elif isinstance(ev, h11.Response):
                self._head = ev
            elif isinstance(ev, h11.Data):
                self._body += ev.data
                if len(self._body) > MAX_BODY:
                    self._fail(UpstreamError("reset", "upstream response body too large"))
                    return
            elif isinstance(ev, h11.EndOfMessage):
                self._done = True
                self._wake()
                return
            elif isinstance(ev, h11.ConnectionClosed):
                self._fail(UpstreamError("reset", "upstream closed the connection"))
                return

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _send(self, req: Request, body: bytes, *, upgrade: bool = False) -> None:
        headers: list[tuple[str, str]] = [("host", req.authority)]
        headers += [(k, v) for k, v in req.headers
                    if k not in HOP_BY_HOP or (upgrade and k in ("upgrade", "connection"))]
        if not upgrade or body:
            headers.append(("content-length", str(len(body))))
        data = self.conn.send(h11.Request(method=req.method, target=req.path, headers=headers))
        out = data or b""
        if body:
            out += self.conn.send(h11.Data(data=body)) or b""
        out += self.conn.send(h11.EndOfMessage()) or b""
        self.pipe.write(out)

    async def request(self, req: Request, body: bytes) -> Response:
        """One exchange; ``UpstreamError`` if the connection fails before the response."""
        if self.closed:
            raise UpstreamError("reset", "upstream connection already closed")
        self.requests += 1
        self.answered = False
        self._head, self._body, self._done, self._error = None, bytearray(), False, None
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            self._send(req, body)
        except h11.LocalProtocolError as exc:
            raise UpstreamError("reset", f"cannot send request: {exc}") from exc
        self._process()
        if not self._done and self._error is None:
            await self._waiter
        if self._error is not None and not self._done:
            raise self._error
        head = self._head
        assert isinstance(head, h11.Response)
        return Response(head.status_code, normalise(head.headers), bytes(self._body))

    async def upgrade(self, req: Request) -> tuple[h11.Response | h11.InformationalResponse,
                                                   bytes, bytes]:
        """Send an Upgrade request; (response head, body if refused, bytes after the 101)."""
        self._head, self._body, self._done, self._error = None, bytearray(), False, None
        self._waiter = asyncio.get_running_loop().create_future()
        self._send(req, b"", upgrade=True)
        self._process()
        if self._head is None and self._error is None and not self._done:
            await self._waiter
        if self._error is not None and self._head is None:
            raise self._error
        assert self._head is not None
        if isinstance(self._head, h11.InformationalResponse):
            trailing, _ = self.conn.trailing_data
            return self._head, b"", bytes(trailing)
        if not self._done and self._error is None:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._head, bytes(self._body), b""

    def recycle(self) -> bool:
        """Ready the connection for another exchange; False if it cannot be reused."""
        if self.closed or self.raw is not None:
            return False
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            return True
        return False

    def close(self) -> None:
        """Close the connection (also after a failure: a half-closed transport must still
        be closed)."""
        self.closed = True
        self.pipe.close()


def headers_of(resp: Response) -> Headers:
    return tuple((k, v) for k, v in resp.headers if k not in HOP_BY_HOP)
