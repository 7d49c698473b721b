"""HTTP/1.1 on ``httptools`` (llhttp): the downstream server connection and the upstream client.

Both are ``Sink``s over a ``Pipe`` (``waypoint.pipe``) and feed what they read
to an llhttp parser, whose callbacks collect one message at a time. Bodies are
buffered whole (bounded by ``MAX_BODY``): the waypoint needs the full request
to retry it and to mirror it. Heads are bounded by ``MAX_HEAD`` (431 past it).

Server side: requests are answered one at a time and in order; pipelined
requests wait in a queue (bounded). A malformed request, an oversized head or
body take their place in that queue as an error answer (400 / 431 / 413) after
which the connection is closed. Keep-alive follows llhttp's reading of the
request (``Connection: close``, HTTP/1.0 without ``keep-alive``). A request
with ``Connection: Upgrade`` + ``Upgrade`` (WebSocket) is handed to the
handler's ``upgrade``, which relays raw bytes both ways once the upstream
agrees (101); if it refuses, the connection goes on as HTTP/1.1.

Responses and upstream requests are written as one byte string per message
(head and body together, one ``write``) built from pre-encoded status lines;
a header value carrying CR or LF (say from a misconfigured header operation)
is refused rather than written.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, Protocol

import httptools

from waypoint.pipe import Pipe
from waypoint.request import (
    HOP_BY_HOP,
    Body,
    Headers,
    Peer,
    Request,
    Response,
    UpstreamError,
)
from ztunnel_py import log
from ztunnel_py.telemetry.http import reason


def _log() -> Any:
    """Resolved at each use, so that ``log.configure`` (run after imports) applies."""
    return log.get("waypoint.http1")


MAX_BODY: Final = 16 << 20
MAX_HEAD: Final = 64 << 10
MAX_PIPELINED: Final = 64  # requests read ahead of the one being answered


@dataclass(frozen=True)
class ConnInfo:
    """What the transport under an HTTP connection says about the client."""

    source: Peer
    dst: tuple[str, int]  # the address the client dialled (HBONE authority, or the listener)


class Handler(Protocol):
    async def handle(self, req: Request, body: Body) -> Response: ...

    def handle_now(self, req: Request, body: bytes, server: H1Server) -> None:
        """Answer through ``server.respond``, on callbacks, or through ``server.follow``."""

    async def upgrade(self, req: Request, server: H1Server) -> None: ...


class Serving(Handler, Protocol):
    """A handler that also runs the per-request tasks (``WaypointProxy``)."""

    def spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]: ...


_STATUS_LINES: Final[dict[int, str]] = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n" for s in HTTPStatus
}


def status_line(status: int) -> str:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} \r\n"  # a code without a registered reason phrase
    return line


class BadHead(ValueError):
    """A message head we refuse to write: a CR or LF inside a value, or a value that
    is not latin-1."""


class Head:
    """A message head, built as pieces and joined once (a string per piece, not one more
    per line): ``Head(first_line).field(name, value)...encode()``."""

    def __init__(self, first_line: str) -> None:
        """``first_line`` ends with CRLF (a status line, a request line)."""
        self.parts = [first_line]
        self.lines = 1

    def field(self, name: str, value: str) -> None:
        parts = self.parts
        parts.append(name)
        parts.append(": ")
        parts.append(value)
        parts.append("\r\n")
        self.lines += 1

    def encode(self) -> bytes:
        """The head, the blank line included. A CR or LF anywhere but at the end of a line
        would split a header in two (response splitting): counted, not hoped."""
        self.parts.append("\r\n")
        text = "".join(self.parts)
        n = self.lines + 1
        if text.count("\n") != n or text.count("\r") != n:
            raise BadHead("a header name or value contains CR or LF")
        try:
            return text.encode("latin-1")
        except UnicodeEncodeError as exc:
            raise BadHead(f"a header value is not latin-1: {exc}") from exc


_METHODS: Final = {m.encode(): m for m in ("GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS",
                                      "PATCH", "TRACE", "CONNECT")}


# Header names as they come off the wire -> lower-case text. A proxy sees the same few
# dozen names over and over: one dict lookup instead of a decode and a lower() each
# (bounded: cleared when full, so odd names cannot grow it without limit).
_NAMES: Final[dict[bytes, str]] = {}
NAME_CACHE_SIZE: Final = 1024


def header_name(raw: bytes) -> str:
    name = _NAMES.get(raw)
    if name is None:
        if len(_NAMES) >= NAME_CACHE_SIZE:
            _NAMES.clear()
        name = _NAMES[raw] = raw.decode("latin-1").lower()
    return name


class _Names:
    """A connection's header names as text, remembered by position: a peer sends the same
    names in the same order message after message, and comparing two short byte strings
    costs less than hashing a fresh one for ``header_name``'s cache."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []
        self.text: list[str] = []

    def name(self, i: int, raw: bytes) -> str:
        """The ``i``-th header's name of the message being read, as ``header_name``."""
        if i < len(self.raw):
            if self.raw[i] == raw:
                return self.text[i]
            name = header_name(raw)
            self.raw[i] = raw
            self.text[i] = name
            return name
        name = header_name(raw)
        if i == len(self.raw):
            self.raw.append(raw)
            self.text.append(name)
        return name


