"""What the waypoint knows about one HTTP request, independent of HTTP/1.1 or HTTP/2.

Wire types stop at the HTTP layer: ``waypoint.http1`` and ``waypoint.http2``
build a ``Request`` from llhttp callbacks / h2 events, and everything past them (the decision
engine, authorization, telemetry) sees only these types. Header names are
lower case; values are text (latin-1 round-trips any byte).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

from ztunnel_py.state.model import FrozenMap, Workload

Headers = tuple[tuple[str, str], ...]

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
        "trailer",
        "proxy-authenticate",
        "proxy-authorization",
        "content-length",
        "host",
    }
)


def header(headers: Headers, name: str) -> str | None:
    """The value of ``name`` (values of a repeated header joined with ``,``), or None."""
    values = [v for k, v in headers if k == name]
    if not values:
        return None
    return ",".join(values)


def set_header(headers: Headers, name: str, value: str) -> Headers:
    return (*tuple((k, v) for k, v in headers if k != name), (name, value))


def remove_header(headers: Headers, name: str) -> Headers:
    return tuple((k, v) for k, v in headers if k != name)


def normalise(headers: Iterable[tuple[str | bytes, str | bytes]]) -> Headers:
    out: list[tuple[str, str]] = []
    for k, v in headers:
        ks = k.decode("latin-1") if isinstance(k, bytes) else k
        vs = v.decode("latin-1") if isinstance(v, bytes) else v
        out.append((ks.lower(), vs))
    return tuple(out)


@dataclass(frozen=True)
class Peer:
    """The client of a request: address, proven identity and (if known) its workload."""

    ip: str = ""
    principal: str = ""  # SPIFFE id, "" for an unauthenticated client
    workload: Workload | None = None

    @property
    def namespace(self) -> str:
        if self.workload is not None:
            return self.workload.namespace
        parts = self.principal.split("/")
        try:
            return parts[parts.index("ns") + 1]
        except (ValueError, IndexError):
            return ""

    @property
    def labels(self) -> FrozenMap[str, str]:
        return self.workload.labels if self.workload is not None else FrozenMap()


@dataclass(init=False)
class Request:
    method: str
    path: str  # the request target: path and query
    authority: str  # Host / :authority
    headers: Headers = ()  # everything else, lower-case names, without hop-by-hop headers
    port: int = 80  # the service port the client dialled
    scheme: str = "http"
    source: Peer = field(default_factory=Peer)
    grpc: bool = False
    dst: str = ""  # the address the client dialled (a service VIP or a pod IP)
    http2: bool = False

    # written out, not made by @dataclass: compiled (``ztunnel_py.native``)
    def __init__(self, method: str, path: str, authority: str, headers: Headers = (),
                 port: int = 80, scheme: str = "http", source: Peer | None = None,
                 grpc: bool = False, dst: str = "", http2: bool = False) -> None:
        self.method = method
        self.path = path
        self.authority = authority
        self.headers = headers
        self.port = port
        self.scheme = scheme
        self.source = source if source is not None else Peer()
        self.grpc = grpc
        self.dst = dst
        self.http2 = http2


    def header(self, name: str) -> str | None:
        return header(self.headers, name)

    @property
    def path_only(self) -> str:
        return self.path.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.path.split("?", 1)[1] if "?" in self.path else ""

    @property
    def host(self) -> str:
        """The authority without its port."""
        a = self.authority
        if a.startswith("["):
            return a.split("]", 1)[0] + "]"
        return a.rsplit(":", 1)[0] if a.count(":") == 1 else a

    def with_headers(self, headers: Headers, port: int = -1) -> Request:
        """This request with ``headers`` (and ``port``, unless -1): one copy for both."""
        if port < 0:
            port = self.port
        if headers is self.headers and port == self.port:
            return self
        # by hand: dataclasses.replace costs several microseconds on this hot path
        return Request(self.method, self.path, self.authority, headers, port,
                       self.scheme, self.source, self.grpc, self.dst, self.http2)

    def with_port(self, port: int) -> Request:
        if port == self.port:
            return self
        return Request(self.method, self.path, self.authority, self.headers, port,
                       self.scheme, self.source, self.grpc, self.dst, self.http2)


@dataclass(init=False)
class Response:
    status: int
    headers: Headers = ()
    body: bytes = b""
    trailers: Headers = ()
    # Set when the body is relayed as it arrives (HTTP/2 upstreams: gRPC streams); the
    # body and trailers above are then empty and come from the stream.
    stream: BodyStream | None = None

    # written out, not made by @dataclass: compiled (``ztunnel_py.native``)
    def __init__(self, status: int, headers: Headers = (), body: bytes = b"",
                 trailers: Headers = (), stream: BodyStream | None = None) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.trailers = trailers
        self.stream = stream


    @property
    def grpc_status(self) -> str | None:
        return header(self.trailers, "grpc-status") or header(self.headers, "grpc-status")


class BodyStream:
    """A response body arriving in chunks, then trailers (or a failure).

    The producer (an upstream HTTP/2 stream) calls ``feed`` / ``end`` / ``fail``; the
    consumer iterates. Flow control follows consumption: ``on_consumed(n)`` is told
    how many bytes the consumer took, so the producer credits its peer only then.
    """

    def __init__(self) -> None:
        self._q: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.trailers: Headers = ()
        self.error: BaseException | None = None
        self.size = 0
        self.finished = False
        self.on_consumed: Callable[[int], None] | None = None
        self.on_cancel: Callable[[], None] | None = None
        self.on_done: list[Callable[[BodyStream], None]] = []

    def feed(self, data: bytes) -> None:
        if not self.finished:
            self._q.put_nowait(data)

    def end(self, trailers: Headers = ()) -> None:
        if not self.finished:
            self.trailers = trailers
            self._q.put_nowait(None)

    def fail(self, error: BaseException) -> None:
        if not self.finished:
            self.error = error
            self._q.put_nowait(None)

    def cancel(self) -> None:
        """The consumer gives up: the producer resets its stream."""
        if not self.finished:
            self.error = self.error or UpstreamError("reset", "response stream cancelled")
            self._done()
            if self.on_cancel is not None:
                self.on_cancel()

    def _done(self) -> None:
        if not self.finished:
            self.finished = True
            callbacks, self.on_done = self.on_done, []
            for cb in callbacks:
                cb(self)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _Chunks(self)

    async def read_all(self) -> bytes:
        return b"".join([c async for c in self])


class RequestBody:
    """A request body that may still be arriving (gRPC streams over HTTP/2).

    Chunks are kept so that a retry or a mirror can replay the body from the start, up
    to ``limit`` bytes; past that the body can be read once only (``replayable`` turns
    False, consumed chunks are dropped) and retries stop, as in Envoy. ``on_consumed``
    is told about bytes read the first time, so the client is credited only then.
    """

    def __init__(self, limit: int = 1 << 20) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.dropped = 0  # chunks released after being read once (not replayable)
        self.size = 0
        self.complete = False
        self.error: BaseException | None = None
        self.replayable = True
        self.readers = 0
        self._high = 0  # highest chunk index read so far
        self._changed = asyncio.Event()
        self.on_consumed: Callable[[int], None] | None = None

    def feed(self, data: bytes) -> None:
        if self.complete or self.error is not None or not data:
            return
        self.chunks.append(data)
        self.size += len(data)
        if self.size > self.limit:
            self.replayable = False
        self._changed.set()

    def end(self) -> None:
        self.complete = True
        self._changed.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._changed.set()

    async def wait_complete(self) -> bytes:
        """The whole body, once it has all arrived (replayable bodies only)."""
        return b"".join([c async for c in self.replay()])

    def replay(self) -> AsyncIterator[bytes]:
        """The body from its first byte, as it arrives."""
        return _Replay(self)


# The two iterators are classes rather than async generators: mypyc, which compiles this
# module (``waypoint._native``), does not compile async generators.


class _Chunks:
    """``BodyStream``'s chunks as they arrive; raises the stream's error at its end."""

    def __init__(self, stream: BodyStream) -> None:
        self.stream = stream

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        s = self.stream
        if s.finished:
            raise StopAsyncIteration
        chunk = await s._q.get()
        if chunk is None:
            s._done()
            if s.error is not None:
                raise s.error
            raise StopAsyncIteration
        s.size += len(chunk)
        if s.on_consumed is not None:
            s.on_consumed(len(chunk))
        return chunk


class _Replay:
    """``RequestBody.replay``: one reader's pass over the body, from its first byte."""

    def __init__(self, body: RequestBody) -> None:
        self.body = body
        self.i = 0
        self.started = False

    def __aiter__(self) -> _Replay:
        return self

    async def __anext__(self) -> bytes:
        b = self.body
        if not self.started:  # (counted at the first read, as a generator's body runs)
            self.started = True
            if not b.replayable and b.readers:
                raise UpstreamError("reset", "request body too large to send again")
            b.readers += 1
        while True:
            if b.error is not None:
                raise b.error
            i = self.i
            if i < b.dropped:
                raise UpstreamError("reset", "request body too large to send again")
            if i - b.dropped < len(b.chunks):
                chunk = b.chunks[i - b.dropped]
                self.i = i = i + 1
                if i > b._high:
                    b._high = i
                    if b.on_consumed is not None:
                        b.on_consumed(len(chunk))
                if not b.replayable:  # read-once: let go of what was read
                    del b.chunks[: i - b.dropped]
                    b.dropped = i
                return chunk
            if b.complete:
                raise StopAsyncIteration
            b._changed.clear()
            await b._changed.wait()


Body = bytes | RequestBody


class UpstreamError(Exception):
    """A try towards an endpoint failed before a complete response.

    ``kind`` is the retry condition it maps to: ``connect-failure``, ``reset`` or
    ``refused-stream``.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
