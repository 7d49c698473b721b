"""The demo's bookinfo: request handling (pure, and with a fake fetch), HTTP on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ztunnel_py.controller.analyze import analyze
from ztunnel_py.demo import bookinfo
from ztunnel_py.demo import bookinfo_story as story_mod
from ztunnel_py.demo.bookinfo import (
    RATINGS_UNAVAILABLE,
    REVIEWS_UNAVAILABLE,
    App,
    CallError,
    Headers,
    Peer,
    Reply,
    ResponseReader,
    ReviewsView,
    http_get,
    page_text,
    running,
)
from ztunnel_py.demo.configdir import ref_of, write_objects
from ztunnel_py.demo.httpservice import BadRequest, Request, take_request
from ztunnel_py.demo.run import pod_command
from ztunnel_py.demo.world import (
    BOOKINFO,
    BOOKINFO_NS,
    BOOKINFO_WAYPOINT,
    DEFAULT_WORLD,
    manifests,
    topology_spec,
)
from ztunnel_py.topology import plan

REVIEWS = Peer("reviews", "10.96.0.21", 9080)
RATINGS = Peer("ratings", "10.96.0.22", 9080)
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def get(path: str, *headers: tuple[str, str]) -> Request:
    return Request("GET", path, "HTTP/1.1", (("host", "x"), *headers), b"")


class FakeFetch:
    """The Fetch seam: records each call and answers from a script (or raises, or hangs)."""

    def __init__(self, answer: Reply | CallError | None = None) -> None:
        self.answer = answer
        self.calls: list[tuple[Peer, str, Headers]] = []

    async def __call__(self, peer: Peer, path: str, headers: Headers) -> Reply:
        self.calls.append((peer, path, headers))
        if self.answer is None:
            await asyncio.sleep(3600)  # never answers
        if isinstance(self.answer, CallError):
            raise self.answer
        assert self.answer is not None
        return self.answer


def reviews_answer(version: str, ratings: dict[str, int] | CallError | None) -> Reply:
    reply = bookinfo.reviews_reply("0", f"reviews-{version}", version, ratings)
    return Reply(reply.status, reply.body, reply.content_type,
                 (("x-served-by", f"reviews-{version}/{version}"),))


# -- pure parts -------------------------------------------------------------------------------


def test_ratings_answers_like_bookinfo() -> None:
    reply = bookinfo.ratings_reply("7")
    assert reply.status == 200
    assert reply.json() == {"id": 7, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}
    assert bookinfo.ratings_reply("x").status == 400


def test_reviews_body_per_version() -> None:
    v1 = bookinfo.reviews_reply("0", "reviews-v1", "v1", None).json()
    assert v1["podname"] == "reviews-v1"
    assert [r["reviewer"] for r in v1["reviews"]] == ["Reviewer1", "Reviewer2"]
    assert all("rating" not in r for r in v1["reviews"])
    v3 = bookinfo.reviews_reply("0", "reviews-v3", "v3", {"Reviewer1": 5, "Reviewer2": 4}).json()
    assert [r["rating"] for r in v3["reviews"]] == [{"stars": 5, "color": "red"},
                                                    {"stars": 4, "color": "red"}]
    failed = bookinfo.reviews_reply("0", "reviews-v2", "v2", CallError("ratings answered 500"))
    assert {r["rating"]["error"] for r in failed.json()["reviews"]} == {RATINGS_UNAVAILABLE}


def test_the_page_shows_who_answered_and_what_ratings_said() -> None:
    view = ReviewsView.of(reviews_answer("v2", {"Reviewer1": 5, "Reviewer2": 4}))
    assert (view.served_by, view.ratings) == ("reviews-v2/v2", "black 5 4")
    page = bookinfo.productpage_reply("jason", view)
    assert page.header("x-reviews") == "reviews-v2/v2"
    assert page.header("x-ratings") == "black 5 4"
    text = page_text(page.body.decode())
    assert "signed in as: jason" in " ".join(text)
    assert "reviews served by: reviews-v2/v2" in text
    assert "Reviewer1: " + "\u2605" * 5 + " (black)" in text
    assert "Reviewer2: " + "\u2605" * 4 + "\u2606 (black)" in text

    v1 = ReviewsView.of(reviews_answer("v1", None))
    assert v1.ratings == "none" and all(rating == "" for _, _, rating in v1.reviews)

    unavailable = ReviewsView.of(reviews_answer("v2", CallError("ratings answered 500")))
    assert unavailable.ratings == "unavailable"
    lines = page_text(bookinfo.productpage_reply("", unavailable).body.decode())
    assert [line for line in lines if RATINGS_UNAVAILABLE in line] == [
        f"Reviewer1: {RATINGS_UNAVAILABLE}", f"Reviewer2: {RATINGS_UNAVAILABLE}"]


def test_reviews_failures_become_a_message_not_a_crash() -> None:
    down = ReviewsView.of(CallError("reviews did not answer within 3s"))
    page = bookinfo.productpage_reply("", down)
    assert page.status == 200 and page.header("x-reviews") == "unavailable"
    assert f"{REVIEWS_UNAVAILABLE} (reviews did not answer within 3s)" in page_text(
        page.body.decode())
    garbled = ReviewsView.of(Reply(200, b"<html>not json</html>", "text/html"))
    assert garbled.error.startswith(REVIEWS_UNAVAILABLE)


def test_the_page_escapes_what_the_user_sent() -> None:
    page = bookinfo.productpage_reply("<script>x</script>", ReviewsView.of(
        reviews_answer("v1", None)))
    assert b"<script>" not in page.body and b"&lt;script&gt;" in page.body
    sneaky = Reply(200, json.dumps({"reviews": [{"reviewer": "R", "text": "t", "rating": {
        "stars": 9, "color": "red\r\nset-cookie: x=1"}}]}).encode())
    page = bookinfo.productpage_reply("", ReviewsView.of(sneaky))
    assert page.header("x-ratings") == "unknown 5"  # stars clamped, the color kept out


def test_peer_addresses_and_app_wiring_are_checked() -> None:
    assert Peer.parse("reviews", "10.96.0.21:9080") == REVIEWS
    for bad in ("10.96.0.21", "10.96.0.21:http", ":9080", "10.96.0.21:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            Peer.parse("reviews", bad)
    with pytest.raises(ValueError, match="--reviews"):
        App("productpage", "productpage-v1", "v1", FakeFetch())
    with pytest.raises(ValueError, match="--ratings"):
        App("reviews", "reviews-v3", "v3", FakeFetch())
    App("reviews", "reviews-v1", "v1", FakeFetch())  # v1 never calls ratings
    with pytest.raises(ValueError, match="role"):
        App("details", "details-v1", "v1", FakeFetch())


def test_the_demo_tells_each_pod_its_peers_vips() -> None:
    for pod in DEFAULT_WORLD.pods:
        if pod.program != BOOKINFO:
            continue
        argv = pod_command(DEFAULT_WORLD, pod)
        assert argv[1:3] == ["-m", "ztunnel_py.demo.bookinfo"]
        app = bookinfo.app_from_args(bookinfo.parser().parse_args(argv[3:]), FakeFetch())
        assert (app.role, app.pod, app.version) == (pod.app, pod.name, pod.version)
        if pod.app == "productpage":
            assert app.reviews == REVIEWS
        if app.calls_ratings:
            assert app.ratings == RATINGS


# -- the app with a fake fetch ------------------------------------------------------------------


async def test_productpage_forwards_the_user_and_trace_context_only() -> None:
    fetch = FakeFetch(reviews_answer("v3", {"Reviewer1": 5, "Reviewer2": 4}))
    app = App("productpage", "productpage-v1", "v1", fetch, reviews=REVIEWS)
    page = await app.handle(get("/productpage", ("end-user", "jason"), ("traceparent", TRACE),
                                ("tracestate", "k=v"), ("cookie", "session=secret"),
                                ("authorization", "Bearer t")))
    assert page.status == 200 and page.header("x-reviews") == "reviews-v3/v3"
    [(peer, path, headers)] = fetch.calls
    assert (peer, path) == (REVIEWS, "/reviews/0")
    assert dict(headers) == {"end-user": "jason", "traceparent": TRACE, "tracestate": "k=v"}


async def test_productpage_starts_a_trace_when_none_came() -> None:
    fetch = FakeFetch(reviews_answer("v1", None))
    app = App("productpage", "productpage-v1", "v1", fetch, reviews=REVIEWS,
              rng=random.Random(1))
    await app.handle(get("/productpage"))
    await app.handle(get("/productpage"))
    sent = [dict(h)["traceparent"] for _, _, h in fetch.calls]
    assert all(re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", tp) for tp in sent)
    assert sent[0] != sent[1]  # a new trace per request
    assert "end-user" not in dict(fetch.calls[0][2])


@pytest.mark.parametrize("version,calls", [("v1", False), ("v2", True), ("v3", True)])
async def test_reviews_calls_ratings_only_from_v2_and_v3(version: str, calls: bool) -> None:
    fetch = FakeFetch(bookinfo.ratings_reply("0"))
    app = App("reviews", f"reviews-{version}", version, fetch, ratings=RATINGS)
    reply = await app.handle(get("/reviews/0", ("end-user", "jason"), ("traceparent", TRACE),
                                 ("x-other", "no")))
    assert reply.status == 200
    ratings = [r.get("rating") for r in reply.json()["reviews"]]
    if calls:
        [(peer, path, headers)] = fetch.calls
        assert (peer, path) == (RATINGS, "/ratings/0")
        assert dict(headers) == {"end-user": "jason", "traceparent": TRACE}
        color = bookinfo.STAR_COLOR[version]
        assert ratings == [{"stars": 5, "color": color}, {"stars": 4, "color": color}]
    else:
        assert fetch.calls == [] and ratings == [None, None]


@pytest.mark.parametrize("answer", [
    Reply(500, b"fault filter abort", "text/plain"),  # the waypoint's injected fault
    Reply(500, bookinfo.ratings_reply("0").body),  # a failure is one even with a good body
    Reply(503, b"no healthy upstream", "text/plain"),
    Reply(200, b"{}"),  # no ratings in it
    CallError("ratings (10.96.0.22:9080) unreachable: Connection refused"),
    None,  # never answers: the call times out
])
async def test_a_failed_ratings_call_shows_as_unavailable(answer: Reply | CallError | None
                                                          ) -> None:
    app = App("reviews", "reviews-v2", "v2", FakeFetch(answer), ratings=RATINGS,
              call_timeout=0.05)
    reply = await app.handle(get("/reviews/0"))
    assert reply.status == 200
    assert [r["rating"] for r in reply.json()["reviews"]] == [
        {"error": RATINGS_UNAVAILABLE}] * 2


async def test_unknown_paths_and_methods() -> None:
    app = App("ratings", "ratings-v1", "v1", FakeFetch())
    assert (await app.handle(get("/reviews/0"))).status == 404
    assert (await app.handle(Request("POST", "/ratings/0", "HTTP/1.1", (), b""))).status == 405
    assert (await app.handle(get("/health"))).json() == {"status": "ratings is healthy"}


# -- HTTP/1.1 bytes -----------------------------------------------------------------------------


def test_take_request_waits_for_the_whole_request_and_leaves_the_next() -> None:
    buf = bytearray(b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nab")
    assert take_request(buf) is None
    buf += b"cGET /b HTTP/1.1\r\n\r\n"
    first = take_request(buf)
    assert first is not None and (first.target, first.body) == ("/a", b"abc")
    second = take_request(buf)
    assert second is not None and second.target == "/b" and buf == b""


@pytest.mark.parametrize("raw", [
    b"GET /a HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"GET /a HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
    b"GET /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"NONSENSE\r\n\r\n",
    b"GET /a HTTP/1.1\r\nX: " + b"y" * 70000,
])
def test_take_request_refuses_what_it_cannot_serve(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        take_request(bytearray(raw))


def feed_all(reader: ResponseReader, raw: bytes, step: int) -> bool:
    done = False
    for i in range(0, len(raw), step):
        done = reader.feed(raw[i : i + step])
    return done


@pytest.mark.parametrize("step", [1, 7, 1000])
def test_response_reader_by_length_and_chunked(step: int) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
    r = ResponseReader()
    assert feed_all(r, raw, step)
    assert r.reply() == Reply(200, b"hello", "text/plain",
                              (("content-type", "text/plain"), ("content-length", "5")))
    chunked = (b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5;ext=1\r\nfault\r\n6\r\n abort\r\n0\r\nX-Trailer: t\r\n\r\n")
    r = ResponseReader()
    assert feed_all(r, chunked, step)
    assert (r.reply().status, r.reply().body) == (500, b"fault abort")


def test_response_reader_to_the_end_of_the_connection_and_truncation() -> None:
    r = ResponseReader()
    assert not r.feed(b"HTTP/1.0 200 OK\r\n\r\nuntil close")
    r.feed_eof()
    assert r.reply().body == b"until close"
    short = ResponseReader()
    short.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(CallError, match="before the response was complete"):
        short.feed_eof()
    for garbled in (b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
                    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxx"):
        with pytest.raises(CallError):
            ResponseReader().feed(garbled)


# -- on loopback --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(app: App) -> AsyncIterator[Peer]:
    async with running(app, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        yield Peer(app.role, "127.0.0.1", port)


@pytest.fixture
def unused_port() -> Iterator[int]:
    import socket

    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


async def test_the_three_services_on_loopback() -> None:
    async with contextlib.AsyncExitStack() as stack:
        ratings = await stack.enter_async_context(
            serving(App("ratings", "ratings-v1", "v1", http_get)))
        reviews = await stack.enter_async_context(serving(
            App("reviews", "reviews-v3", "v3", http_get, ratings=Peer.parse(
                "ratings", f"127.0.0.1:{ratings.port}"))))
        front = await stack.enter_async_context(serving(
            App("productpage", "productpage-v1", "v1", http_get, reviews=Peer.parse(
                "reviews", f"127.0.0.1:{reviews.port}"))))
        page = await http_get(Peer("productpage", "127.0.0.1", front.port), "/productpage",
                              (("end-user", "jason"),))
        assert page.status == 200
        assert page.header("x-served-by") == "productpage-v1/v1"
        assert page.header("x-reviews") == "reviews-v3/v3"
        assert page.header("x-ratings") == "red 5 4"
        assert "signed in as: jason" in page.body.decode()


async def test_refused_and_silent_peers_show_as_unavailable(unused_port: int) -> None:
    refused = Peer("ratings", "127.0.0.1", unused_port)
    with pytest.raises(CallError, match="unreachable"):
        await http_get(refused, "/ratings/0", ())

    loop = asyncio.get_running_loop()
    accepted: list[asyncio.BaseTransport] = []

    class Silent(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.append(transport)

    silent_server = await loop.create_server(Silent, "127.0.0.1", 0)
    silent = Peer("ratings", "127.0.0.1", silent_server.sockets[0].getsockname()[1])
    try:
        for peer in (refused, silent):
            app = App("reviews", "reviews-v2", "v2", http_get, ratings=peer, call_timeout=0.2)
            async with serving(app) as reviews:
                reply = await http_get(reviews, "/reviews/0", ())
            assert reply.status == 200
            assert {r["rating"]["error"] for r in reply.json()["reviews"]} == {
                RATINGS_UNAVAILABLE}
    finally:
        silent_server.close()
        for t in accepted:
            t.close()
        await silent_server.wait_closed()


async def exchange(port: int, raw: bytes) -> bytes:
    """Send ``raw`` to 127.0.0.1:port; everything the server sends until it closes."""
    loop = asyncio.get_running_loop()
    got: asyncio.Queue[bytes | None] = asyncio.Queue()

    class Client(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            got.put_nowait(data)

        def connection_lost(self, exc: Exception | None) -> None:
            got.put_nowait(None)

    transport, _ = await loop.create_connection(Client, "127.0.0.1", port)
    answer = b""
    try:
        transport.write(raw)
        async with asyncio.timeout(5):
            while (chunk := await got.get()) is not None:
                answer += chunk
    finally:
        transport.close()
    return answer


async def test_keep_alive_pipelined_requests_are_answered_in_order() -> None:
    async with serving(App("ratings", "ratings-v1", "v1", http_get)) as ratings:
        raw = await exchange(ratings.port, (
            b"GET /ratings/1 HTTP/1.1\r\nHost: r\r\n\r\n"
            b"GET /ratings/2 HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n"))
    bodies = [json.loads(part.split(b"\r\n\r\n", 1)[1]) for part in
              raw.split(b"HTTP/1.1 ")[1:]]
    assert [b["id"] for b in bodies] == [1, 2]
    assert raw.count(b"connection: keep-alive") == 1 and raw.count(b"connection: close") == 1


async def test_a_bad_request_gets_400_and_the_connection_closes() -> None:
    async with serving(App("ratings", "ratings-v1", "v1", http_get)) as ratings:
        raw = await exchange(ratings.port, b"BROKEN\r\n\r\n")  # returns: the server closed
    reader = ResponseReader()
    assert reader.feed(raw) and reader.reply().status == 400


# -- the world and the story's objects ----------------------------------------------------------


def test_world_puts_bookinfo_behind_its_waypoint() -> None:
    layout = plan(topology_spec(DEFAULT_WORLD, "zdtest02"))
    objs = manifests(DEFAULT_WORLD, layout)
    by = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objs}
    labels = by[("Namespace", None, BOOKINFO_NS)]["metadata"]["labels"]
    assert labels["istio.io/dataplane-mode"] == "ambient"
    assert labels["istio.io/use-waypoint"] == BOOKINFO_WAYPOINT
    gateway = by[("Gateway", BOOKINFO_NS, BOOKINFO_WAYPOINT)]
    assert gateway["spec"]["gatewayClassName"] == "istio-waypoint"
    reviews = [by[("Pod", BOOKINFO_NS, f"reviews-{v}")] for v in ("v1", "v2", "v3")]
    assert {p["metadata"]["labels"]["version"] for p in reviews} == {"v1", "v2", "v3"}
    assert {p["spec"]["nodeName"] for p in reviews} == {"node1", "node2"}
    assert {p["spec"]["containers"][0]["image"] for p in reviews} == {"ztunnel-py/demo-bookinfo"}
    for name in ("productpage", "reviews", "ratings"):
        svc = by[("Service", BOOKINFO_NS, name)]
        assert svc["spec"]["ports"][0]["port"] == svc["spec"]["ports"][0]["targetPort"] == 9080
    # helloworld's pods keep the addresses they had before bookinfo joined
    assert layout.pod("helloworld-v1").ip == "10.244.2.2"
    assert layout.pod("client").ip == "10.244.1.2"


def test_the_world_and_the_story_objects_translate_without_problems(tmp_path: Path) -> None:
    layout = plan(topology_spec(DEFAULT_WORLD, "zdtest03"))
    story = [
        story_mod.destination_rule("reviews", ("v1", "v2", "v3")),
        story_mod.reviews_canary(story_mod.CANARY_WEIGHTS),
        story_mod.ratings_abort(story_mod.USER),
    ]
    write_objects(tmp_path, [(ref_of(o, "t"), o) for o in [*manifests(DEFAULT_WORLD, layout),
                                                             *story]])
    assert analyze(tmp_path) == []
    assert sum(story_mod.CANARY_WEIGHTS.values()) == 100
    write_objects(tmp_path, [(ref_of(o, "t"), o) for o in [
        story_mod.reviews_by_user(story_mod.USER, "v2", "v3")]])
    assert analyze(tmp_path) == []