class _Reject(Exception):
    """Raised from a parser callback: answer ``status`` and close."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _HeadOnly(Exception):
    """Raised from the response parser's callback: a response to HEAD has no body."""


@dataclass(init=False)
class _Incoming:
    """One complete request read from the client, waiting for its turn."""

    request: Request
    body: bytes
    keep_alive: bool
    http10: bool
    upgrade: bool

    # written out, not made by @dataclass: compiled (``ztunnel_py.native``)
    def __init__(self, request: Request, body: bytes, keep_alive: bool, http10: bool,
                 upgrade: bool) -> None:
        self.request = request
        self.body = body
        self.keep_alive = keep_alive
        self.http10 = http10
        self.upgrade = upgrade


class H1Server:
    """One downstream HTTP/1.1 connection."""

    def __init__(self, pipe: Pipe, info: ConnInfo, handler: Handler,
                 spawn: Callable[[Awaitable[None]], asyncio.Task[None]]) -> None:
        self.pipe = pipe
        self.info = info
        self.handler = handler
        self.spawn = spawn
        self.parser = httptools.HttpRequestParser(self)
        self._queue: deque[_Incoming | int] = deque()  # an int: an error status to answer
        self._busy = False
        self._task: asyncio.Task[None] | None = None
        self._current: _Incoming | None = None
        self._deaf = False  # after a parse error: nothing more is read
        self._eof = False
        self._held: bytearray | None = None  # bytes after an Upgrade request, until decided
        self.raw: Callable[[bytes], None] | None = None  # set once upgraded
        self.raw_eof: Callable[[], None] | None = None
        self.closed = False
        # the message being parsed
        self._in_head = False
        self._fresh = False
        self._partial = 0
        self._url = b""
        self._raw: list[tuple[bytes, bytes]] = []
        self._names = _Names()
        self._headers: list[tuple[str, str]] = []
        self._authority = ""
        self._connection = ""
        self._upgrade_hdrs: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._body_len = 0
        self._keep = True

    # -- Sink --

    def on_data(self, data: bytes) -> None:
        if self.raw is not None:
            self.raw(data)
            return
        if self._deaf or self.closed:
            return
        if self._held is not None:  # an Upgrade request is being decided
            self._held += data
            if len(self._held) > MAX_BODY:
                self._reject(413)
            return
        self._fresh = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as up:
            self._held = bytearray(data[int(up.args[0]):])
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self._reject(cause.status if isinstance(cause, _Reject) else 400)
        except httptools.HttpParserError:
            self._reject(400)
        else:
            if self._in_head:  # a head still incomplete: bounded too
                self._partial = 0 if self._fresh else self._partial + len(data)
                if self._partial > MAX_HEAD:
                    self._reject(431)
        self._pump()

    def on_eof(self) -> None:
        if self.raw_eof is not None:
            self.raw_eof()
            return
        self._eof = True
        if self._in_head or self._body_len:  # cut off in the middle of a request
            self._reject(400)
        self._pump()

    def on_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        if self.raw_eof is not None:
            self.raw_eof()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    # -- parser callbacks (llhttp) --

    def on_message_begin(self) -> None:
        self._in_head = True
        self._fresh = True
        self._partial = 0
        self._url = b""
        self._raw = []
        self._body = []
        self._body_len = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # (request trailers are not forwarded over HTTP/1.1)
            self._raw.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        if len(self._queue) >= MAX_PIPELINED:
            raise _Reject(503)
        size = len(self._url)
        headers: list[tuple[str, str]] = []
        authority = connection = ""
        upgrade: list[tuple[str, str]] = []
        expect = False
        names = self._names
        for i, (name, value) in enumerate(self._raw):
            size += len(name) + len(value) + 4
            k = names.name(i, name)
            v = value.decode("latin-1")
            if k not in HOP_BY_HOP:
                if k == "expect":
                    expect = v.lower() == "100-continue"
                else:
                    headers.append((k, v))
            elif k == "host":
                authority = v
            elif k == "connection":
                connection = f"{connection},{v}" if connection else v
                upgrade.append((k, v))
            elif k == "upgrade":
                upgrade.append((k, v))
        if size > MAX_HEAD:
            raise _Reject(431)
        self._headers, self._authority, self._connection = headers, authority, connection
        self._upgrade_hdrs = upgrade
        self._keep = self.parser.should_keep_alive()
        if expect and not self._queue and not self._busy:
            # The client waits for this before it sends the body; we want the body.
            self.pipe.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_len += len(body)
        if self._body_len > MAX_BODY:
            raise _Reject(413)
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self.parser
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method) or raw_method.decode("latin-1")
        upgrade = parser.should_upgrade()
        if upgrade and method == "CONNECT":
            raise _Reject(405)  # the waypoint is not a forward proxy
        headers = self._headers
        if self._connection:
            headers = _drop_nominated(headers, self._connection)
        if upgrade:
            headers = headers + self._upgrade_hdrs
        grpc = False
        for k, v in headers:
            if k == "content-type":
                grpc = v.startswith("application/grpc")
                break
        info = self.info
        body = self._body
        self._queue.append(_Incoming(
            Request(method, self._url.decode("latin-1"), self._authority, tuple(headers),
                    info.dst[1], "http", info.source, grpc, info.dst[0], False),
            body[0] if len(body) == 1 else b"".join(body),
            # HTTP/1.0 only matters to a kept connection, and 1.0 is kept only when it
            # asked (Connection: keep-alive): the version string is built only then
            self._keep,
            self._keep and bool(self._connection) and parser.get_http_version() == "1.0",
            upgrade,
        ))
        self._body = []
        self._body_len = 0

    # -- answering, in order --

    def _reject(self, status: int) -> None:
        """A request we cannot read: its error answer waits its turn, then we close."""
        self._deaf = True
        self._in_head = False
        self._queue.append(status)

    def _pump(self) -> None:
        while not self._busy and not self.closed and self._queue:
            item = self._queue.popleft()
            if isinstance(item, int):
                self._fail(item)
                return
            self._busy = True
            self._current = item
            if item.upgrade:
                self._task = self.spawn(self._upgrade(item.request))
                continue
            try:
                self.handler.handle_now(item.request, item.body, self)
            except Exception:
                self.failed(item)
        if not self._busy and not self._queue and self._eof and self._held is None:
            self._close()

    @property
    def current(self) -> object:
        """The request being answered (an opaque token for ``failed``)."""
        return self._current

    def failed(self, item: object) -> None:
        """The handler failed on ``item`` (a bug, not bad input): 500 unless answered."""
        _log().exception("waypoint handler failed")
        if self._current is item and self._busy:
            self.respond(Response(500, (("content-type", "text/plain"),), b"internal error"))

    async def _upgrade(self, req: Request) -> None:
        try:
            await self.handler.upgrade(req, self)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.failed(self._current)

    def follow(self, answer: Coroutine[Any, Any, Response]) -> None:
        """Answer the current request with what ``answer`` gives, run as a task (cancelled
        if the client goes away)."""
        self._task = self.spawn(self._answer(answer))

    async def _answer(self, answer: Coroutine[Any, Any, Response]) -> None:
        try:
            resp = await answer
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
            self.failed(self._current)
            return
        self.respond(resp)

    def respond(self, resp: Response) -> None:
        """Answer the request being served; then the next one (or close)."""
        if self.closed:
            return
        item = self._current
        keep = item is not None and item.keep_alive
        body = resp.body
        status = resp.status
        head_only = item is not None and item.request.method == "HEAD"
        out = Head(status_line(status))
        for k, v in resp.headers:
            if k not in HOP_BY_HOP:
                out.field(k, v)
        if status == 204 or status == 304 or status < 200:
            body = b""  # no body, and no length to announce (RFC 9110 8.6)
        elif head_only and not body:  # the length a GET would get, as the upstream said
            out.field("content-length",
                      next((v for k, v in resp.headers if k == "content-length"), "0"))
        else:
            out.field("content-length", str(len(body)))
        if not keep:
            out.field("connection", "close")
        elif item is not None and item.http10:
            out.field("connection", "keep-alive")
        try:
            head = out.encode()
        except BadHead as exc:
            _log().warning("response not sent", error=str(exc), status=resp.status)
            self._fail(502)
            return
        if head_only:
            self.pipe.write(head)
        else:
            self.pipe.write(head + body if body else head)
        if not keep:
            self._close()
            return
        self._busy = False
        self._current = None
        if item is not None and item.upgrade and self._held is not None:
            held, self._held = bytes(self._held), None  # refused: HTTP/1.1 goes on
            if held:
                self.on_data(held)
                return
        self._pump()

    def switch(self, resp: Response) -> bytes:
        """Send the upstream's 101 and go raw; returns bytes the client sent after the
        request (already part of the new protocol)."""
        out = Head(status_line(101))
        for k, v in resp.headers:
            if k not in ("content-length", "transfer-encoding"):
                out.field(k, v)
        self.pipe.write(out.encode())
        held, self._held = self._held, None
        self._busy = False
        return bytes(held or b"")

    def _fail(self, status: int) -> None:
        body = reason(status).encode()
        self.pipe.write(
            f"{status_line(status)}content-length: {len(body)}\r\n"
            "connection: close\r\n\r\n".encode() + body)
        self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pipe.close()


