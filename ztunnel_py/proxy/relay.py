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
import socket
import struct
import typing
from collections.abc import Callable

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
_LINGER_ZERO = struct.pack("ii", 1, 0)


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


class TcpLeg(Leg, asyncio.BufferedProtocol):
    """A TCP connection as a relay leg."""

    def __init__(
        self,
        *,
        start_paused: bool = False,
        on_made: Callable[[TcpLeg], None] | None = None,
    ) -> None:
        Leg.__init__(self)
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
        if peer is not None:
            if nbytes < LEND_MIN:  # small: a copy costs less than the bookkeeping
                peer.send(_READ.rx[:nbytes].tobytes())
            elif not peer.send_framed(_READ.buf, nbytes):
                _READ.lent()  # the old one is the peer's transport's for now
        else:
            self._early.append(_READ.rx[:nbytes].tobytes())
            self._early_bytes += nbytes
            if self._early_bytes >= EARLY_LIMIT:
                self.pause_source()

    def eof_received(self) -> bool:
        self.read_done = True
        if self.peer is not None:
            self.peer.send_eof()
            self._maybe_close()
        else:
            self._early_eof = True
        return True  # keep the write side open: half-close

    def start(self) -> None:
        """The peer leg is attached: hand over what arrived early, then read on."""
        peer = self.peer
        assert peer is not None
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
        self.write_done = True
        if not self._closing and self.transport.can_write_eof():
            self.transport.write_eof()
        self._maybe_close()

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

    def close(self) -> None:
        """Close now (graceful FIN after buffered data)."""
        if self.transport is not None and not self._closing:
            self._closing = True
            self.transport.close()

    def _maybe_close(self) -> None:
        if self.read_done and self.write_done:
            self.close()


class Relay:
    """Two joined legs; ``result`` gets the byte counts and is closed once, at the end."""

    def __init__(
        self,
        downstream: Leg,
        upstream: Leg,
        result: ConnectionResult | None = None,
        on_finished: Callable[[Relay], None] | None = None,
    ) -> None:
        self.downstream = downstream
        self.upstream = upstream
        self.result = result
        self._on_finished = on_finished
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
