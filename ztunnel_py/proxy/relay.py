"""The relay: bidirectional copy between two legs, with half-close, resets and byte counts.

``TcpLeg`` is an ``asyncio.BufferedProtocol`` over a plain TCP transport; it
pairs with another ``TcpLeg`` (passthrough, local delivery) or with an HBONE
``StreamLeg``. There is no per-byte Python work: each read is handed to the
peer as is, and flow control is transport pausing (see ``ztunnel_py.hbone.aio``).

Bytes are not copied on the way through in user space where it can be helped:
a leg reads into a buffer (one for all legs: a read is handed on before the
next starts), behind room for an HTTP/2 frame header, and its peer writes from
there (``Leg.send_framed``): an HBONE stream puts its DATA frame header in that
room and hands TLS the frame in place, a TCP leg writes the view. If the
peer's transport could not take it all at once (it keeps a reference), reads
go into a fresh buffer from then on; what a leg reads before it has a peer is
copied.

TCP semantics carried end to end:

* FIN from one side becomes ``send_eof`` on the other (``write_eof`` /
  END_STREAM); the reverse direction keeps flowing;
* a reset (``ECONNRESET``, RST_STREAM) becomes a reset on the other side: an
  abortive close with ``SO_LINGER`` 0, so the far client sees RST, not FIN;
* each transport is closed exactly once, when both directions are finished
  or on reset (uvloop 0.23 crashed under churn on never-closed transports).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios
import typing
from collections.abc import Callable

from mypy_extensions import mypyc_attr

from ztunnel_py.hbone.aio import Leg, join
from ztunnel_py.hbone.core import FRAME_HEADER, LEND_MIN
from ztunnel_py.telemetry.connection import ConnectionResult

# Write-buffer limits for TCP legs: big enough for throughput, bounded for memory.
TCP_HIGH_WATER = 1 << 20
TCP_LOW_WATER = 256 << 10
# What a leg keeps of its source before its peer leg exists (a client's first request
# while the tunnel is set up) before it pauses reading: a usual request never pauses, so
# reading is neither stopped nor restarted per connection (two syscalls each)
EARLY_LIMIT = 64 << 10
# One read: what one HBONE DATA frame carries (our SETTINGS_MAX_FRAME_SIZE default), so
# a full read goes out as one frame written in place.
READ_CHUNK = 256 << 10
# The short reads of a connection we dialled that look for a FIN behind them
# (``TcpLeg._fin_follows``): a one-request connection's response ends within its first
# few; a kept-alive connection stops paying the syscall after them.
FIN_PROBES = 8
_LINGER_ZERO = struct.pack("ii", 1, 0)
_TCP_CLOSE_WAIT = 8  # tcp_info.tcpi_state (include/net/tcp_states.h): the peer's FIN is in


def set_linger_zero(transport: asyncio.BaseTransport) -> None:
    """Make the next close send RST instead of FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)


class _ReadBuffer:
    """The read buffer all TCP legs share (header room included), as uvloop shares one
    between its streams: a read is handed on before the next one starts, so one buffer
    serves every leg of the loop, and an idle connection costs no buffer. When a peer
    keeps a view into it, the next read goes into a fresh one (``lent``)."""

    def __init__(self) -> None:
        self.lent()

    def lent(self) -> None:
        """(Also the start.) A peer holds ``buf`` now: reads go into a new one."""
        self.buf = memoryview(bytearray(FRAME_HEADER + READ_CHUNK))
        self.rx = self.buf[FRAME_HEADER:]  # where reads land


_READ = _ReadBuffer()


