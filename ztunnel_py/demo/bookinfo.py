"""A bookinfo-like app (Istio's sample, in small): productpage -> reviews v1|v2|v3 -> ratings.

    productpage  GET /productpage    calls reviews (GET /reviews/0) and renders a page naming
                                     the reviews pod that answered and what ratings said
    reviews v1   GET /reviews/<id>   two reviews, no ratings
    reviews v2   GET /reviews/<id>   calls ratings: black stars
    reviews v3   GET /reviews/<id>   calls ratings: red stars
    ratings      GET /ratings/<id>   {"id": <id>, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}

A peer is called at the address given on the command line (``--reviews`` /
``--ratings HOST:PORT``, the Service's VIP: the demo's pods have no DNS), with
the peer's name as ``Host``, forwarding ``end-user`` and the W3C trace context
(``traceparent``, ``tracestate``) as the real bookinfo does; productpage starts
a trace when the request brings none. A failed call (refused, reset, timed out,
or a non-200 answer such as an injected fault) is shown the way bookinfo shows
it ("Ratings service is currently unavailable", "Sorry, product reviews are
currently unavailable for this book."), never as a crash.

Every response names its pod and version in ``x-served-by`` (as the helloworld
service does); productpage also says in ``x-reviews`` who answered for reviews
and in ``x-ratings`` what ratings said (``black 5 4``, ``red 5 4``, ``none``
from v1, ``unavailable``), so that scripts need not read the HTML.

HTTP/1.1 on asyncio Protocols (no streams), uvloop when available; stdlib only.

    python -m ztunnel_py.demo.bookinfo --role reviews --pod reviews-v2 --version v2 \
        --port 9080 --ratings 10.96.0.22:9080
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import html
import json
import random
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any, cast

from ztunnel_py.demo.httpservice import (
    MAX_BODY,
    MAX_HEAD,
    BadRequest,
    Request,
    response,
    take_request,
)

ROLES = ("productpage", "reviews", "ratings")
PORT = 9080
CALL_TIMEOUT = 3.0  # productpage -> reviews and reviews -> ratings, each
FORWARDED = ("end-user", "traceparent", "tracestate")
STAR_COLOR = {"v2": "black", "v3": "red"}  # reviews versions that call ratings
RATINGS_UNAVAILABLE = "Ratings service is currently unavailable"
REVIEWS_UNAVAILABLE = "Sorry, product reviews are currently unavailable for this book."
PRODUCT_ID, TITLE, AUTHOR = 0, "The Comedy of Errors", "William Shakespeare"
REVIEWS = (
    ("Reviewer1", "An extremely entertaining play by Shakespeare. "
                  "The slapstick humour is refreshing!"),
    ("Reviewer2", "Absolutely fun and entertaining. "
                  "The play lacks thematic depth when compared to other plays by Shakespeare."),
)
RATINGS = {"Reviewer1": 5, "Reviewer2": 4}

Headers = tuple[tuple[str, str], ...]


class CallError(Exception):
    """A call to a peer failed; the message says which peer and how."""


@dataclass(frozen=True)
class Peer:
    """A service this app calls: its name (the ``Host``) and address (the VIP)."""

    name: str
    host: str
    port: int

    @property
    def authority(self) -> str:
        return f"{self.name}:{self.port}"

    @classmethod
    def parse(cls, name: str, address: str) -> Peer:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--{name} {address!r}: expected HOST:PORT, e.g. 10.96.0.21:9080")
        return cls(name, host, int(port))


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Headers = ()

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)


# A call to a peer: (peer, path, headers to send) -> its reply, or CallError.
Fetch = Callable[[Peer, str, Headers], Awaitable[Reply]]


def _json(status: int, obj: object) -> Reply:
    return Reply(status, (json.dumps(obj) + "\n").encode())


# -- the pure parts ---------------------------------------------------------------------------


def forwarded(req: Request) -> Headers:
    """The headers a hop passes on: the user and the trace context."""
    return tuple((k, v) for k, v in req.headers if k in FORWARDED)


def new_traceparent(rng: random.Random) -> str:
    return f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64):016x}-01"


def ratings_reply(product_id: str) -> Reply:
    if not product_id.isdigit():
        return _json(400, {"error": "please provide numeric product ID"})
    return _json(200, {"id": int(product_id), "ratings": RATINGS})


def reviews_reply(product_id: str, pod: str, version: str,
                  ratings: Mapping[str, int] | CallError | None) -> Reply:
    """reviews' answer: ``ratings`` is what ratings said, its failure, or None (v1 asks not)."""
    reviews = []
    for reviewer, text in REVIEWS:
        review: dict[str, Any] = {"reviewer": reviewer, "text": text}
        if isinstance(ratings, CallError):
            review["rating"] = {"error": RATINGS_UNAVAILABLE}
        elif ratings is not None and reviewer in ratings:
            review["rating"] = {"stars": ratings[reviewer], "color": STAR_COLOR[version]}
        reviews.append(review)
    return _json(200, {"id": product_id, "podname": pod, "reviews": reviews})


