"""HTTP/2 (and gRPC) on ``h2``: the downstream server connection and the upstream client.

Cleartext HTTP/2 with prior knowledge (what gRPC clients speak inside the
mesh's HBONE tunnel). Streams are independent: each request is handled in its
own task; request bodies are buffered whole, responses are sent with HTTP/2
flow control (``_Sender``). Trailers (``grpc-status``) pass through both ways;
a gRPC answer the waypoint makes itself is "trailers-only" (one HEADERS frame
with ``grpc-status``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from waypoint.http1 import ConnInfo, Handler
from waypoint.pipe import Pipe
from waypoint.request import (
    HOP_BY_HOP,
    Body,
    BodyStream,
    Request,
    RequestBody,
    Response,
    UpstreamError,
    normalise,
)
from ztunnel_py import log


def _log() -> Any:
    """Resolved at each use, so that ``log.configure`` (run after imports) applies."""
    return log.get("waypoint.http2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_BODY = 16 << 20
WINDOW = 1 << 24


class _Sender:
    """Writes DATA for many streams within the peer's flow-control windows."""

    def __init__(self, conn: h2.connection.H2Connection, flush: Callable[[], None]) -> None:
        self.conn = conn
        self.flush = flush
        self.waiters: dict[int, asyncio.Future[None]] = {}

    async def send(self, stream_id: int, data: bytes, *, end: bool) -> None:
        view = memoryview(data)
        while view:
            window = min(self.conn.local_flow_control_window(stream_id),
                         self.conn.max_outbound_frame_size)
            if window <= 0:
                fut = asyncio.get_running_loop().create_future()
                self.waiters[stream_id] = fut
                try:
                    await fut
                finally:
                    self.waiters.pop(stream_id, None)
                continue
            chunk, view = view[:window], view[window:]
            self.conn.send_data(stream_id, bytes(chunk), end_stream=end and not view)
            self.flush()
        if end and not data:
            self.conn.end_stream(stream_id)
            self.flush()

    def window_opened(self, stream_id: int) -> None:
        targets = list(self.waiters) if stream_id == 0 else [stream_id]
        for sid in targets:
            fut = self.waiters.get(sid)
            if fut is not None and not fut.done():
                fut.set_result(None)

    def fail(self, stream_id: int) -> None:
        fut = self.waiters.get(stream_id)
        if fut is not None and not fut.done():
            fut.set_exception(UpstreamError("reset", "stream reset while sending"))

    def fail_all(self) -> None:
        for sid in list(self.waiters):
            self.fail(sid)


def _is_grpc(headers: list[tuple[str, str]]) -> bool:
    return any(k == "content-type" and v.startswith("application/grpc") for k, v in headers)


def _config(client: bool) -> h2.config.H2Configuration:
    return h2.config.H2Configuration(client_side=client, header_encoding="utf-8",
                                     validate_inbound_headers=False)


def _initial_settings(conn: h2.connection.H2Connection) -> None:
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                          h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000})
    conn.increment_flow_control_window(WINDOW)


@dataclass
class _InStream:
    headers: list[tuple[str, str]]
    body: bytearray = field(default_factory=bytearray)
    task: asyncio.Task[None] | None = None
    streamed: RequestBody | None = None  # gRPC: handled from the headers on