# subclassed outside the compiled modules (tests)
@mypyc_attr(allow_interpreted_subclasses=True)
class TcpLeg(Leg, asyncio.BufferedProtocol):
    """A TCP connection as a relay leg."""

    def __init__(
        self,
        *,
        start_paused: bool = False,
        on_made: Callable[[TcpLeg], None] | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        Leg.__init__(self)
        # the socket under the transport, when we have it (we dialled it): a short read
        # asks it whether the peer's FIN came with the data (``_fin_follows``)
        self._sock = sock
        self._fin_probes = FIN_PROBES if sock is not None else 0
        self.transport: asyncio.Transport | None = None
        self._start_paused = start_paused
        self._on_made = on_made
        self._source_paused = False
        self._closing = False
        # data that arrives before the peer leg exists, kept for it: up to EARLY_LIMIT,
        # then reading pauses (so this is bounded by the limit and one read)
        self._early: list[bytes] = []
        self._early_bytes = 0
        self._early_eof = False
        self._early_to: Leg | None = None  # where early data goes meanwhile (``hand_early``)
        self._linger: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport.set_write_buffer_limits(TCP_HIGH_WATER, TCP_LOW_WATER)
        # TCP_NODELAY: uvloop and asyncio set it on every TCP transport (accepted
        # sockets also inherit it from our listeners): no syscall for it here
        if self._start_paused:
            self.pause_source()
        on_made, self._on_made = self._on_made, None
        if on_made is not None:
            on_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ.rx

    def buffer_updated(self, nbytes: int) -> None:
        self.rx_bytes += nbytes
        peer = self.peer
        fin = False
        if self._fin_probes and nbytes < READ_CHUNK:
            self._fin_probes -= 1
            fin = self._fin_follows()
        if peer is not None:
            if fin:  # the data and the end go on together (``Leg.send_last``)
                self._read_ended(_READ.rx[:nbytes])
            elif nbytes < LEND_MIN:  # small: a copy costs less than the bookkeeping
                peer.send(_READ.rx[:nbytes].tobytes())
            elif not peer.send_framed(_READ.buf, nbytes):
                _READ.lent()  # the old one is the peer's transport's for now
        else:
            data = _READ.rx[:nbytes].tobytes()
            if self._early_to is not None:
                self._early_to.send(data)
            else:
                self._early.append(data)
            self._early_bytes += nbytes
            if self._early_bytes >= EARLY_LIMIT:
                self.pause_source()
            if fin:
                self._read_ended()

    def _fin_follows(self) -> bool:
        """Whether the peer's FIN is all that is left to read. uvloop (libuv) stops at a
        short read and learns of the FIN one loop iteration later; by then the data has
        gone out alone, and the FIN follows in a frame, a TLS record and a syscall of its
        own. The usual case is a server's response and its close (``Connection: close``,
        HTTP/1.0): the client closes when it has the response, before the FIN reaches
        it, and it keeps the TIME_WAIT, so each of its next connections to the same
        address searches further for a free port (under wrk through the agents this was
        most of the client's CPU). Sent together, the client has both at once and closes
        second. One ``getsockopt`` per short read (the first ``FIN_PROBES``); FIONREAD
        only once the FIN is in."""
        sock = self._sock
        assert sock is not None
        try:
            if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != _TCP_CLOSE_WAIT:
                return False
            # in CLOSE_WAIT every byte before the FIN is queued: none left means EOF next
            return not any(fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4)))
        except OSError:
            return False

    def eof_received(self) -> bool:
        self._read_ended()
        return True  # keep the write side open: half-close

    def _read_ended(self, last: memoryview | None = None) -> None:
        """The peer's FIN: on to our peer leg, with ``last`` (the read it came behind,
        ``_fin_follows``) in one ``send_last``; once only, from the probe or uvloop."""
        if self.read_done:
            return
        self.read_done = True
        if self.peer is not None:
            if last is None:
                self.peer.send_eof()
            else:
                self.peer.send_last(last)
            self._maybe_close()
        else:
            self._early_eof = True

    def hand_early(self, to: Leg) -> None:
        """What arrives before there is a peer leg goes to ``to`` from now on, and what
        came already goes now: an HBONE stream whose CONNECT is not answered yet, so that
        the client's first bytes go out with the CONNECT, or as soon as they come, and
        not one round trip after it. Still up to ``EARLY_LIMIT`` (then reading pauses
        until ``start``); a FIN waits for ``start``."""
        self._early_to = to
        early, self._early = self._early, []
        for data in early:
            to.send(data)

    def start(self) -> None:
        """The peer leg is attached: hand over what arrived early, then read on."""
        peer = self.peer
        assert peer is not None
        self._early_to = None
        early, self._early = self._early, []
        self._early_bytes = 0
        for data in early:
            peer.send(data)
        if self._early_eof:
            self._early_eof = False
            peer.send_eof()
            self._maybe_close()
        if peer.sink_blocked():
            self.pause_source()
        else:
            self.resume_source()

    def sink_blocked(self) -> bool:
        return (
            self.transport is not None
            and self.transport.get_write_buffer_size() > TCP_HIGH_WATER
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if exc is not None or not (self.read_done and self.write_done):
            # an abrupt end (RST, or closed under us) resets the other side
            if exc is not None:
                self.was_reset = True
            if self.peer is not None and not self.peer.done:
                self.peer.reset()
        self.read_done = self.write_done = True
        self._finish()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_source()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume_source()

    # -- Leg -------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self._closing and not self.write_done:
            self.transport.write(data)

    def send_view(self, view: memoryview) -> bool:
        t = self.transport
        if t is None or self._closing or self.write_done:
            return True
        if t.get_write_buffer_size():  # behind already: the view would be kept, a copy not
            t.write(view.tobytes())
            return True
        t.write(view)  # uvloop writes at once when nothing is queued
        return not t.get_write_buffer_size()  # (what it could not send, it keeps the view of)

    def send_eof(self) -> None:
        if self.write_done or self.transport is None:
            return
        if self._closing or self.transport.get_write_buffer_size():
            self._end(None)
            return
        sock = self._socket()
        try:
            self._end(sock)
        finally:
            self._return(sock)

    def send_last(self, data: bytes | memoryview) -> None:
        """The data with ``MSG_MORE`` and then the FIN: one segment carries both. A
        client that closes on seeing a response (``Connection: close``) then has the
        FIN with it and closes second; otherwise it may close first and keep the
        TIME_WAIT, so each of its next connections to the same address searches further
        for a free port (``_fin_follows`` is the sending agent's half of this)."""
        t = self.transport
        if t is None or self._closing or self.write_done:
            return
        sock = self._socket()
        try:
            sent = 0
            if sock is not None and not t.get_write_buffer_size():
                with contextlib.suppress(OSError):  # EAGAIN: the rest goes the usual way
                    sent = sock.send(data, socket.MSG_MORE)
            if sent < len(data):
                t.write(data[sent:] if isinstance(data, bytes) else data[sent:].tobytes())
            self._end(sock)
        finally:
            self._return(sock)

    def _end(self, sock: socket.socket | None) -> None:
        """The write side's end: the FIN now (``shutdown(2)`` on ``sock``) when nothing
        is buffered, else uvloop's ``write_eof``, which sends it after the buffer.

        uvloop's ``write_eof`` (libuv's ``uv_shutdown``) makes the ``shutdown(2)`` call
        on the next loop iteration, after every other callback of this one: a response
        and its FIN arrived together from the tunnel, and the client, which closes on
        seeing the response, closed before our FIN reached it (see ``_fin_follows``).
        When we shut down ourselves uvloop is not told: its own late ``shutdown(2)``
        could fail once the connection is gone, and would be taken as an error."""
        self.write_done = True
        t = self.transport
        if t is not None and not self._closing:
            done = False
            if sock is not None and not t.get_write_buffer_size():
                try:
                    sock.shutdown(socket.SHUT_WR)
                    done = True
                except OSError:
                    pass
            if not done:
                t.write_eof()
        self._maybe_close()

    def _socket(self) -> socket.socket | None:
        """The socket under the transport, for a call uvloop has no method for: ours if
        we dialled it, else a socket object on the transport's descriptor, for the calls
        at hand only: ``_return`` detaches it, so its end never closes the descriptor."""
        if self._sock is not None:
            return self._sock
        pseudo = self.transport.get_extra_info("socket") if self.transport is not None else None
        if pseudo is None:
            return None
        # the family does not matter to send or shutdown
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, pseudo.fileno())

    def _return(self, sock: socket.socket | None) -> None:
        """Done with what ``_socket`` gave."""
        if sock is not None and sock is not self._sock:
            sock.detach()

    def reset(self) -> None:
        if self.transport is None or self._closing:
            return
        self.was_reset = True
        self._closing = True
        set_linger_zero(self.transport)
        self.transport.abort()

    def pause_source(self) -> None:
        self._source_paused = True
        if self.transport is not None and not self._closing:
            self.transport.pause_reading()

    def resume_source(self) -> None:
        if not self._source_paused:
            return
        self._source_paused = False
        if self.transport is not None and not self._closing and not self.read_done:
            self.transport.resume_reading()

    def linger(self, seconds: float) -> None:
        """The peer leg ended without an error while the client still sends: an HBONE
        stream whose server answered in full and reads no more (RST_STREAM NO_ERROR
        after its END_STREAM; our FIN went after the answer). Like a web server's
        lingering close, we go on reading and dropping what comes, so that unread bytes
        do not make our close a reset, which would drop the answer still on its way;
        and once ``seconds`` have passed, or the client's FIN comes, the connection
        closes (after what it still has to write)."""
        if (self.read_done or not self.write_done or self.transport is None or self._closing
                or self._linger is not None):
            return  # (not only reading: ending anyway)
        self.resume_source()  # a paused read (the stream's window was full) drains too
        self._linger = asyncio.get_running_loop().call_later(seconds, self.close)

    def close(self) -> None:
        """Close now (graceful FIN after buffered data)."""
        if self.transport is not None and not self._closing:
            self._closing = True
            self.transport.close()

    def _maybe_close(self) -> None:
        if self.read_done and self.write_done:
            self.close()