@dataclass(frozen=True)
class ReviewsView:
    """What productpage shows of reviews' answer (or of its failure)."""

    served_by: str  # reviews' x-served-by, "" when it did not answer
    reviews: tuple[tuple[str, str, str], ...] = ()  # (reviewer, text, rating as shown)
    ratings: str = "none"  # the x-ratings summary
    error: str = ""

    @classmethod
    def of(cls, reply: Reply | CallError) -> ReviewsView:
        if isinstance(reply, CallError):
            return cls("", error=f"{REVIEWS_UNAVAILABLE} ({reply})")
        served_by = reply.header("x-served-by") or ""
        try:
            doc = reply.json()
            rows = [(str(r["reviewer"]), str(r["text"]), r.get("rating")) for r in doc["reviews"]]
        except (ValueError, KeyError, TypeError, AttributeError):
            return cls(served_by, error=f"{REVIEWS_UNAVAILABLE} (reviews sent no reviews)")
        shown, stars, colors, unavailable = [], [], set(), False
        for reviewer, text, rating in rows:
            if isinstance(rating, dict) and "error" in rating:
                unavailable = True
                shown.append((reviewer, text, str(rating["error"])))
            elif isinstance(rating, dict) and isinstance(rating.get("stars"), int):
                n = max(0, min(5, rating["stars"]))
                color = str(rating.get("color", "black"))
                color = color if color.isalpha() and color.isascii() else "unknown"  # a header
                stars.append(str(n))
                colors.add(color)
                shown.append((reviewer, text, "\u2605" * n + "\u2606" * (5 - n) + f" ({color})"))
            else:
                shown.append((reviewer, text, ""))
        summary = ("unavailable" if unavailable
                   else " ".join([*sorted(colors), *stars]) if stars else "none")
        return cls(served_by, tuple(shown), summary)


def productpage_reply(user: str, view: ReviewsView) -> Reply:
    e = html.escape
    lines = [
        "<!DOCTYPE html>",
        "<html><head><title>Simple Bookstore App</title></head><body>",
        f"<h1>{e(TITLE)}</h1>",
        f"<p>by {e(AUTHOR)}; signed in as: {e(user or '(nobody)')}</p>",
        "<h2>Book Reviews</h2>",
    ]
    if view.error:
        lines.append(f"<p>{e(view.error)}</p>")
    else:
        lines.append(f"<p>reviews served by: {e(view.served_by)}</p>")
        for reviewer, text, rating in view.reviews:
            lines.append(f"<blockquote><p>{e(text)}</p><small>{e(reviewer)}</small>"
                         + (f": <span>{e(rating)}</span>" if rating else "") + "</blockquote>")
    lines.append("</body></html>")
    return Reply(200, ("\n".join(lines) + "\n").encode(), "text/html; charset=utf-8",
                 (("x-reviews", view.served_by or ("unavailable" if view.error else "unknown")),
                  ("x-ratings", view.ratings)))