class H2Server:
    """One downstream HTTP/2 connection."""

    def __init__(self, pipe: Pipe, info: ConnInfo, handler: Handler,
                 spawn: Callable[[Awaitable[None]], asyncio.Task[None]]) -> None:
        self.pipe = pipe
        self.info = info
        self.handler = handler
        self.spawn = spawn
        self.conn = h2.connection.H2Connection(_config(False))
        self.conn.initiate_connection()
        _initial_settings(self.conn)
        self.sender = _Sender(self.conn, self.flush)
        self.streams: dict[int, _InStream] = {}
        self.closed = False
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.closed:
            self.pipe.write(data)

    def on_data(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            _log().info("HTTP/2 protocol error from client", error=str(exc))
            self.flush()
            self._close()
            return
        for ev in events:
            self._event(ev)
        self.flush()

    def on_eof(self) -> None:
        self._close()

    def on_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.sender.fail_all()
        for s in self.streams.values():
            if s.task is not None:
                s.task.cancel()
        self.streams.clear()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pipe.close()

    def _event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            assert ev.stream_id is not None and ev.headers is not None
            new = _InStream(normalise(ev.headers))  # type: ignore[arg-type]
            self.streams[ev.stream_id] = new
            if ev.stream_ended is None and _is_grpc(new.headers):
                # gRPC may stream both ways: handle it now, relay the body as it comes.
                sid = ev.stream_id
                new.streamed = RequestBody()
                new.streamed.on_consumed = lambda n: self._consumed(sid, n)
                new.task = self.spawn(self._serve(sid, new))
        elif isinstance(ev, h2.events.DataReceived):
            assert ev.stream_id is not None
            s = self.streams.get(ev.stream_id)
            flow = ev.flow_controlled_length or 0
            data = ev.data or b""
            if s is not None and s.streamed is not None:
                s.streamed.feed(data)  # credited when the upstream takes it
                if flow > len(data):
                    self.conn.acknowledge_received_data(flow - len(data), ev.stream_id)
                return
            self.conn.acknowledge_received_data(flow, ev.stream_id)
            if s is not None and data:
                s.body += data
                if len(s.body) > MAX_BODY:
                    self.conn.reset_stream(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                    del self.streams[ev.stream_id]
        elif isinstance(ev, h2.events.StreamEnded):
            assert ev.stream_id is not None
            s = self.streams.get(ev.stream_id)
            if s is not None and s.streamed is not None:
                s.streamed.end()
            elif s is not None and s.task is None:
                s.task = self.spawn(self._serve(ev.stream_id, s))
        elif isinstance(ev, h2.events.StreamReset):
            assert ev.stream_id is not None
            s = self.streams.pop(ev.stream_id, None)
            self.sender.fail(ev.stream_id)
            if s is not None and s.streamed is not None:
                s.streamed.fail(UpstreamError("reset", "the client reset the stream"))
            if s is not None and s.task is not None:
                s.task.cancel()
        elif isinstance(ev, h2.events.WindowUpdated):
            self.sender.window_opened(ev.stream_id or 0)
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            self.sender.window_opened(0)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._close()

    def request_of(self, headers: list[tuple[str, str]]) -> Request:
        pseudo = {k: v for k, v in headers if k.startswith(":")}
        rest = tuple((k, v) for k, v in headers if not k.startswith(":") and k not in HOP_BY_HOP)
        content_type = next((v for k, v in rest if k == "content-type"), "")
        return Request(
            method=pseudo.get(":method", "GET"), path=pseudo.get(":path", "/"),
            authority=pseudo.get(":authority", ""), headers=rest, port=self.info.dst[1],
            scheme=pseudo.get(":scheme", "http"), source=self.info.source,
            grpc=content_type.startswith("application/grpc"), dst=self.info.dst[0], http2=True,
        )

    def _consumed(self, stream_id: int, n: int) -> None:
        if self.closed or stream_id not in self.streams:
            return
        with contextlib.suppress(h2.exceptions.H2Error):
            self.conn.acknowledge_received_data(n, stream_id)
            self.flush()

    async def _serve(self, stream_id: int, s: _InStream) -> None:
        req = self.request_of(s.headers)
        body: Body = s.streamed if s.streamed is not None else bytes(s.body)
        try:
            try:
                resp = await self.handler.handle(req, body)
            except asyncio.CancelledError:
                raise
            except Exception:
                _log().exception("waypoint handler failed")
                resp = Response(500, (("content-type", "text/plain"),), b"internal error")
            await self.respond(stream_id, resp)
        except (UpstreamError, h2.exceptions.H2Error):
            pass  # the client reset the stream or went away
        finally:
            self.streams.pop(stream_id, None)

    async def respond(self, stream_id: int, resp: Response) -> None:
        if self.closed:
            if resp.stream is not None:
                resp.stream.cancel()
            return
        headers = [(":status", str(resp.status))]
        headers += [(k, v) for k, v in resp.headers if k not in HOP_BY_HOP]
        if resp.stream is not None:
            await self._relay(stream_id, headers, resp.stream)
            return
        trailers = list(resp.trailers)
        only_headers = not resp.body and not trailers
        self.conn.send_headers(stream_id, headers, end_stream=only_headers)
        self.flush()
        if only_headers:
            return
        if resp.body:
            await self.sender.send(stream_id, resp.body, end=not trailers)
        if trailers:
            self.conn.send_headers(stream_id, trailers, end_stream=True)
            self.flush()

    async def _relay(self, stream_id: int, headers: list[tuple[str, str]],
                     body: BodyStream) -> None:
        """Headers now, then each chunk as the upstream sends it, then its trailers."""
        try:
            self.conn.send_headers(stream_id, headers)
            self.flush()
            try:
                async for chunk in body:
                    await self.sender.send(stream_id, chunk, end=False)
            except UpstreamError:
                with contextlib.suppress(h2.exceptions.H2Error):
                    self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
                    self.flush()
                return
            if body.trailers:
                self.conn.send_headers(stream_id, list(body.trailers), end_stream=True)
            else:
                self.conn.end_stream(stream_id)
            self.flush()
        finally:
            if not body.finished:
                body.cancel()  # the client went away: stop the upstream stream too


# -- upstream ----------------------------------------------------------------------------


@dataclass
class _OutStream:
    done: asyncio.Future[None]  # the whole response, or only its headers when streaming
    stream: BodyStream | None = None
    pump: asyncio.Task[None] | None = None  # sends a streamed request body
    status: int = 0
    headers: tuple[tuple[str, str], ...] = ()
    body: bytearray = field(default_factory=bytearray)
    trailers: tuple[tuple[str, str], ...] = ()
    error: UpstreamError | None = None


class H2Client:
    """One upstream HTTP/2 connection carrying many concurrent exchanges."""

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe
        self.conn = h2.connection.H2Connection(_config(True))
        self.conn.initiate_connection()
        _initial_settings(self.conn)
        self.sender = _Sender(self.conn, self.flush)
        self.streams: dict[int, _OutStream] = {}
        self.closed = False
        self.goaway = False
        self.requests = 0
        pipe.set_sink(self)
        self.flush()

    @property
    def usable(self) -> bool:
        return not self.closed and not self.goaway and (
            self.conn.open_outbound_streams < self.conn.remote_settings.max_concurrent_streams
        )

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.closed:
            self.pipe.write(data)

    def on_data(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._lost(UpstreamError("reset", f"HTTP/2 protocol error from upstream: {exc}"))
            self.pipe.abort()
            return
        for ev in events:
            self._event(ev)
        self.flush()

    def on_eof(self) -> None:
        self._lost(UpstreamError("reset", "upstream closed the connection"))
        self.pipe.close()

    def on_lost(self, exc: BaseException | None) -> None:
        self._lost(UpstreamError("reset", f"upstream connection lost: {exc or 'EOF'}"))

    def _lost(self, err: UpstreamError) -> None:
        self.closed = True
        self.sender.fail_all()
        for s in self.streams.values():
            self._fail(s, err)
        self.streams.clear()

    @staticmethod
    def _fail(s: _OutStream, err: UpstreamError) -> None:
        if s.pump is not None:
            s.pump.cancel()
        if not s.done.done():
            s.error = err
            s.done.set_result(None)
        elif s.stream is not None:
            s.stream.fail(err)

    def _event(self, ev: h2.events.Event) -> None:
        sid = getattr(ev, "stream_id", None)
        s = self.streams.get(sid) if sid is not None else None
        if isinstance(ev, h2.events.ResponseReceived) and s is not None:
            hdrs = normalise(ev.headers or [])
            s.status = int(next((v for k, v in hdrs if k == ":status"), "0"))
            s.headers = tuple((k, v) for k, v in hdrs if not k.startswith(":"))
            if s.stream is not None and not s.done.done() and ev.stream_ended is None:
                s.done.set_result(None)  # streaming: the caller goes on with the headers
        elif isinstance(ev, h2.events.DataReceived):
            assert ev.stream_id is not None
            flow = ev.flow_controlled_length or 0
            data = ev.data or b""
            if s is not None and s.stream is not None:
                s.stream.feed(data)  # credited when the consumer takes it
                if flow > len(data):
                    self.conn.acknowledge_received_data(flow - len(data), ev.stream_id)
            else:
                self.conn.acknowledge_received_data(flow, ev.stream_id)
                if s is not None and data:
                    s.body += data
        elif isinstance(ev, h2.events.TrailersReceived) and s is not None:
            s.trailers = normalise(ev.headers or [])
        elif isinstance(ev, h2.events.StreamEnded) and s is not None:
            self.streams.pop(ev.stream_id or 0, None)
            if s.pump is not None:
                s.pump.cancel()  # the server has answered in full: nothing more to send
            if s.stream is not None and not s.done.done():
                s.stream = None  # headers only (gRPC trailers-only): answer it whole
            if s.stream is not None:
                s.stream.end(s.trailers)
            if not s.done.done():
                s.done.set_result(None)
        elif isinstance(ev, h2.events.StreamReset):
            self.sender.fail(ev.stream_id or 0)
            if s is not None:
                self.streams.pop(ev.stream_id or 0, None)
                kind = ("refused-stream" if ev.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                        else "reset")
                self._fail(s, UpstreamError(kind, f"upstream reset the stream "
                                                  f"({ev.error_code!r})"))
        elif isinstance(ev, h2.events.WindowUpdated):
            self.sender.window_opened(ev.stream_id or 0)
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            self.sender.window_opened(0)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = True
            last = ev.last_stream_id or 0
            for sid2, st in list(self.streams.items()):
                if sid2 > last:
                    self._fail(st, UpstreamError("refused-stream", "upstream sent GOAWAY"))
                    self.streams.pop(sid2, None)

    async def _pump(self, sid: int, body: RequestBody) -> None:
        """Send a request body upstream as the client sends it, then END_STREAM."""
        try:
            async for chunk in body.replay():
                await self.sender.send(sid, chunk, end=False)
            if not self.closed and sid in self.streams:
                self.conn.end_stream(sid)
                self.flush()
        except (UpstreamError, h2.exceptions.H2Error):
            self._cancel(sid)

    def _consumed(self, sid: int, n: int) -> None:
        if self.closed:
            return
        with contextlib.suppress(h2.exceptions.H2Error):
            self.conn.acknowledge_received_data(n, sid)
            self.flush()

    def _cancel(self, sid: int) -> None:
        if self.streams.pop(sid, None) is not None and not self.closed:
            with contextlib.suppress(h2.exceptions.H2Error):
                self.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                self.flush()

    async def request(self, req: Request, body: Body, *, stream: bool = False) -> Response:
        """One exchange. With ``stream``, return at the response headers; the body follows
        in ``Response.stream``. A ``RequestBody`` is sent as it arrives."""
        if not self.usable:
            raise UpstreamError("refused-stream", "upstream HTTP/2 connection cannot take "
                                "another stream")
        self.requests += 1
        sid = self.conn.get_next_available_stream_id()
        st = _OutStream(asyncio.get_running_loop().create_future())
        if stream:
            st.stream = BodyStream()
            st.stream.on_consumed = lambda n: self._consumed(sid, n)
            st.stream.on_cancel = lambda: self._cancel(sid)
        self.streams[sid] = st
        headers = [(":method", req.method), (":scheme", req.scheme), (":path", req.path),
                   (":authority", req.authority)]
        headers += [(k, v) for k, v in req.headers if k not in HOP_BY_HOP]
        if req.grpc and not any(k == "te" for k, _ in headers):
            headers.append(("te", "trailers"))
        try:
            if isinstance(body, RequestBody):
                self.conn.send_headers(sid, headers)
                self.flush()
                st.pump = asyncio.get_running_loop().create_task(self._pump(sid, body))
            else:
                self.conn.send_headers(sid, headers, end_stream=not body)
                self.flush()
                if body:
                    await self.sender.send(sid, body, end=True)
            await st.done
        except asyncio.CancelledError:
            with contextlib.suppress(h2.exceptions.H2Error):
                self.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                self.flush()
            self.streams.pop(sid, None)
            if st.pump is not None:
                st.pump.cancel()
            raise
        except h2.exceptions.H2Error as exc:
            self.streams.pop(sid, None)
            raise UpstreamError("reset", f"cannot send to upstream: {exc}") from exc
        if st.error is not None:
            raise st.error
        if st.stream is not None:
            return Response(st.status, st.headers, stream=st.stream)
        return Response(st.status, st.headers, bytes(st.body), st.trailers)

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(h2.exceptions.H2Error):
                self.conn.close_connection()
                self.flush()
            self.closed = True
        self.pipe.close()  # also after a failure: never leave a transport half-closed
