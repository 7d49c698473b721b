"""TcpLeg before its peer exists: the first bytes wait in the leg without stopping
reading, a flood pauses reading at EARLY_LIMIT, and everything reaches the peer. And
the end of a response: a FIN queued behind the data is taken with it, and ``send_last``
puts data and FIN in one segment."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from ztunnel_py.hbone.aio import Leg
from ztunnel_py.proxy.relay import EARLY_LIMIT, FIN_PROBES, TcpLeg, join
from ztunnel_py.proxy.sockets import plain_listener

FIN_WAIT1, FIN_WAIT2 = 4, 5  # tcpi_state (include/net/tcp_states.h)


class Sink(Leg):
    """A peer leg that keeps what it is sent."""

    def __init__(self) -> None:
        super().__init__()
        self.got = bytearray()
        self.eof = False

    def send(self, data: bytes) -> None:
        self.got += data

    def send_eof(self) -> None:
        self.eof = True

    def reset(self) -> None:
        self.was_reset = True

    def pause_source(self) -> None:
        pass

    def resume_source(self) -> None:
        pass


async def accepted_leg(payload: bytes) -> tuple[TcpLeg, asyncio.StreamWriter]:
    """A TcpLeg on an accepted connection whose client sends ``payload`` and half-closes."""
    loop = asyncio.get_running_loop()
    made: asyncio.Future[TcpLeg] = loop.create_future()

    def factory() -> TcpLeg:
        return TcpLeg(on_made=made.set_result)

    listener = plain_listener("127.0.0.1", 0)
    server = await loop.create_server(factory, sock=listener)
    _, writer = await asyncio.open_connection(*listener.getsockname()[:2])
    writer.write(payload)
    writer.write_eof()
    leg = await made
    server.close()
    return leg, writer


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5.0):
        while not condition():  # noqa: ASYNC110 - polling the leg's state
            await asyncio.sleep(0.01)


async def test_a_request_before_the_peer_waits_without_pausing() -> None:
    leg, client = await accepted_leg(b"GET / HTTP/1.1\r\n\r\n")
    try:
        await until(lambda: leg._early_eof)
        assert not leg._source_paused  # reading was never stopped (nor restarted)
        sink = Sink()
        join(leg, sink)
        leg.start()
        assert bytes(sink.got) == b"GET / HTTP/1.1\r\n\r\n" and sink.eof
    finally:
        leg.reset()  # a half-closed transport must not outlive the loop
        client.close()


async def test_a_flood_before_the_peer_pauses_reading_and_loses_nothing() -> None:
    payload = bytes(range(256)) * (16 * EARLY_LIMIT // 256)
    leg, client = await accepted_leg(payload)
    try:
        assert leg.transport is not None
        transport = leg.transport
        await until(lambda: not transport.is_reading())
        await asyncio.sleep(0.05)
        assert leg._source_paused
        held = sum(map(len, leg._early))
        assert EARLY_LIMIT <= held < len(payload)  # the limit, and at most one read past it
        sink = Sink()
        join(leg, sink)
        leg.start()
        await until(lambda: sink.eof)
        assert bytes(sink.got) == payload
    finally:
        leg.reset()
        client.close()


def _tcp_info(sock: socket.socket) -> tuple[int, int]:
    """(tcpi_state, tcpi_segs_out) from TCP_INFO (include/uapi/linux/tcp.h)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 144)
    return info[0], int.from_bytes(info[136:140], "little")


async def _dialled_pair() -> tuple[socket.socket, socket.socket]:
    """A connected (dialled, accepted) pair of loopback TCP sockets."""
    listener = plain_listener("127.0.0.1", 0)
    try:
        dialled = socket.create_connection(listener.getsockname()[:2])
        accepted, _ = listener.accept()
    finally:
        listener.close()
    return dialled, accepted


async def test_a_short_read_followed_by_the_fin_ends_the_leg_at_once() -> None:
    # the server's response and its close are both queued when the leg reads: the leg
    # learns of the FIN with the data (not one loop iteration later from uvloop)
    dialled, server = await _dialled_pair()
    server.sendall(b"HTTP/1.0 200 OK\r\n\r\nbye")
    server.shutdown(socket.SHUT_WR)
    await asyncio.sleep(0.05)  # both arrived
    seen: list[tuple[bytes, bool]] = []

    class Probe(TcpLeg):
        def buffer_updated(self, nbytes: int) -> None:
            super().buffer_updated(nbytes)
            assert isinstance(self.peer, Sink)
            seen.append((bytes(self.peer.got), self.peer.eof))

    sink = Sink()
    leg = Probe(sock=dialled)
    join(leg, sink)
    await asyncio.get_running_loop().create_connection(lambda: leg, sock=dialled)
    leg.start()
    await until(lambda: sink.eof)
    assert seen[0] == (b"HTTP/1.0 200 OK\r\n\r\nbye", True)  # in the data's own callback
    leg.close()
    server.close()


class CountingSocket(socket.socket):
    """Counts the FIN probes (``getsockopt`` calls) made on it."""

    probes = 0

    def getsockopt(self, *args: Any) -> Any:
        self.probes += 1
        return super().getsockopt(*args)


async def test_a_short_read_of_an_open_connection_is_not_an_end() -> None:
    dialled, server = await _dialled_pair()
    counted = CountingSocket(fileno=dialled.detach())
    sink = Sink()
    leg = TcpLeg(sock=counted)
    join(leg, sink)
    await asyncio.get_running_loop().create_connection(lambda: leg, sock=counted)
    leg.start()
    expect = b""
    for n in range(FIN_PROBES + 4):  # each one a short read of its own
        server.sendall(b"response %d;" % n)
        expect += b"response %d;" % n
        await until(lambda want=expect: bytes(sink.got) == want)
        assert not sink.eof and not leg.read_done
    # a kept-alive connection stops paying for the probe after FIN_PROBES short reads
    assert counted.probes == FIN_PROBES
    server.shutdown(socket.SHUT_WR)  # now the FIN: the usual way (uvloop's EOF)
    await until(lambda: sink.eof)
    leg.close()
    server.close()


async def test_send_last_puts_the_data_and_the_fin_in_one_segment() -> None:
    for dialled_side in (True, False):  # our own socket, or uvloop's (an accepted one)
        dialled, accepted = await _dialled_pair()
        mine, theirs = (dialled, accepted) if dialled_side else (accepted, dialled)
        leg = TcpLeg(sock=mine if dialled_side else None)
        await asyncio.get_running_loop().create_connection(lambda leg=leg: leg, sock=mine)
        await asyncio.sleep(0.05)  # the handshake's last ACK is out
        _, before = _tcp_info(mine)
        leg.send_last(b"the whole response")
        await asyncio.sleep(0.05)
        state, after = _tcp_info(mine)
        assert after - before == 1, dialled_side  # data and FIN: one segment, not two
        theirs.settimeout(5)
        assert theirs.recv(100) == b"the whole response" and theirs.recv(100) == b""
        assert leg.write_done and state in (FIN_WAIT1, FIN_WAIT2)
        leg.close()
        theirs.close()
