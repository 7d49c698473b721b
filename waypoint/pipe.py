"""Byte pipes: the one seam between the HTTP codecs and the transports under them.

The waypoint speaks HTTP over two kinds of byte stream: a TCP connection
(tests, benchmarks, plaintext upstreams) and an HBONE stream (the mesh). Both
are wrapped as a ``Pipe`` (write / write_eof / close / abort) that delivers
what it reads to a ``Sink`` (on_data / on_eof / on_lost). The HTTP/1.1 and
HTTP/2 codecs are written against these two small interfaces only.

Writes to TCP pipes are made together at the end of the loop iteration
(``_WriteBatch``), as the HBONE connection does with its streams' frames: the
answers one iteration produces go out back to back, so a peer woken by the first
finds the rest waiting rather than being woken again for each.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from typing import Protocol, cast

from ztunnel_py.hbone.aio import Leg, StreamLeg


class Sink(Protocol):
    def on_data(self, data: bytes) -> None: ...

    def on_eof(self) -> None: ...

    def on_lost(self, exc: BaseException | None) -> None: ...


class Pipe(Protocol):
    closed: bool

    def set_sink(self, sink: Sink) -> None: ...

    def write(self, data: bytes) -> None: ...

    def write_eof(self) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def peer_address(self) -> tuple[str, int] | None: ...


class _Buffering:
    """Holds what arrives before a sink is attached."""

    def __init__(self) -> None:
        self.sink: Sink | None = None
        self._early: list[bytes] = []
        self._early_eof = False
        self._early_lost: tuple[BaseException | None] | None = None
        self._lost_once = False
        self.closed = False

    def set_sink(self, sink: Sink) -> None:
        self.sink = sink
        early, self._early = self._early, []
        for chunk in early:
            sink.on_data(chunk)
        eof, lost = self._early_eof, self._early_lost
        self._early_eof, self._early_lost = False, None  # told once, to the first sink
        if eof:
            sink.on_eof()
        if lost is not None:
            sink.on_lost(lost[0])

    def _data(self, data: bytes) -> None:
        if self.sink is None:
            self._early.append(data)
        else:
            self.sink.on_data(data)

    def _eof(self) -> None:
        if self.sink is None:
            self._early_eof = True
        else:
            self.sink.on_eof()

    def _lost(self, exc: BaseException | None) -> None:
        if self._lost_once:
            return
        self._lost_once = True
        self.closed = True
        if self.sink is None:
            self._early_lost = (exc,)
        else:
            self.sink.on_lost(exc)


class _WriteBatch:
    """The TCP pipes' writes of one loop iteration, made at its end (one per loop).

    Measured with ``bench.waypoint`` (waypoint process, paired runs, saturated by
    ``wrk``): about 17 % less CPU per request than writing each message at once. A
    write syscall to a peer that is asleep pays for waking it, and a proxy that writes
    as it goes spreads its writes out and wakes its peers more often."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: list[tuple[asyncio.Transport, bytes]] = []

    def add(self, transport: asyncio.Transport, data: bytes) -> None:
        if not self.pending:
            self.loop.call_soon(self.flush)
        self.pending.append((transport, data))

    def flush(self) -> None:
        """Write everything pending now (also before a close or a FIN: order holds)."""
        pending, self.pending = self.pending, []
        for transport, data in pending:
            if not transport.is_closing():
                transport.write(data)


_BATCHES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _WriteBatch] = \
    weakref.WeakKeyDictionary()


def _batch() -> _WriteBatch:
    loop = asyncio.get_running_loop()
    batch = _BATCHES.get(loop)
    if batch is None:
        batch = _BATCHES[loop] = _WriteBatch(loop)
    return batch


class TcpPipe(_Buffering, asyncio.Protocol):
    """A TCP connection (``loop.create_connection(TcpPipe, ...)`` or a server factory)."""

    def __init__(self) -> None:
        super().__init__()
        self.transport: asyncio.Transport | None = None
        self.on_connected: asyncio.Future[None] | None = None
        self._batch: _WriteBatch | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._batch = _batch()

    def data_received(self, data: bytes) -> None:
        sink = self.sink  # (``_data`` inlined: this runs for every read)
        if sink is None:
            self._early.append(data)
        else:
            sink.on_data(data)

    def eof_received(self) -> bool:
        self._eof()
        return True  # keep the write side open until the codec closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)

    def write(self, data: bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            batch = self._batch
            assert batch is not None  # (set with the transport)
            batch.add(t, data)

    def write_eof(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._flush()
            with contextlib.suppress(OSError, RuntimeError):
                self.transport.write_eof()

    def close(self) -> None:
        if self.transport is not None:
            self._flush()
            self.transport.close()

    def _flush(self) -> None:
        """What this pipe still has in the batch goes first (a FIN or close after it)."""
        if self._batch is not None:
            self._batch.flush()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def peer_address(self) -> tuple[str, int] | None:
        if self.transport is None:
            return None
        p = self.transport.get_extra_info("peername")
        return (str(p[0]), int(p[1])) if p else None


class _StreamPeer(Leg):
    """The stream leg's peer, a ``Leg``: what the stream reads goes to its pipe. (The
    pipe is not a ``Leg`` itself: compiled classes have one base that holds state.)"""

    def __init__(self, pipe: StreamPipe) -> None:
        Leg.__init__(self)
        self.pipe = pipe

    def send(self, data: bytes) -> None:
        self.pipe._data(data)

    def send_eof(self) -> None:
        self.pipe._eof()

    def reset(self) -> None:
        self.pipe._lost(ConnectionResetError("HBONE stream reset"))

    def pause_source(self) -> None:
        """(The tunnel is backed up: nothing to pause, the codec writes what it has.)"""

    def resume_source(self) -> None:
        pass


class StreamPipe(_Buffering):
    """An HBONE stream (``ztunnel_py.hbone.aio.StreamLeg``) as a pipe.

    The stream leg calls ``send`` / ``send_eof`` / ``reset`` on its peer with what
    it reads; that peer (``_StreamPeer``) hands it to us. Writes go to the stream leg.
    """

    def __init__(self, leg: StreamLeg, peer_addr: tuple[str, int] | None = None) -> None:
        _Buffering.__init__(self)
        self.leg = leg
        self._peer_addr = peer_addr
        leg.on_done = self._leg_done
        leg.attach(_StreamPeer(self))

    def _leg_done(self, _leg: Leg) -> None:
        self._lost(None)

    # Pipe interface.
    def write(self, data: bytes) -> None:
        if not self.closed:
            self.leg.send(data)

    def write_eof(self) -> None:
        if not self.closed:
            self.leg.send_eof()

    def close(self) -> None:
        if not self.leg.done:
            if self.leg.read_done:
                self.leg.send_eof()
            else:  # answered in full, the rest of the request unread: RST_STREAM NO_ERROR
                self.leg.end_reading()
        self._lost(None)

    def abort(self) -> None:
        if not self.leg.done:
            self.leg.reset()
        self._lost(None)

    def peer_address(self) -> tuple[str, int] | None:
        return self._peer_addr
