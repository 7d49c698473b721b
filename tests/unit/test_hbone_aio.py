"""HboneProtocol glue over in-memory transports: what reaches the wire, and when."""

from __future__ import annotations

import asyncio
from typing import Any

from ztunnel_py.config import HboneConfig
from ztunnel_py.hbone import core
from ztunnel_py.hbone.aio import BULK_WRITE, HboneProtocol, StreamLeg
from ztunnel_py.hbone.core import Role


class Wire:
    """A transport that records writes and delivers them to the other side next tick."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.to: HboneProtocol | None = None

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        assert self.to is not None
        asyncio.get_running_loop().call_soon(self.to.data_received, bytes(data))

    def is_closing(self) -> bool:
        return False

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def get_extra_info(self, key: str, default: Any = None) -> Any:
        return default

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_one_write_per_loop_iteration_for_all_streams() -> None:
    accepted: list[StreamLeg] = []
    received: dict[int, bytes] = {}

    def on_connect(leg: StreamLeg) -> None:
        accepted.append(leg)
        server.respond(leg, core.OK)

    client = HboneProtocol(Role.CLIENT, HboneConfig())
    server = HboneProtocol(Role.SERVER, HboneConfig(), on_connect=on_connect)
    c_wire, s_wire = Wire(), Wire()
    c_wire.to, s_wire.to = server, client
    client.connection_made(c_wire)  # type: ignore[arg-type]
    server.connection_made(s_wire)  # type: ignore[arg-type]
    await settle()
    legs = [await client.open_stream(f"10.0.0.{i}:80") for i in (1, 2)]
    await settle()
    assert len(accepted) == 2

    class Sink:
        def __init__(self, sid: int) -> None:
            self.sid = sid

        def send(self, data: bytes) -> None:
            received[self.sid] = received.get(self.sid, b"") + bytes(data)

    for leg in accepted:
        leg.peer = Sink(leg.stream_id)  # type: ignore[assignment]
    before = len(c_wire.writes)
    legs[0].send(b"one")
    legs[1].send(b"two")
    legs[0].send(b"three")
    assert len(c_wire.writes) == before  # nothing written yet...
    await asyncio.sleep(0)
    assert len(c_wire.writes) == before + 1  # ...then everything, in one write
    await settle()
    assert received == {legs[0].stream_id: b"onethree", legs[1].stream_id: b"two"}
    before = len(c_wire.writes)
    legs[1].send(b"b" * BULK_WRITE)  # bulk: written at once
    assert len(c_wire.writes) == before + 1
    await settle()
    assert received[legs[1].stream_id] == b"two" + b"b" * BULK_WRITE
    client.close()  # GOAWAY goes out at once, not on the next tick
    assert c_wire.writes[-1][3] == 0x7  # GOAWAY frame type
