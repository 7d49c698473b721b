"""HBONE over asyncio: Protocols around the sans-IO core, on TLS transports.

Every proxied byte flows between two *legs* (``Leg``): a TCP connection
(``ztunnel_py.proxy.relay.TcpLeg``) and an HBONE stream (``StreamLeg``), or two
TCP connections. A leg writes what its peer read and tells the peer to stop
(``pause_source``) when its own sink backs up, and to go on
(``resume_source``) once drained:

* a TCP sink backs up when its transport's write buffer passes the high-water
  mark (``pause_writing``);
* an HBONE sink backs up when the peer's flow-control window is exhausted or
  the TLS transport's write buffer is full;
* pausing a TCP source pauses its transport's reading; pausing an HBONE source
  stops crediting received DATA back to the remote, so *its* sender runs out
  of window.

Buffering per tunnel is therefore bounded by one stream window plus the
transports' high-water marks, whatever the speed of either end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import typing
from collections.abc import Callable
from typing import Any

from mypy_extensions import mypyc_attr

from ztunnel_py import log
from ztunnel_py.config import HboneConfig
from ztunnel_py.hbone import core
from ztunnel_py.hbone.core import FRAME_HEADER, HboneConnection, Role

_log = log.get("hbone")

# Write-buffer limits of the TLS transport carrying the streams.
TLS_HIGH_WATER = 1 << 20
TLS_LOW_WATER = 256 << 10
# TLS decrypts straight into this buffer (one per connection, reused): no allocation and
# no joining of 16 KiB records per read. Large payloads go from it to the TCP legs as
# views, small ones as copies (``core.LEND_MIN``); a leg whose transport could not take
# a view at once keeps it, and the connection reads into a fresh buffer from then on.
READ_BUFFER = 256 << 10
# A stream write this big goes out at once; smaller ones wait for the end of the loop
# iteration to share a TLS write with the connection's other frames, unless the
# connection was quiet (``HboneProtocol.flush_small``).
BULK_WRITE = 64 << 10
# Quiet: no small stream write on the connection for this long (ns). A connection with
# fewer than ~3,000 small writes/s has each alone in its loop iteration, and waiting
# for company costs a loop iteration for nothing; under load they come µs to tens of
# µs apart, several per iteration (saturated, 16 clients: 4 % still found it quiet).
QUIET_NS = 300_000


class TunnelRefused(Exception):
    """The HBONE server answered the CONNECT with a non-200 status."""

    def __init__(self, status: int, authority: str) -> None:
        hint = {
            core.BAD_REQUEST: "the destination is not a workload on that node",
            core.UNAUTHORIZED: "denied by the destination's authorization policy",
            core.SERVICE_UNAVAILABLE: "the destination workload refused or did not answer",
        }.get(status, "unexpected status")
        super().__init__(f"HBONE CONNECT {authority} got {status}: {hint}")
        self.status = status


class TunnelBroken(Exception):
    """The HBONE connection went away before or while the stream was set up."""


# subclassed outside the compiled modules (test fakes)
@mypyc_attr(allow_interpreted_subclasses=True)
class Leg:
    """One side of a relay. Subclasses move bytes; this class tracks completion."""

    def __init__(self) -> None:
        self.peer: Leg | None = None
        self.rx_bytes = 0  # bytes read from this leg's source (plain int adds)
        self.read_done = False
        self.write_done = False
        self.was_reset = False
        self.done = False
        self.on_done: Callable[[Leg], None] | None = None

    # -- the interface a peer calls ---------------------------------------------

    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def send_view(self, view: memoryview) -> bool:
        """Write ``view`` now, without copying it where the sink allows; whether the
        caller may reuse the buffer under it (False: the sink still holds it)."""
        self.send(view.tobytes())
        return True

    def send_framed(self, buf: memoryview, n: int) -> bool:
        """Send ``buf[FRAME_HEADER:FRAME_HEADER + n]``, a bulk read (at least
        ``LEND_MIN`` bytes: smaller ones go to ``send`` as copies, to be coalesced);
        ``buf[:FRAME_HEADER]`` is room a framing leg may write its header into (a TCP
        leg reads with that headroom), so the payload is never copied to be framed.
        Whether the caller may reuse ``buf``."""
        return self.send_view(buf[FRAME_HEADER : FRAME_HEADER + n])

    def send_eof(self) -> None:
        raise NotImplementedError

    def send_last(self, data: bytes | memoryview) -> None:
        """``data`` and then the end of this direction (``send_eof``), as one where the
        sink can: a TCP leg sends the data and its FIN in one segment. ``data`` may be
        a view into a buffer the caller reuses."""
        self.send(data if isinstance(data, bytes) else data.tobytes())
        self.send_eof()

    def reset(self) -> None:
        """Abort abruptly: TCP RST / RST_STREAM."""
        raise NotImplementedError

    def pause_source(self) -> None:
        raise NotImplementedError

    def resume_source(self) -> None:
        raise NotImplementedError

    def sink_blocked(self) -> bool:
        """Whether a peer starting up should stay paused."""
        return False

    def linger(self, seconds: float) -> None:
        """The peer leg ended with no error while this one still reads: what comes is
        dropped (``send`` of a done leg); a leg that can end itself does so within
        ``seconds``. (The base class has nothing to end.)"""

    # -- bookkeeping ---------------------------------------------------------------

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        cb, self.on_done = self.on_done, None
        if cb is not None:
            cb(self)


def join(a: Leg, b: Leg) -> None:
    a.peer = b
    b.peer = a


class StreamLeg(Leg):
    """An HBONE stream as a relay leg."""

    def __init__(self, conn: HboneProtocol, stream_id: int, authority: str) -> None:
        super().__init__()
        self.conn = conn
        self.stream_id = stream_id
        self.authority = authority
        self.headers: dict[str, str] = {}
        self._source_paused = False
        self._held_ack = 0
        self._early: list[bytes] = []  # DATA that arrived before the peer leg was attached
        self._early_eof = False
        self._sink_blocked = False  # the window is exhausted: our peer is paused
        self.response: asyncio.Future[StreamLeg] | None = None

    # the peer writes into the tunnel
    def send(self, data: bytes) -> None:
        if self.done or self.write_done:
            return
        self._queue(data)
        if len(data) >= BULK_WRITE:
            self.conn.flush_now()  # bulk: nothing to gain from waiting for company
        else:
            self.conn.flush_small()

    def send_last(self, data: bytes | memoryview) -> None:
        """The data and END_STREAM in one write (``send`` then ``send_eof`` could be
        two: a small write may go out at once), so that the far side reads both at
        once and hands its sink both as one ``send_last``."""
        if self.done or self.write_done:
            return
        self._queue(data if isinstance(data, bytes) else data.tobytes())
        self.send_eof()

    def _queue(self, data: bytes) -> None:
        if not self.conn.core.send(self.stream_id, data) and not self._sink_blocked:
            self._sink_blocked = True
            if self.peer is not None:
                self.peer.pause_source()

    def send_framed(self, buf: memoryview, n: int) -> bool:
        if self.done or self.write_done:
            return True
        free = self.conn.write_framed(self.stream_id, buf, n)
        if free is None:  # not one frame now: the queued path, with a copy
            self.send(buf[FRAME_HEADER : FRAME_HEADER + n].tobytes())
            return True
        return free

    def send_eof(self) -> None:
        """END_STREAM, written as a small write (``flush_small``): with anything queued
        before it, such as ``send_last``'s data, in one write."""
        if self.done or self.write_done:
            return
        self.write_done = True
        self.conn.core.end(self.stream_id)
        self.conn.flush_small()
        self._check()

    def reset(self) -> None:
        if self.done:
            return
        self.was_reset = True
        self.conn.core.reset(self.stream_id)
        self.conn.flush()
        self._check()

    def end_reading(self) -> None:
        """We have answered in full and will read no more of what the peer sends:
        END_STREAM once what we sent has gone out, then RST_STREAM with NO_ERROR (RFC
        9113 section 8.1), which a peer takes as the end of the exchange, not as an
        error (``_on_reset``). The leg is done once both are out."""
        if self.done:
            return
        self.write_done = True
        self.conn.core.end_reading(self.stream_id)
        self.conn.flush()
        self._check()

    def pause_source(self) -> None:
        self._source_paused = True

    def resume_source(self) -> None:
        self._source_paused = False
        if self._held_ack:
            n, self._held_ack = self._held_ack, 0
            self.conn.core.ack(self.stream_id, n)
            self.conn.flush()

    def sink_blocked(self) -> bool:
        return self._sink_blocked or self.conn.writing_paused

    def attach(self, peer: Leg) -> None:
        """Pair with ``peer`` and hand over anything that arrived early."""
        join(self, peer)
        early, self._early = self._early, []
        for chunk in early:
            peer.send(chunk)
        if self._early_eof:
            peer.send_eof()
        if self._sink_blocked or self.conn.writing_paused:
            peer.pause_source()
        if not self._source_paused and self._held_ack:
            # the early bytes are written out: give their window back
            self.resume_source()

    # events from the connection
    def _on_data(self, data: bytes | memoryview, flow_length: int, last: bool = False) -> None:
        """DATA for the peer; ``last``: the stream's END_STREAM comes next (the event
        after this one, which still ends the stream)."""
        self.rx_bytes += len(data)
        peer = self.peer
        if peer is None:
            self._early.append(data if isinstance(data, bytes) else data.tobytes())
            self._held_ack += flow_length
            return
        if last:
            peer.send_last(data)
        elif isinstance(data, bytes):
            peer.send(data)
        elif not peer.send_view(data):  # a view into the connection's read buffer
            self.conn.buffer_lent = True
        if self._source_paused:
            self._held_ack += flow_length
        else:
            self.conn.core.ack(self.stream_id, flow_length)

    def _on_end(self) -> None:
        self.read_done = True
        if self.peer is None:
            self._early_eof = True
        else:
            self.peer.send_eof()
        self._check()

    def _on_reset(self, error_code: int = core.CANCEL) -> None:
        if error_code == core.NO_ERROR and self.read_done and self.conn.role is Role.CLIENT:
            # The server answered in full (its END_STREAM came and our peer has its FIN)
            # and reads no more of ours (RFC 9113 section 8.1): the exchange is over, no
            # error. Our peer leg is not reset: it still writes out the whole answer,
            # and what it sends on is dropped (``send``: this leg is done) until it ends
            # or lingers too long (``Leg.linger``, from the relay).
            self.write_done = True
            self._check()
            return
        self.was_reset = True
        if self.response is not None and not self.response.done():
            self.response.set_exception(TunnelBroken(f"stream to {self.authority} was reset"))
        if self.peer is not None:
            self.peer.reset()
        self._check()

    def _on_writable(self) -> None:
        if self._sink_blocked:
            self._sink_blocked = False
            if self.peer is not None and not self.conn.writing_paused:
                self.peer.resume_source()
        if self.write_done:  # what we had to send is out: an ``end_reading`` may be done
            self._check()

    def _answered(self) -> bool:
        """Our CONNECT got its 200 (and ``attach`` is still to come, or came)."""
        r = self.response
        return r is not None and r.done() and not r.cancelled() and r.exception() is None

    def _check(self) -> None:
        if not self.done and not self.conn.core.is_open(self.stream_id):
            self.read_done = self.write_done = True
            if self._held_ack:
                # DATA not written on yet: the connection's window back, or every refusal
                # would shrink it for the other streams until they stall. A refused
                # CONNECT's first bytes are dropped; the answer of a tunnel that ended
                # before its peer leg was attached (a quick response and its END_STREAM)
                # is kept for ``attach``, which writes it and then the FIN.
                n, self._held_ack = self._held_ack, 0
                if not self._answered():
                    self._early = []
                    self._early_eof = False
                self.conn.core.ack(self.stream_id, n)
                self.conn.flush()
            self.conn.forget(self.stream_id)
            self._finish()