_BLOCKS = frozenset({"p", "h1", "h2", "blockquote", "title"})


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.current: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCKS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in _BLOCKS:
            self._flush()

    def handle_data(self, data: str) -> None:
        self.current.append(data)

    def _flush(self) -> None:
        text = " ".join("".join(self.current).split())
        if text:
            self.lines.append(text)
        self.current = []


def page_text(page: str) -> list[str]:
    """The visible lines of a page, as a browser's reader view would give them."""
    parser = _Text()
    parser.feed(page)
    parser.close()
    parser._flush()
    return parser.lines


# -- the app: a request in, a reply out -------------------------------------------------------


@dataclass
class App:
    role: str
    pod: str
    version: str
    fetch: Fetch
    reviews: Peer | None = None
    ratings: Peer | None = None
    call_timeout: float = CALL_TIMEOUT
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r}: expected one of {', '.join(ROLES)}")
        if self.role == "productpage" and self.reviews is None:
            raise ValueError("productpage needs the reviews address (--reviews HOST:PORT)")
        if self.calls_ratings and self.ratings is None:
            raise ValueError(f"reviews {self.version} needs the ratings address "
                             "(--ratings HOST:PORT)")

    @property
    def calls_ratings(self) -> bool:
        return self.role == "reviews" and self.version in STAR_COLOR

    async def handle(self, req: Request) -> Reply:
        path = req.target.split("?", 1)[0]
        if req.method != "GET":
            return _json(405, {"error": f"{req.method} not allowed"})
        if path == "/health":
            return _json(200, {"status": f"{self.role} is healthy"})
        if self.role == "productpage" and path in ("/", "/productpage"):
            return await self._productpage(req)
        if self.role == "reviews" and path.startswith("/reviews/"):
            return await self._reviews(req, path.removeprefix("/reviews/"))
        if self.role == "ratings" and path.startswith("/ratings/"):
            return ratings_reply(path.removeprefix("/ratings/"))
        return _json(404, {"error": f"{self.role} has no {path}"})

    async def _productpage(self, req: Request) -> Reply:
        assert self.reviews is not None
        headers = forwarded(req)
        if req.header("traceparent") is None:
            headers += (("traceparent", new_traceparent(self.rng)),)
        view = ReviewsView.of(await self._call(self.reviews, f"/reviews/{PRODUCT_ID}", headers))
        return productpage_reply(req.header("end-user") or "", view)

    async def _reviews(self, req: Request, product_id: str) -> Reply:
        ratings: Mapping[str, int] | CallError | None = None
        if self.calls_ratings:
            assert self.ratings is not None
            got = await self._call(self.ratings, f"/ratings/{product_id}", forwarded(req))
            ratings = got if isinstance(got, CallError) else _ratings_of(got)
        return reviews_reply(product_id, self.pod, self.version, ratings)

    async def _call(self, peer: Peer, path: str, headers: Headers) -> Reply | CallError:
        try:
            async with asyncio.timeout(self.call_timeout):
                reply = await self.fetch(peer, path, headers)
        except CallError as exc:
            return exc
        except TimeoutError:
            return CallError(f"{peer.name} did not answer within {self.call_timeout:g}s")
        if reply.status != 200:
            return CallError(f"{peer.name} answered {reply.status}")
        return reply