def _drop_nominated(headers: list[tuple[str, str]], connection: str) -> list[tuple[str, str]]:
    """Drop the headers ``Connection`` names as hop-by-hop (RFC 9110 7.6.1)."""
    named = {t.strip().lower() for t in connection.split(",")} - {"keep-alive", "close",
                                                                  "upgrade", ""}
    if not named:
        return headers
    return [(k, v) for k, v in headers if k not in named]


# -- upstream ----------------------------------------------------------------------------


def request_head(req: Request, body_len: int | None, *, upgrade: bool = False) -> bytes:
    """The upstream request's head (``body_len`` None: no ``content-length``)."""
    if " " in req.path or not req.path:
        raise BadHead(f"request target {req.path!r} is not valid")
    out = Head(f"{req.method} {req.path} HTTP/1.1\r\n")
    out.field("host", req.authority)
    for k, v in req.headers:
        if k not in HOP_BY_HOP or (upgrade and (k == "upgrade" or k == "connection")):
            out.field(k, v)
    if body_len is not None:
        out.field("content-length", str(body_len))
    return out.encode()


class H1Client:
    """One upstream HTTP/1.1 connection: one exchange at a time, reused when clean."""

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.requests = 0
        self.answered = False  # any byte of a response to the current request
        self._waiter: asyncio.Future[None] | None = None
        self._on_done: Callable[[H1Client], None] | None = None
        self._status = 0
        self._names = _Names()
        self._headers: list[tuple[str, str]] = []
        self._trailers: list[tuple[str, str]] | None = None  # made when one arrives
        self._body: list[bytes] = []
        self._body_len = 0
        self._in_head = False
        self._interim = False
        self._head_only = False
        self._done = False
        self._keep = False
        self._switched = False
        self._trailing = b""
        self._error: UpstreamError | None = None
        self.raw: Callable[[bytes], None] | None = None
        self.raw_eof: Callable[[], None] | None = None
        pipe.set_sink(self)

    # -- Sink --

    def on_data(self, data: bytes) -> None:
        if self.raw is not None:
            self.raw(data)
            return
        if self._switched:  # after the 101, before the relay is wired up
            self._trailing += data
            return
        self.answered = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as up:
            self._switched = True
            self._trailing = data[int(up.args[0]):]
            self._wake()
        except httptools.HttpParserCallbackError as cb_error:
            if isinstance(cb_error.__context__, _HeadOnly):
                # llhttp would wait for the body a HEAD response announces: start over.
                self.parser = httptools.HttpResponseParser(self)
                self._wake()
                return
            self._fail(UpstreamError("reset",
                                     f"bad HTTP/1.1 from upstream: {cb_error.__context__}"))
        except httptools.HttpParserError as parse_error:  # (one name per type: mypyc)
            self._fail(UpstreamError("reset", f"bad HTTP/1.1 from upstream: {parse_error}"))

    def on_eof(self) -> None:
        if self.raw_eof is not None:
            self.raw_eof()
            return
        if self._status and not self._in_head and not self._done and not any(
                k == "content-length" or k == "transfer-encoding" for k, _ in self._headers):
            self._done = True  # a body delimited by the end of the connection
            self._keep = False
            self._wake()
            return
        if not self._done:
            self._fail(UpstreamError("reset", "upstream closed the connection"))
        else:  # idle (or answered): never reused
            self.close()

    def on_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        if self.raw_eof is not None:
            self.raw_eof()
        self._fail(UpstreamError("reset", f"upstream connection closed: {exc or 'EOF'}"))

    # -- parser callbacks (llhttp) --

    def on_message_begin(self) -> None:
        self._in_head = True
        self._interim = False
        self._headers = []
        self._trailers = None
        self._body = []
        self._body_len = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        if self._in_head:
            headers.append((self._names.name(len(headers), name), value.decode("latin-1")))
            return
        if self._trailers is None:
            self._trailers = []
        self._trailers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._interim = True  # 100 Continue and friends: the answer follows
            return
        self._status = status
        if self._head_only:
            self._done = True
            self._keep = self.parser.should_keep_alive()
            raise _HeadOnly

    def on_body(self, body: bytes) -> None:
        self._body_len += len(body)
        if self._body_len > MAX_BODY:
            raise UpstreamError("reset", "upstream response body too large")
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._interim:
            return
        self._keep = self.parser.should_keep_alive()
        self._done = True
        self._wake()

    # -- exchanges --

    def _fail(self, err: UpstreamError) -> None:
        self._error = err
        self.closed = True
        self.pipe.close()
        self._wake()

    def _wake(self) -> None:
        on_done = self._on_done
        if on_done is not None:
            self._on_done = None
            on_done(self)
        elif self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _start(self, req: Request, on_done: Callable[[H1Client], None] | None = None) -> None:
        if self.closed:
            raise UpstreamError("reset", "upstream connection already closed")
        self.answered = False
        self._status, self._done, self._error, self._switched = 0, False, None, False
        self._head_only = req.method == "HEAD"
        self._on_done = on_done  # (the message's lists are fresh from on_message_begin)
        self._waiter = None if on_done is not None else \
            asyncio.get_running_loop().create_future()

    def _response(self) -> Response:
        body = self._body
        return Response(self._status, tuple(self._headers),
                        body[0] if len(body) == 1 else b"".join(body),
                        tuple(self._trailers) if self._trailers else ())

    def begin(self, req: Request, body: bytes, on_done: Callable[[H1Client], None]) -> None:
        """One exchange on callbacks: the request is written now; ``on_done(self)`` once
        the response is in or the connection failed, then ``result()`` tells which.
        ``UpstreamError`` (nothing sent) if the request cannot be written."""
        self._start(req, on_done)
        try:
            self._send(req, body)
        except UpstreamError:
            self._on_done = None
            raise

    def _send(self, req: Request, body: bytes) -> None:
        try:
            head = request_head(req, len(body))
        except BadHead as exc:
            raise UpstreamError("reset", f"cannot send request: {exc}") from exc
        self.requests += 1
        self.pipe.write(head + body if body else head)

    def result(self) -> Response:
        """The response of the exchange that finished; ``UpstreamError`` if it failed."""
        if self._error is not None and not self._done:
            raise self._error
        if self._switched:  # a 101 nobody asked for: the connection is not HTTP any more
            self._fail(UpstreamError("reset", "unexpected 101 from upstream"))
            raise UpstreamError("reset", "upstream switched protocols unasked")
        return self._response()

    async def request(self, req: Request, body: bytes) -> Response:
        """One exchange; ``UpstreamError`` if the connection fails before the response."""
        self._start(req)
        self._send(req, body)
        if not self._done and self._error is None:
            await self._waiter  # type: ignore[misc]
        return self.result()

    async def upgrade(self, req: Request) -> tuple[Response, bytes]:
        """Send an Upgrade request; (the response, bytes after the 101 if it switched)."""
        self._start(req)
        try:
            head = request_head(req, None, upgrade=True)
        except BadHead as exc:
            raise UpstreamError("reset", f"cannot send request: {exc}") from exc
        self.pipe.write(head)
        if not self._done and self._error is None and not self._switched:
            await self._waiter  # type: ignore[misc]
        if self._error is not None and not self._done and not self._switched:
            raise self._error
        resp = self._response()
        if self._switched:
            trailing, self._trailing = self._trailing, b""
            return resp, trailing
        return resp, b""

    def recycle(self) -> bool:
        """Ready the connection for another exchange; False if it cannot be reused."""
        return (not self.closed and self.raw is None and not self._switched and self._done
                and self._keep)

    def close(self) -> None:
        """Close the connection (also after a failure: a half-closed transport must still
        be closed)."""
        self.closed = True
        self.pipe.close()


def headers_of(resp: Response) -> Headers:
    return tuple((k, v) for k, v in resp.headers if k not in HOP_BY_HOP)
