"""TcpLeg before its peer exists: the first bytes wait in the leg without stopping
reading, a flood pauses reading at EARLY_LIMIT, and everything reaches the peer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ztunnel_py.hbone.aio import Leg
from ztunnel_py.proxy.relay import EARLY_LIMIT, TcpLeg, join
from ztunnel_py.proxy.sockets import plain_listener


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