async def dialled_leg(
    sock: socket.socket, loop: asyncio.AbstractEventLoop | None = None
) -> TcpLeg:
    """A ``TcpLeg`` over a socket we connected (a relay's upstream), probing it for the
    FIN that comes with a response. The socket is closed if the transport cannot be made."""
    loop = loop or asyncio.get_running_loop()
    try:
        _, leg = await loop.create_connection(lambda: TcpLeg(sock=sock), sock=sock)
    except BaseException:
        if sock.fileno() != -1:
            sock.close()
        raise
    return leg


class Relay:
    """Two joined legs; ``result`` gets the byte counts and is closed once, at the end."""

    def __init__(
        self,
        downstream: Leg,
        upstream: Leg,
        result: ConnectionResult | None = None,
        on_finished: Callable[[Relay], None] | None = None,
        *,
        linger_s: float,
    ) -> None:
        """``linger_s``: how long a leg may go on reading once the other ended with no
        error (``Leg.linger``; ``HboneConfig.linger_s``)."""
        self.downstream = downstream
        self.upstream = upstream
        self.result = result
        self._on_finished = on_finished
        self._linger_s = linger_s
        self.finished = False
        downstream.on_done = self._leg_done
        upstream.on_done = self._leg_done
        if upstream.peer is not downstream:
            join(downstream, upstream)
        if result is not None:
            result.open()
        for leg in (downstream, upstream):
            if isinstance(leg, TcpLeg):
                leg.start()
        # a leg may have finished before we got here
        for leg in (downstream, upstream):
            if leg.done:
                self._leg_done(leg)

    def _leg_done(self, leg: Leg) -> None:
        if self.finished:
            return
        other = self.upstream if leg is self.downstream else self.downstream
        if leg.was_reset and not other.done:
            other.reset()
        elif not other.done:
            other.linger(self._linger_s)
        if not (self.downstream.done and self.upstream.done):
            return
        self.finished = True
        if self.result is not None:
            self.result.bytes_sent = self.downstream.rx_bytes
            self.result.bytes_received = self.upstream.rx_bytes
            reset = self.downstream.was_reset or self.upstream.was_reset
            self.result.close("reset" if reset else "ok", "-")
        if self._on_finished is not None:
            self._on_finished(self)

    def abort(self) -> None:
        """Reset both sides (drain deadline passed)."""
        for leg in (self.downstream, self.upstream):
            if not leg.done:
                leg.reset()
