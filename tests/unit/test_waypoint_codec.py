"""The HTTP/1.1 and HTTP/2 server codecs with bytes pushed through in-memory pipes
(no sockets): pipelining, malformed input, request building, trailers-only gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import h2.config
import h2.connection
import h2.events

from waypoint.http1 import ConnInfo, H1Server
from waypoint.http2 import PREFACE, H2Server
from waypoint.request import Body, Peer, Request, RequestBody, Response, UpstreamError
from waypoint.server import Sniff


class MemPipe:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.sink: object = None

    def set_sink(self, sink: object) -> None:
        self.sink = sink

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.out += data

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def peer_address(self) -> tuple[str, int] | None:
        return None


class Recorder:
    def __init__(self) -> None:
        self.requests: list[tuple[Request, bytes]] = []

    async def handle(self, req: Request, body: Body) -> Response:
        if isinstance(body, RequestBody):  # gRPC over HTTP/2 arrives as a stream
            body = await body.wait_complete()
        self.requests.append((req, body))
        if req.grpc:
            return Response(200, (("content-type", "application/grpc"),),
                            b"\x00\x00\x00\x00\x01x", (("grpc-status", "0"),))
        return Response(200, (("x-path", req.path),), f"ok {req.path}".encode())

    def handle_now(self, req: Request, body: bytes, server: H1Server) -> None:
        server.follow(self.handle(req, body))

    async def upgrade(self, req: Request, server: H1Server) -> None:
        raise AssertionError("no upgrades here")

    def spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        return asyncio.ensure_future(coro)


INFO = ConnInfo(Peer("10.0.0.9", "spiffe://cluster.local/ns/a/sa/b"), ("10.96.0.1", 9080))


def _spawn(coro: object) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_h1_pipelined_requests_are_answered_in_order() -> None:
    pipe, rec = MemPipe(), Recorder()
    server = H1Server(pipe, INFO, rec, _spawn)
    server.on_data(b"GET /a HTTP/1.1\r\nHost: reviews:9080\r\nX-Trace: 1\r\n\r\n"
                   b"POST /b?q=1 HTTP/1.1\r\nHost: reviews\r\nContent-Length: 3\r\n"
                   b"Connection: keep-alive\r\n\r\nxyz")
    await _settle()
    text = pipe.out.decode()
    assert text.index("ok /a") < text.index("ok /b?q=1")
    assert text.count("HTTP/1.1 200") == 2
    (r1, _b1), (r2, b2) = rec.requests
    assert (r1.method, r1.path, r1.authority, r1.port, r1.dst) == \
        ("GET", "/a", "reviews:9080", 9080, "10.96.0.1")
    assert r1.source.principal == "spiffe://cluster.local/ns/a/sa/b"
    assert ("x-trace", "1") in r1.headers
    assert not any(k in ("host", "connection", "content-length") for k, _ in r2.headers)
    assert (r2.method, b2, r2.query) == ("POST", b"xyz", "q=1")
    assert not pipe.closed


async def test_h1_garbage_gets_400_and_close() -> None:
    pipe, rec = MemPipe(), Recorder()
    server = H1Server(pipe, INFO, rec, _spawn)
    server.on_data(b"NOT HTTP AT ALL\r\n\r\n")
    await _settle()
    assert pipe.out.startswith(b"HTTP/1.1 400")
    assert pipe.closed and not rec.requests


async def test_h1_connection_close_is_honoured() -> None:
    pipe, rec = MemPipe(), Recorder()
    server = H1Server(pipe, INFO, rec, _spawn)
    server.on_data(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await _settle()
    assert b"200" in pipe.out and pipe.closed


async def test_sniff_picks_http2_on_the_preface_and_grpc_gets_trailers() -> None:
    pipe, rec = MemPipe(), Recorder()
    sniff = Sniff(pipe, INFO, rec)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    data = client.data_to_send()
    assert data.startswith(PREFACE)
    sniff.on_data(data[:10])  # the preface split across reads
    assert sniff.chosen is None
    sniff.on_data(data[10:])
    assert isinstance(sniff.chosen, H2Server)
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, [(":method", "POST"), (":scheme", "http"),
                              (":path", "/demo.Echo/Unary"), (":authority", "echo:50051"),
                              ("content-type", "application/grpc"), ("te", "trailers")])
    client.send_data(sid, b"\x00\x00\x00\x00\x02hi", end_stream=True)
    sniff.on_data(client.data_to_send())
    await _settle()
    events = client.receive_data(bytes(pipe.out))
    req, body = rec.requests[0]
    assert req.grpc and req.http2 and req.authority == "echo:50051" and body.endswith(b"hi")
    trailers = [e for e in events if isinstance(e, h2.events.TrailersReceived)]
    assert trailers and (b"grpc-status", b"0") in trailers[0].headers
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)


async def test_sniff_picks_http1_otherwise() -> None:
    pipe, rec = MemPipe(), Recorder()
    sniff = Sniff(pipe, INFO, rec)
    sniff.on_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(sniff.chosen, H1Server)
    await _settle()
    assert pipe.out.startswith(b"HTTP/1.1 200")


async def test_request_body_replays_while_small_and_reads_once_when_large() -> None:
    small = RequestBody(limit=10)
    small.feed(b"abc")
    small.feed(b"def")
    small.end()
    assert await small.wait_complete() == b"abcdef"
    assert await small.wait_complete() == b"abcdef"  # a retry or a mirror sends it again
    large = RequestBody(limit=4)
    consumed: list[int] = []
    large.on_consumed = consumed.append
    large.feed(b"abc")
    large.feed(b"def")  # past the limit: read once
    large.end()
    assert not large.replayable
    assert [c async for c in large.replay()] == [b"abc", b"def"]
    assert consumed == [3, 3] and large.chunks == []
    try:
        [c async for c in large.replay()]
    except UpstreamError as exc:
        assert "too large" in str(exc)
    else:
        raise AssertionError("a read-once body replayed")


async def test_request_body_streams_as_it_arrives() -> None:
    body = RequestBody()
    got: list[bytes] = []

    async def read() -> None:
        async for c in body.replay():
            got.append(c)

    task = asyncio.ensure_future(read())
    body.feed(b"1")
    await _settle()
    assert got == [b"1"] and not task.done()
    body.feed(b"2")
    body.end()
    await asyncio.wait_for(task, 1)
    assert got == [b"1", b"2"]
