"""The HTTP/1.1 codec (``waypoint.http1``, llhttp via httptools) with bytes pushed
through in-memory pipes: malformed input, limits, pipelining, chunked bodies,
Expect, HTTP/1.0, Upgrade (accepted and refused), and the upstream client's
response framing (chunked + trailers, HEAD, 1xx, end-of-connection bodies)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable

import pytest

from tests.unit.test_waypoint_codec import MemPipe
from waypoint.http1 import MAX_BODY, MAX_HEAD, BadHead, ConnInfo, H1Client, H1Server, request_head
from waypoint.request import Body, Peer, Request, Response, UpstreamError


class Recorder:
    """Answers ``ok <path>``; ``/slow`` waits until released (to hold a pipeline)."""

    def __init__(self) -> None:
        self.requests: list[tuple[Request, bytes]] = []
        self.release = asyncio.Event()
        self.upgrades: list[Request] = []
        self.upgrade_answer: Response | None = None

    async def handle(self, req: Request, body: Body) -> Response:
        assert isinstance(body, bytes)
        self.requests.append((req, body))
        if req.path == "/slow":
            await self.release.wait()
        return Response(200, (("x-path", req.path),), f"ok {req.path} {len(body)}".encode())

    def handle_now(self, req: Request, body: bytes, server: H1Server) -> None:
        if req.path == "/boom":
            raise RuntimeError("a bug in the handler")
        if req.path.startswith("/now"):  # answered on the spot, as the callback path does
            self.requests.append((req, body))
            server.respond(Response(200, (), f"now {req.path}".encode()))
        else:
            server.follow(self.handle(req, body))

    async def upgrade(self, req: Request, server: H1Server) -> None:
        self.upgrades.append(req)
        if self.upgrade_answer is not None:  # refused
            server.respond(self.upgrade_answer)
            return
        early = server.switch(Response(101, (("upgrade", "websocket"),
                                             ("connection", "Upgrade"))))
        seen: list[bytes] = [early]
        server.raw = seen.append
        self.raw_seen = seen

    def spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        return asyncio.ensure_future(coro)


INFO = ConnInfo(Peer("10.0.0.9"), ("10.96.0.1", 9080))


def _server() -> tuple[MemPipe, Recorder, H1Server]:
    pipe, rec = MemPipe(), Recorder()
    return pipe, rec, H1Server(pipe, INFO, rec, rec.spawn)


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def _statuses(out: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", out)]


@pytest.mark.parametrize("raw", [
    b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",  # whitespace before the colon
    b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",  # space in the target
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc",
    b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n folded\r\n\r\n",  # obsolete line folding
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # bad chunk
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # TLS to the plaintext port
])
async def test_malformed_request_gets_400_and_the_connection_closed(raw: bytes) -> None:
    pipe, rec, server = _server()
    server.on_data(raw)
    await _settle()
    assert _statuses(bytes(pipe.out)) == [400]
    assert b"connection: close" in pipe.out and pipe.closed and not rec.requests


async def test_oversized_head_gets_431_complete_or_still_arriving() -> None:
    pipe, rec, server = _server()
    server.on_data(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * MAX_HEAD + b"\r\n\r\n")
    await _settle()
    assert _statuses(bytes(pipe.out)) == [431] and pipe.closed and not rec.requests
    # A head that never ends is cut off once it passes the limit, not buffered forever.
    pipe, rec, server = _server()
    server.on_data(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
    for _ in range(MAX_HEAD // 4096 + 2):
        if pipe.closed:
            break
        server.on_data(b"a" * 4096)
    await _settle()
    assert _statuses(bytes(pipe.out)) == [431] and pipe.closed


async def test_a_head_split_into_many_small_reads_is_fine() -> None:
    pipe, rec, server = _server()
    raw = b"GET /split?q=1 HTTP/1.1\r\nHost: reviews:9080\r\nX-A: 1\r\n\r\n"
    for i in range(len(raw)):
        server.on_data(raw[i:i + 1])
    await _settle()
    (req, _), = rec.requests
    assert (req.path, req.authority, req.header("x-a")) == ("/split?q=1", "reviews:9080", "1")
    assert _statuses(bytes(pipe.out)) == [200] and not pipe.closed


async def test_body_over_the_limit_gets_413() -> None:
    pipe, rec, server = _server()
    server.on_data(f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n"
                   .encode())
    chunk = b"z" * (1 << 20)
    for _ in range(MAX_BODY // len(chunk) + 1):
        server.on_data(chunk)
    await _settle()
    assert _statuses(bytes(pipe.out)) == [413] and pipe.closed and not rec.requests


async def test_pipelined_requests_are_answered_in_order_behind_a_slow_one() -> None:
    pipe, rec, server = _server()
    server.on_data(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
                   b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
                   b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
    await _settle()
    assert pipe.out == b"" and [r.path for r, _ in rec.requests] == ["/slow"]
    rec.release.set()
    await _settle()
    text = pipe.out.decode()
    assert text.index("ok /slow") < text.index("ok /b 2") < text.index("ok /c")
    assert _statuses(bytes(pipe.out)) == [200, 200, 200] and not pipe.closed


async def test_answers_given_on_the_spot_and_from_tasks_keep_the_pipeline_order() -> None:
    # /now* is answered inside handle_now (the callback path), the rest through follow()
    pipe, rec, server = _server()
    server.on_data(b"GET /now1 HTTP/1.1\r\nHost: x\r\n\r\n"
                   b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
                   b"GET /now2 HTTP/1.1\r\nHost: x\r\n\r\n"
                   b"GET /now3 HTTP/1.1\r\nHost: x\r\n\r\n")
    await _settle()
    assert pipe.out.decode().count("HTTP/1.1 200") == 1  # /now1; the rest waits behind /slow
    assert [r.path for r, _ in rec.requests] == ["/now1", "/slow"]
    rec.release.set()
    await _settle()
    text = pipe.out.decode()
    assert text.index("now /now1") < text.index("ok /slow") < text.index("now /now2") \
        < text.index("now /now3")
    assert _statuses(bytes(pipe.out)) == [200] * 4 and not pipe.closed


async def test_a_handler_failing_on_the_spot_answers_500_and_the_connection_goes_on() -> None:
    pipe, rec, server = _server()
    server.on_data(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\nGET /now HTTP/1.1\r\nHost: x\r\n\r\n")
    await _settle()
    assert _statuses(bytes(pipe.out)) == [500, 200] and not pipe.closed
    assert [r.path for r, _ in rec.requests] == ["/now"]


async def test_a_bad_request_in_a_pipeline_is_answered_in_its_turn_then_close() -> None:
    pipe, rec, server = _server()
    server.on_data(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nBROKEN\r\n\r\n"
                   b"GET /never HTTP/1.1\r\nHost: x\r\n\r\n")
    await _settle()
    assert pipe.out == b""  # the 400 waits for the answer before it
    rec.release.set()
    await _settle()
    assert _statuses(bytes(pipe.out)) == [200, 400] and pipe.closed
    assert [r.path for r, _ in rec.requests] == ["/slow"]


async def test_chunked_request_body_across_reads_with_trailers() -> None:
    pipe, rec, server = _server()
    server.on_data(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
    server.on_data(b"lo\r\n6\r\n world\r\n0\r\nX-Checksum: 1\r\n\r\n")
    await _settle()
    (req, body), = rec.requests
    assert body == b"hello world"
    assert req.header("transfer-encoding") is None and req.header("x-checksum") is None
    assert b"ok /up 11" in pipe.out and not pipe.closed


async def test_expect_100_continue_is_answered_and_not_forwarded() -> None:
    pipe, rec, server = _server()
    server.on_data(b"PUT /f HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                   b"Expect: 100-continue\r\n\r\n")
    assert pipe.out == b"HTTP/1.1 100 Continue\r\n\r\n"
    server.on_data(b"abc")
    await _settle()
    (req, body), = rec.requests
    assert body == b"abc" and req.header("expect") is None
    assert _statuses(bytes(pipe.out)) == [100, 200]


async def test_http10_closes_unless_keep_alive_and_connection_close_is_honoured() -> None:
    pipe, _, server = _server()
    server.on_data(b"GET / HTTP/1.0\r\n\r\n")
    await _settle()
    assert b"connection: close" in pipe.out and pipe.closed
    pipe, _, server = _server()
    server.on_data(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    await _settle()
    assert b"connection: keep-alive" in pipe.out and not pipe.closed
    pipe, _, server = _server()
    server.on_data(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                   b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n")
    await _settle()
    assert _statuses(bytes(pipe.out)) == [200] and pipe.closed


async def test_headers_named_in_connection_are_not_forwarded_and_head_gets_no_body() -> None:
    pipe, rec, server = _server()
    server.on_data(b"HEAD /h HTTP/1.1\r\nHost: x\r\nConnection: x-hop\r\nX-Hop: 1\r\n"
                   b"X-End: 2\r\n\r\n")
    await _settle()
    (req, _), = rec.requests
    assert req.header("x-hop") is None and req.header("x-end") == "2"
    head, _, rest = bytes(pipe.out).partition(b"\r\n\r\n")
    assert b"content-length: 7" in head and rest == b""  # the length GET would get


async def test_connect_is_refused() -> None:
    pipe, rec, server = _server()
    server.on_data(b"CONNECT 10.0.0.1:22 HTTP/1.1\r\nHost: 10.0.0.1:22\r\n\r\n")
    await _settle()
    assert _statuses(bytes(pipe.out)) == [405] and pipe.closed and not rec.requests


async def test_upgrade_switches_and_relays_the_bytes_sent_early() -> None:
    pipe, rec, server = _server()
    server.on_data(b"GET /chat HTTP/1.1\r\nHost: ws\r\nUpgrade: websocket\r\n"
                   b"Connection: Upgrade\r\n\r\nEARLY")
    server.on_data(b"-MORE")  # before the upstream answered
    await _settle()
    (req,) = rec.upgrades
    assert req.header("upgrade") == "websocket" and req.header("connection") == "Upgrade"
    assert pipe.out.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"upgrade: websocket" in pipe.out
    server.on_data(b"after")
    assert rec.raw_seen == [b"EARLY-MORE", b"after"] and not pipe.closed


async def test_a_refused_upgrade_goes_on_as_http11() -> None:
    pipe, rec, server = _server()
    rec.upgrade_answer = Response(403, (), b"no")
    server.on_data(b"GET /chat HTTP/1.1\r\nHost: ws\r\nUpgrade: websocket\r\n"
                   b"Connection: Upgrade\r\n\r\nGET /next HTTP/1.1\r\nHost: ws\r\n\r\n")
    await _settle()
    assert _statuses(bytes(pipe.out)) == [403, 200]
    assert [r.path for r, _ in rec.requests] == ["/next"] and not pipe.closed


async def test_eof_after_a_request_closes_once_it_is_answered() -> None:
    pipe, rec, server = _server()
    server.on_data(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    server.on_eof()
    await _settle()
    assert not pipe.closed
    rec.release.set()
    await _settle()
    assert _statuses(bytes(pipe.out)) == [200] and pipe.closed


async def test_response_header_with_crlf_is_not_written() -> None:
    pipe, rec, server = _server()

    async def evil(req: Request, body: Body) -> Response:
        return Response(200, (("x-set", "a\r\nset-cookie: stolen=1"),), b"x")

    rec.handle = evil  # type: ignore[method-assign]
    server.on_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await _settle()
    assert b"stolen" not in pipe.out and _statuses(bytes(pipe.out)) == [502] and pipe.closed


# -- upstream client -----------------------------------------------------------------------


def _client() -> tuple[MemPipe, H1Client]:
    pipe = MemPipe()
    return pipe, H1Client(pipe)


async def _exchange(client: H1Client, req: Request, *answer: bytes) -> Response:
    task = asyncio.ensure_future(client.request(req, b""))
    await _settle()
    for chunk in answer:
        client.on_data(chunk)
    return await asyncio.wait_for(task, 1)


def test_request_head_is_one_string_without_hop_by_hop_headers() -> None:
    req = Request("POST", "/p?q=1", "reviews:9080",
                  (("x-a", "1"), ("connection", "close"), ("te", "trailers")))
    assert request_head(req, 3) == (b"POST /p?q=1 HTTP/1.1\r\nhost: reviews:9080\r\n"
                                    b"x-a: 1\r\ncontent-length: 3\r\n\r\n")
    with pytest.raises(BadHead):
        request_head(Request("GET", "/a b", "x"), 0)
    with pytest.raises(BadHead):
        request_head(Request("GET", "/", "x", (("x-a", "1\nx-b: 2"),)), 0)
    with pytest.raises(BadHead):
        request_head(Request("GET", "/", "x", (("x-a", "\u2603"),)), 0)


async def test_client_reads_chunked_response_with_trailers_then_reuses() -> None:
    pipe, client = _client()
    resp = await _exchange(client, Request("GET", "/", "x"),
                           b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
                           b"2\r\nde\r\n0\r\nGrpc-Status: 0\r\n\r\n")
    assert (resp.status, resp.body, resp.trailers) == (200, b"abcde", (("grpc-status", "0"),))
    assert ("transfer-encoding", "chunked") in resp.headers
    assert client.recycle()
    resp = await _exchange(client, Request("GET", "/2", "x"),
                           b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno")
    assert (resp.status, resp.body) == (404, b"no") and client.requests == 2
    assert pipe.out.count(b"GET /") == 2


async def test_client_head_response_has_no_body_and_the_connection_is_reused() -> None:
    _, client = _client()
    resp = await _exchange(client, Request("HEAD", "/", "x"),
                           b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    assert (resp.status, resp.body) == (200, b"") and client.recycle()
    resp = await _exchange(client, Request("GET", "/", "x"),
                           b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert resp.body == b"ok"


async def test_client_skips_100_continue_and_reads_an_unframed_body_to_eof() -> None:
    _, client = _client()
    task = asyncio.ensure_future(client.request(Request("GET", "/", "x"), b""))
    await _settle()
    client.on_data(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\nuntil ")
    client.on_data(b"eof")
    await _settle()
    assert not task.done()
    client.on_eof()
    resp = await asyncio.wait_for(task, 1)
    assert (resp.status, resp.body) == (200, b"until eof") and not client.recycle()


async def test_client_bad_response_and_early_close_are_upstream_errors() -> None:
    pipe, client = _client()
    with pytest.raises(UpstreamError, match=r"bad HTTP/1\.1"):
        await _exchange(client, Request("GET", "/", "x"), b"SMTP ready\r\n")
    assert pipe.closed and not client.recycle()
    pipe, client = _client()
    task = asyncio.ensure_future(client.request(Request("GET", "/", "x"), b""))
    await _settle()
    client.on_data(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
    client.on_eof()
    with pytest.raises(UpstreamError, match="closed"):
        await asyncio.wait_for(task, 1)
    assert pipe.closed


async def test_client_idle_connection_closed_by_upstream_is_closed_here_too() -> None:
    pipe, client = _client()
    await _exchange(client, Request("GET", "/", "x"),
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    client.on_eof()
    assert pipe.closed and not client.recycle()


async def test_client_upgrade_returns_the_101_and_the_bytes_after_it() -> None:
    pipe, client = _client()
    req = Request("GET", "/chat", "ws", (("upgrade", "websocket"), ("connection", "Upgrade")))
    task = asyncio.ensure_future(client.upgrade(req))
    await _settle()
    assert b"upgrade: websocket\r\nconnection: Upgrade\r\n" in pipe.out
    assert b"content-length" not in pipe.out
    client.on_data(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                   b"Connection: Upgrade\r\n\r\nHELLO")
    client.on_data(b" AGAIN")  # before the relay is wired up
    resp, trailing = await asyncio.wait_for(task, 1)
    assert resp.status == 101 and ("upgrade", "websocket") in resp.headers
    assert trailing == b"HELLO AGAIN" and not client.recycle()


class _Sink:
    def __init__(self) -> None:
        self.events: list[object] = []

    def on_data(self, data: bytes) -> None:
        self.events.append(data)

    def on_eof(self) -> None:
        self.events.append("eof")

    def on_lost(self, exc: BaseException | None) -> None:
        self.events.append("lost")


def test_a_pipe_replays_what_came_early_to_its_first_sink_only() -> None:
    from waypoint.pipe import TcpPipe

    pipe = TcpPipe()
    pipe.data_received(b"early")
    pipe.eof_received()
    first, second = _Sink(), _Sink()
    pipe.set_sink(first)
    pipe.set_sink(second)  # the sniffer hands the pipe to the server it chose
    pipe.data_received(b"late")
    assert first.events == [b"early", "eof"] and second.events == [b"late"]


async def test_the_sniffer_hands_the_pipe_to_the_http1_server() -> None:
    from waypoint.server import Sniff

    pipe, rec = MemPipe(), Recorder()
    sniff = Sniff(pipe, INFO, rec)
    sniff.on_data(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(pipe.sink, H1Server)
    pipe.sink.on_data(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    await _settle()
    assert [r.path for r, _ in rec.requests] == ["/a", "/b"]


@pytest.mark.parametrize(("method", "upstream", "want_head", "want_body"), [
    ("GET", Response(204, (("x-a", "1"),), b""), b"HTTP/1.1 204 No Content\r\nx-a: 1\r\n\r\n",
     b""),
    ("GET", Response(304, (("etag", '"v1"'),), b""),
     b'HTTP/1.1 304 Not Modified\r\netag: "v1"\r\n\r\n', b""),
    ("HEAD", Response(200, (("content-length", "100"),), b""),
     b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n", b""),
    ("GET", Response(200, (("content-length", "100"),), b"abc"),
     b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n", b"abc"),
])
async def test_response_framing_follows_status_and_method(
        method: str, upstream: Response, want_head: bytes, want_body: bytes) -> None:
    pipe, rec, server = _server()

    async def answer(req: Request, body: Body) -> Response:
        return upstream

    rec.handle = answer  # type: ignore[method-assign]
    server.on_data(f"{method} / HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await _settle()
    assert bytes(pipe.out) == want_head + want_body and not pipe.closed


async def test_pipelining_is_bounded() -> None:
    from waypoint.http1 import MAX_PIPELINED

    pipe, rec, server = _server()
    server.on_data(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
                   + b"GET /q HTTP/1.1\r\nHost: x\r\n\r\n" * (MAX_PIPELINED + 5))
    await _settle()
    rec.release.set()
    for _ in range(10):
        await _settle()
    statuses = _statuses(bytes(pipe.out))
    assert statuses == [200] * MAX_PIPELINED + [503] and pipe.closed


def test_header_names_are_lower_cased_once_and_the_cache_is_bounded() -> None:
    from waypoint import http1

    assert http1.header_name(b"X-Served-By") == "x-served-by"
    assert http1.header_name(b"X-Served-By") == "x-served-by"  # from the cache now
    assert http1.header_name(b"\xe9-Odd") == "\xe9-odd"  # latin-1: any byte round-trips
    for i in range(http1.NAME_CACHE_SIZE + 10):
        http1.header_name(f"X-N{i}".encode())
    assert len(http1._NAMES) <= http1.NAME_CACHE_SIZE
    assert http1.header_name(b"Content-Type") == "content-type"



async def test_header_names_stay_right_when_a_connection_changes_them_between_messages(
) -> None:
    _, client = _client()  # (names are remembered per connection, by position)
    req = Request("GET", "/", "r:9080")
    answers = [
        (b"X-A: 1\r\nX-B: 2\r\n", [("x-a", "1"), ("x-b", "2")]),
        (b"X-A: 3\r\nX-B: 4\r\n", [("x-a", "3"), ("x-b", "4")]),  # the same names
        (b"X-B: 5\r\nX-C: 6\r\nX-D: 7\r\n", [("x-b", "5"), ("x-c", "6"), ("x-d", "7")]),
        (b"X-A: 8\r\n", [("x-a", "8")]),  # fewer than before
        (b"X-B: 9\r\nX-C: 10\r\nX-D: 11\r\n", [("x-b", "9"), ("x-c", "10"), ("x-d", "11")]),
    ]
    for head, want in answers:
        resp = await _exchange(client, req, b"HTTP/1.1 200 OK\r\n" + head
                               + b"Content-Length: 0\r\n\r\n")
        assert list(resp.headers) == [*want, ("content-length", "0")]
        assert client.recycle()

async def test_tcp_pipes_write_at_the_end_of_the_iteration_in_order_before_fin_and_close(
) -> None:
    from waypoint.pipe import TcpPipe

    got: dict[str, bytes] = {}
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # to EOF: everything written before the FIN / close
        got[data[:1].decode()] = data
        writer.close()
        if len(got) == 2:
            done.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    try:
        _, a = await loop.create_connection(TcpPipe, "127.0.0.1", port)
        _, b = await loop.create_connection(TcpPipe, "127.0.0.1", port)
        a.write(b"a1 ")
        b.write(b"b1 ")
        a.write(b"a2")
        a.write_eof()  # a's writes go first, then its FIN
        b.write(b"b2")
        b.close()  # b's writes go first, then the close
        await asyncio.wait_for(done.wait(), 5)
        assert got == {"a": b"a1 a2", "b": b"b1 b2"}
        a.close()
    finally:
        server.close()
        await server.wait_closed()