ConnectHandler = Callable[[StreamLeg], None]


# subclassed outside the compiled modules (the waypoint's HBONE server, waypoint.mesh)
@mypyc_attr(allow_interpreted_subclasses=True)
class HboneProtocol(asyncio.BufferedProtocol):
    """One HBONE connection (client or server role) on a TLS transport."""

    def __init__(
        self,
        role: Role,
        config: HboneConfig,
        *,
        on_connect: ConnectHandler | None = None,
        on_closed: Callable[[HboneProtocol, BaseException | None], None] | None = None,
        on_stream_done: Callable[[HboneProtocol, StreamLeg], None] | None = None,
        deferred: bool = False,
    ) -> None:
        """``deferred``: do not speak HTTP/2 until ``start()`` (the server checks the
        client's identity first; bytes that arrive meanwhile are kept)."""
        self.core = HboneConnection(role, config)
        self.role = role
        self.transport: asyncio.Transport | None = None
        # the loop we run on, kept: on Python 3.11 every asyncio.get_running_loop() is a
        # getpid() syscall, and flush() runs several times per tunnel
        self.loop: asyncio.AbstractEventLoop | None = None
        self.streams: dict[int, StreamLeg] = {}
        self.writing_paused = False
        self.lost = False
        self._on_connect = on_connect
        self._early: list[bytes] = []  # bytes that arrived before start()
        self._started = not deferred
        self._on_closed = on_closed
        self._on_stream_done = on_stream_done
        self._read_buffer = memoryview(bytearray(READ_BUFFER))
        self.core.lend_views = True  # (Data views into _read_buffer: see buffer_updated)
        self.buffer_lent = False  # a leg still holds a view into _read_buffer
        self._flush_pending = False
        self._last_small = 0  # time.monotonic_ns() of the last flush_small

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport.set_write_buffer_limits(TLS_HIGH_WATER, TLS_LOW_WATER)
        self.loop = asyncio.get_running_loop()
        if self._started:
            self.core.initiate()
            self.flush()

    def start(self) -> None:
        """Begin HTTP/2 on a deferred connection (after the peer's identity was checked)."""
        if self._started or self.lost:
            return
        self._started = True
        self.core.initiate()
        self.flush()
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._read_buffer[:nbytes])
        if self.buffer_lent:  # a sink still writes from it: the next read goes elsewhere
            self.buffer_lent = False
            self._read_buffer = memoryview(bytearray(READ_BUFFER))

    def data_received(self, data: bytes | memoryview) -> None:
        if not self._started:
            self._early.append(bytes(data))  # the read buffer is reused
            return
        try:
            events = self.core.receive(data)
        except core.ProtocolError as exc:
            _log.warning("hbone protocol error; closing connection", error=str(exc))
            self.flush_now()  # the GOAWAY h2 queued
            self.abort()
            return
        last = len(events) - 1
        for i, ev in enumerate(events):
            if not isinstance(ev, core.Data):
                self._dispatch(ev)
                continue
            # DATA, the usual event: dispatched here (no frame for it)
            sid, data, flow_length = ev.stream_id, ev.data, ev.flow_length
            leg = self.streams.get(sid)
            end = events[i + 1] if i < last else None
            if leg is None:
                self.core.ack(sid, flow_length)
            elif isinstance(end, core.StreamEnded) and end.stream_id == sid:
                # a stream's last data and its END_STREAM together (a response and the
                # server's close): the sink writes them as one (``Leg.send_last``)
                leg._on_data(data, flow_length, last=True)
            else:
                leg._on_data(data, flow_length)
        if self.core.wants_write:  # acks may have made a WINDOW_UPDATE, events replies
            self.flush()

    def eof_received(self) -> bool:
        return False  # TLS: close; connection_lost fails the streams

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.core.ended = True
        streams, self.streams = self.streams, {}
        for leg in streams.values():
            leg._on_reset()
            leg.read_done = leg.write_done = True
            leg._finish()
            if self._on_stream_done is not None:
                self._on_stream_done(self, leg)
        if self._on_closed is not None:
            self._on_closed(self, exc)

    def pause_writing(self) -> None:
        self.writing_paused = True
        for leg in list(self.streams.values()):
            if leg.peer is not None:
                leg.peer.pause_source()

    def resume_writing(self) -> None:
        self.writing_paused = False
        for leg in list(self.streams.values()):
            if leg.peer is not None and not leg._sink_blocked:
                leg.peer.resume_source()

    # -- API -------------------------------------------------------------------------

    def set_connect_handler(self, handler: ConnectHandler) -> None:
        self._on_connect = handler

    def flush(self) -> None:
        """Write what the core queued, at the end of this loop iteration: everything the
        streams of this connection produce in one iteration (DATA of many streams, a
        response and its END_STREAM, WINDOW_UPDATEs) goes out in one TLS write and one
        syscall instead of one each."""
        if self._flush_pending or self.lost:
            return
        loop = self.loop
        if loop is None or not loop.is_running():  # not running (closing down): write at once
            self.flush_now()
            return
        self._flush_pending = True
        loop.call_soon(self.flush_now)

    def flush_small(self) -> None:
        """``flush`` for a stream's small write: at once when the connection has been
        quiet (no small write for ``QUIET_NS``), as it then most likely has nothing else
        to send in this loop iteration, and the wait for company would cost a loop
        iteration of its own (an idle callback: ~3k instructions, 6 % of an agent's per
        kept-alive request, and a sixth of its L1 data misses). Writes that come close
        together (load) wait for the end of the iteration and share one TLS record, as
        ``flush``. Never later than ``flush``: only the wait is skipped."""
        now = time.monotonic_ns()
        quiet = now - self._last_small > QUIET_NS
        self._last_small = now
        if quiet and not self._flush_pending:
            self.flush_now()
        else:
            self.flush()

    def flush_now(self) -> None:
        self._flush_pending = False
        chunks = self.core.chunks_to_send()
        if chunks and self.transport is not None and not self.lost:
            if self.transport.is_closing():
                return
            # one write: TLS encrypts each write separately, so writelines would turn
            # every 9-byte frame header into a TLS record of its own (and a read on the
            # far side); joining costs one copy of bytes that encryption copies anyway
            self.transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def write_framed(self, stream_id: int, buf: memoryview, n: int) -> bool | None:
        """``buf[FRAME_HEADER:FRAME_HEADER + n]`` out now as one DATA frame of the stream,
        its header written into ``buf[:FRAME_HEADER]``: TLS encrypts straight from the
        leg's read buffer. None when the core cannot frame it in one piece now (nothing
        done: the caller sends a copy the queued way); else whether ``buf`` is free
        again (TLS consumes what it is given at once; False if the transport still
        holds some of it, or cannot tell)."""
        t = self.transport
        if t is None or self.lost or self.writing_paused or t.is_closing():
            return None
        head = self.core.frame_header(stream_id, n)
        if head is None:
            return None
        if self.core.wants_write:
            self.flush_now()  # what was queued before this frame goes first
        buf[:FRAME_HEADER] = head
        t.write(buf[: FRAME_HEADER + n])
        return not t.get_write_buffer_size()

    def open_stream(
        self, authority: str, *, forwarded: str = "", baggage: str = "", traceparent: str = ""
    ) -> asyncio.Future[StreamLeg]:
        """Send CONNECT; the future resolves with the leg on 200, else raises TunnelRefused."""
        response = self.open_leg(
            authority, forwarded=forwarded, baggage=baggage, traceparent=traceparent
        ).response
        assert response is not None
        return response

    def open_leg(
        self, authority: str, *, forwarded: str = "", baggage: str = "", traceparent: str = ""
    ) -> StreamLeg:
        """Send CONNECT; the leg's ``response`` future resolves as in ``open_stream``
        (the caller holds the leg, so it can reset a stream it stops waiting for)."""
        if self.lost or not self.core.can_open:
            raise TunnelBroken("connection cannot take more streams")
        sid = self.core.open(
            authority, forwarded=forwarded, baggage=baggage, traceparent=traceparent
        )
        leg = StreamLeg(self, sid, authority)
        leg.response = (self.loop or asyncio.get_running_loop()).create_future()
        self.streams[sid] = leg
        self.flush()
        return leg

    def respond(self, leg: StreamLeg, status: int) -> None:
        self.core.respond(leg.stream_id, status)
        self.flush()
        leg._check()

    def forget(self, stream_id: int) -> None:
        leg = self.streams.pop(stream_id, None)
        if leg is not None and self._on_stream_done is not None:
            self._on_stream_done(self, leg)

    def close(self) -> None:
        """GOAWAY then close the transport (open streams are failed by connection_lost)."""
        self.core.close()
        self.flush_now()
        if self.transport is not None and not self.lost:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()

    @property
    def active_streams(self) -> int:
        return len(self.streams)

    def peer_info(self, key: str) -> Any:
        return self.transport.get_extra_info(key) if self.transport is not None else None

    # -- events ----------------------------------------------------------------------

    def _dispatch(self, ev: core.Event) -> None:
        """Every event but ``Data`` (``data_received`` takes those itself)."""
        if isinstance(ev, core.Writable):
            leg = self.streams.get(ev.stream_id)
            if leg is not None:
                leg._on_writable()
        elif isinstance(ev, core.StreamEnded):
            leg = self.streams.get(ev.stream_id)
            if leg is not None:
                leg._on_end()
        elif isinstance(ev, core.StreamReset):
            leg = self.streams.get(ev.stream_id)
            if leg is not None:
                leg._on_reset(ev.error_code)
        elif isinstance(ev, core.ConnectRequested):
            leg = StreamLeg(self, ev.stream_id, ev.authority)
            leg.headers = dict(ev.headers)
            self.streams[ev.stream_id] = leg
            if self._on_connect is None:
                self.respond(leg, core.SERVICE_UNAVAILABLE)
            else:
                self._on_connect(leg)
        elif isinstance(ev, core.ConnectResponse):
            leg = self.streams.get(ev.stream_id)
            if leg is None or leg.response is None or leg.response.done():
                return
            if ev.status == core.OK:
                leg.response.set_result(leg)
            else:
                leg.response.set_exception(TunnelRefused(ev.status, leg.authority))
                leg._check()
        elif isinstance(ev, core.ConnectionEnded):
            _log.debug("hbone peer sent GOAWAY", error_code=ev.error_code)
            if not self.streams and self.transport is not None:
                with contextlib.suppress(Exception):
                    self.transport.close()