def _ratings_of(reply: Reply) -> Mapping[str, int] | CallError:
    try:
        ratings = reply.json()["ratings"]
        return {str(k): int(v) for k, v in ratings.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return CallError("ratings sent no ratings")


# -- HTTP/1.1 on the wire ---------------------------------------------------------------------


def render(reply: Reply, pod: str, version: str, keep_alive: bool) -> bytes:
    return response(reply.status, reply.content_type, reply.body,
                    (("x-served-by", f"{pod}/{version}"), *reply.headers), keep_alive)


class ResponseReader:
    """Sans-IO reader of one HTTP/1.1 response: ``feed`` bytes, then ``reply()``.

    Bodies by content-length, chunked, or up to the end of the connection.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.status = 0
        self.headers: Headers = ()
        self.body = bytearray()
        self.done = False
        self._length: int | None = None
        self._chunked = False
        self._head_done = False

    def feed(self, data: bytes) -> bool:
        """Take bytes; True once the response is complete. :class:`CallError` if garbled."""
        self.buf += data
        if not self._head_done:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    raise CallError("response head too large")
                return False
            self._head(bytes(self.buf[:end]))
            del self.buf[: end + 4]
        if self._chunked:
            self._chunks()
        elif self._length is not None:
            if len(self.buf) > self._length:
                raise CallError("response longer than its content-length")
            self.done = len(self.buf) == self._length
            if self.done:
                self.body = self.buf
        elif len(self.buf) > MAX_BODY:
            raise CallError("response body too large")
        return self.done

    def feed_eof(self) -> None:
        """The connection ended: complete if the body runs to the end, else CallError."""
        if self.done:
            return
        if self._head_done and self._length is None and not self._chunked:
            self.body, self.done = self.buf, True
            return
        raise CallError("connection closed before the response was complete")

    def reply(self) -> Reply:
        assert self.done
        ctype = dict(self.headers).get("content-type", "")
        return Reply(self.status, bytes(self.body), ctype, self.headers)

    def _head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise CallError(f"bad status line {lines[0]!r:.80}")
        self.status = int(parts[1])
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise CallError(f"bad header line {line!r:.80}")
            headers.append((name.strip().lower(), value.strip()))
        self.headers = tuple(headers)
        fields = dict(headers)
        self._head_done = True
        if "chunked" in fields.get("transfer-encoding", "").lower():
            self._chunked = True
        elif "content-length" in fields:
            if not fields["content-length"].isdigit():
                raise CallError(f"bad content-length {fields['content-length']!r}")
            self._length = int(fields["content-length"])
        elif self.status in (204, 304) or 100 <= self.status < 200:
            self._length = 0

    def _chunks(self) -> None:
        while not self.done:
            end = self.buf.find(b"\r\n")
            if end < 0:
                return
            size_text = bytes(self.buf[:end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise CallError(f"bad chunk size {size_text!r:.20}") from None
            if size == 0:  # the last chunk, then trailers (ignored) and an empty line
                rest = bytes(self.buf[end + 2 :])
                self.done = rest.startswith(b"\r\n") or b"\r\n\r\n" in rest
                return
            if len(self.buf) < end + 2 + size + 2:
                return
            self.body += self.buf[end + 2 : end + 2 + size]
            if len(self.body) > MAX_BODY:
                raise CallError("response body too large")
            del self.buf[: end + 2 + size + 2]


class _CallProtocol(asyncio.Protocol):
    def __init__(self, request: bytes, done: asyncio.Future[Reply]) -> None:
        self.request = request
        self.done = done
        self.reader = ResponseReader()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(self.request)

    def data_received(self, data: bytes) -> None:
        try:
            if self.reader.feed(data) and not self.done.done():
                self.done.set_result(self.reader.reply())
        except CallError as exc:
            self._fail(exc)

    def eof_received(self) -> bool | None:
        try:
            self.reader.feed_eof()
            if not self.done.done():
                self.done.set_result(self.reader.reply())
        except CallError as exc:
            self._fail(exc)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(CallError(f"connection lost ({exc or 'closed'})"))

    def _fail(self, exc: CallError) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


async def http_get(peer: Peer, path: str, headers: Headers) -> Reply:
    """GET ``path`` from ``peer`` on a connection of its own, closed after (even if cancelled)."""
    lines = [f"GET {path} HTTP/1.1", f"host: {peer.authority}", "user-agent: bookinfo",
             "accept: application/json", "connection: close",
             *(f"{k}: {v}" for k, v in headers)]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Reply] = loop.create_future()
    transport: asyncio.BaseTransport | None = None
    try:
        transport, _ = await loop.create_connection(
            lambda: _CallProtocol(request, done), peer.host, peer.port)
        return await done
    except OSError as exc:
        raise CallError(f"{peer.name} ({peer.host}:{peer.port}) unreachable: "
                        f"{exc.strerror or exc}") from None
    finally:
        if transport is not None:
            transport.close()
        if not done.done():
            done.cancel()


class AppProtocol(asyncio.Protocol):
    """One server connection: requests in order, one at a time (pipelining is queued)."""

    def __init__(self, app: App, tasks: set[asyncio.Task[None]]) -> None:
        self.app = app
        self.tasks = tasks
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.peer_done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's aren't subclasses

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._next()

    def _next(self) -> None:
        t = self.transport
        if self.busy or t is None or t.is_closing():
            return
        try:
            req = take_request(self.buf)
        except (BadRequest, ValueError) as exc:
            self._write(_json(400, {"error": str(exc)}), keep_alive=False)
            return
        if req is None:
            if self.peer_done:
                t.close()
            return
        self.busy = True
        task = asyncio.get_running_loop().create_task(self._serve(req))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, req: Request) -> None:
        try:
            reply = await self.app.handle(req)
        except Exception as exc:  # a bug in a handler answers 500, the server lives on
            reply = _json(500, {"error": f"{type(exc).__name__}: {exc}"})
        self.busy = False
        self._write(reply, req.keep_alive and not self.peer_done)
        self._next()

    def _write(self, reply: Reply, keep_alive: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(render(reply, self.app.pod, self.app.version, keep_alive))
        if not keep_alive:
            self.transport.close()

    def eof_received(self) -> bool | None:
        self.peer_done = True
        self._next()  # answers what is complete, else closes
        return True  # keep our side open until the answer in progress is written

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


@contextlib.asynccontextmanager
async def running(app: App, host: str, port: int) -> AsyncIterator[asyncio.Server]:
    """Serve ``app`` on host:port; on exit stop listening, cancel handlers, close connections."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    protocols: list[AppProtocol] = []

    def factory() -> AppProtocol:
        protocols[:] = [p for p in protocols if p.transport is not None]
        protocols.append(AppProtocol(app, tasks))
        return protocols[-1]

    server = await loop.create_server(factory, host, port)
    try:
        yield server
    finally:
        server.close()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for p in protocols:
            if p.transport is not None:
                p.transport.close()
        await server.wait_closed()


async def serve(app: App, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running(app, host, port):
        peers = ", ".join(f"{p.name} at {p.host}:{p.port}" for p in (app.reviews, app.ratings)
                          if p is not None)
        print(f"bookinfo {app.role} {app.pod}/{app.version} listening on {host}:{port}"
              + (f"; calls {peers}" if peers else ""), flush=True)
        await stop.wait()


def command(role: str, pod: str, version: str, port: int = PORT,
            peers: Mapping[str, str] | None = None) -> list[str]:
    """The argv that runs one bookinfo service (``peers``: name -> "VIP:port")."""
    argv = [sys.executable, "-m", "ztunnel_py.demo.bookinfo", "--role", role, "--pod", pod,
            "--version", version, "--port", str(port)]
    for name, address in sorted((peers or {}).items()):
        argv += [f"--{name}", address]
    return argv


def app_from_args(args: argparse.Namespace, fetch: Fetch = http_get) -> App:
    return App(
        args.role, args.pod, args.version, fetch,
        reviews=Peer.parse("reviews", args.reviews) if args.reviews else None,
        ratings=Peer.parse("ratings", args.ratings) if args.ratings else None,
        call_timeout=args.call_timeout,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--pod", required=True, help="pod name to report")
    p.add_argument("--version", default="v1", help="version to report (reviews: v1, v2, v3)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=PORT)
    p.add_argument("--reviews", metavar="HOST:PORT", help="where productpage finds reviews")
    p.add_argument("--ratings", metavar="HOST:PORT", help="where reviews v2/v3 find ratings")
    p.add_argument("--call-timeout", type=float, default=CALL_TIMEOUT, metavar="SECONDS",
                   help="how long a call to reviews or ratings may take (default %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        app = app_from_args(args)
    except ValueError as exc:
        p.error(str(exc))
    runner = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    runner(serve(app, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
