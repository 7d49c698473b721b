"""HboneProtocol glue over in-memory transports: what reaches the wire, and when."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from ztunnel_py.config import HboneConfig
from ztunnel_py.hbone import core
from ztunnel_py.hbone.aio import BULK_WRITE, QUIET_NS, HboneProtocol, Leg, StreamLeg
from ztunnel_py.hbone.core import FRAME_HEADER, LEND_MIN, Role


class Wire:
    """A transport that records writes and delivers them to the other side next tick."""

    def __init__(self, *, as_reads: bool = False) -> None:
        self.writes: list[bytes] = []
        self.to: HboneProtocol | None = None
        self.as_reads = as_reads  # deliver through get_buffer / buffer_updated, as TLS does
        self.buffered = 0  # what get_write_buffer_size() says

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        assert self.to is not None
        deliver = self._read_into if self.as_reads else self.to.data_received
        asyncio.get_running_loop().call_soon(deliver, bytes(data))

    def _read_into(self, data: bytes) -> None:
        assert self.to is not None
        buf = self.to.get_buffer(len(data))
        buf[: len(data)] = data
        self.to.buffer_updated(len(data))

    def get_write_buffer_size(self) -> int:
        return self.buffered

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


async def test_a_quiet_connection_writes_at_once_and_close_writes_share_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [10**9]  # time.monotonic_ns(), as flush_small reads it
    monkeypatch.setattr(time, "monotonic_ns", lambda: clock[0])
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

    class Sink(Leg):
        def __init__(self, sid: int) -> None:
            super().__init__()
            self.sid = sid

        def send(self, data: bytes) -> None:
            received[self.sid] = received.get(self.sid, b"") + bytes(data)

    for leg in accepted:
        leg.peer = Sink(leg.stream_id)
    before = len(c_wire.writes)
    legs[0].send(b"one")  # the connection was quiet: out at once
    assert len(c_wire.writes) == before + 1
    clock[0] += QUIET_NS  # close behind it (load): these wait for the end of the
    legs[1].send(b"two")  # loop iteration...
    clock[0] += QUIET_NS
    legs[0].send(b"three")
    assert len(c_wire.writes) == before + 1
    await asyncio.sleep(0)
    assert len(c_wire.writes) == before + 2  # ...and go out together, in one write
    await settle()
    assert received == {legs[0].stream_id: b"onethree", legs[1].stream_id: b"two"}
    before = len(c_wire.writes)
    clock[0] += QUIET_NS + 1  # quiet again
    legs[1].send(b"four")
    assert len(c_wire.writes) == before + 1
    await settle()
    assert received[legs[1].stream_id] == b"twofour"
    before = len(c_wire.writes)
    legs[1].send(b"b" * BULK_WRITE)  # bulk: written at once
    assert len(c_wire.writes) == before + 1
    await settle()
    assert received[legs[1].stream_id] == b"twofour" + b"b" * BULK_WRITE
    client.close()  # GOAWAY goes out at once, not on the next tick
    assert c_wire.writes[-1][3] == 0x7  # GOAWAY frame type


class Keeper(Leg):
    """A sink that records what it got; ``holds``: it keeps the views it is lent (as a
    TCP transport does with what it could not send at once)."""

    def __init__(self, holds: bool) -> None:
        super().__init__()
        self.holds = holds
        self.got: list[bytes | memoryview] = []

    def send(self, data: bytes) -> None:
        self.got.append(data)

    def send_view(self, view: memoryview) -> bool:
        self.got.append(view if self.holds else view.tobytes())
        return not self.holds


async def _pair(
    accepted: list[StreamLeg], sink: Leg | None = None
) -> tuple[HboneProtocol, HboneProtocol, Wire]:
    """A client and a server connected by wires; the server answers every CONNECT 200,
    keeps the leg in ``accepted`` and attaches ``sink`` to it, if given."""

    def on_connect(leg: StreamLeg) -> None:
        accepted.append(leg)
        if sink is not None:
            leg.attach(sink)
        leg.conn.respond(leg, core.OK)

    client = HboneProtocol(Role.CLIENT, HboneConfig())
    server = HboneProtocol(Role.SERVER, HboneConfig(), on_connect=on_connect)
    c_wire, s_wire = Wire(as_reads=True), Wire()
    c_wire.to, s_wire.to = server, client
    client.connection_made(c_wire)  # type: ignore[arg-type]
    server.connection_made(s_wire)  # type: ignore[arg-type]
    await settle()
    return client, server, c_wire


async def _tunnel(sink: Leg) -> tuple[HboneProtocol, HboneProtocol, Wire, StreamLeg]:
    accepted: list[StreamLeg] = []
    client, server, c_wire = await _pair(accepted, sink)
    leg = await client.open_stream("10.0.0.1:80")
    await settle()
    assert len(accepted) == 1
    return client, server, c_wire, leg


async def test_a_framed_send_goes_out_in_place_in_one_write() -> None:
    sink = Keeper(holds=False)
    client, _server, c_wire, leg = await _tunnel(sink)
    payload = bytes(range(256)) * (LEND_MIN // 256 + 1)
    buf = memoryview(bytearray(FRAME_HEADER + len(payload)))
    buf[FRAME_HEADER:] = payload
    before = len(c_wire.writes)
    assert leg.send_framed(buf, len(payload)) is True  # TLS took it all: buf is free again
    assert len(c_wire.writes) == before + 1  # header and payload: one write, at once
    wrote = c_wire.writes[-1]
    assert wrote[:FRAME_HEADER] == len(payload).to_bytes(3, "big") + b"\x00\x00" + \
        leg.stream_id.to_bytes(4, "big")
    assert wrote[FRAME_HEADER:] == payload and bytes(buf[:FRAME_HEADER]) == wrote[:9]
    c_wire.buffered = 1  # the transport says it still holds bytes: buf is not free
    assert leg.send_framed(buf, len(payload)) is False
    await settle()
    assert b"".join(bytes(g) for g in sink.got) == payload * 2
    client.close()


async def test_a_held_view_moves_the_next_read_to_a_fresh_buffer() -> None:
    sink = Keeper(holds=True)
    client, server, _c_wire, leg = await _tunnel(sink)
    first, second = b"\x01" * LEND_MIN, b"\x02" * LEND_MIN
    old = server._read_buffer.obj
    leg.send(first)
    await settle()
    assert server._read_buffer.obj is not old  # the sink kept a view into the old one
    leg.send(second)
    await settle()
    views = [g for g in sink.got if isinstance(g, memoryview)]
    assert len(views) == 2 and views[0].obj is old
    assert bytes(views[0]) == first and bytes(views[1]) == second  # nothing overwritten
    client.close()


class LastKeeper(Keeper):
    """A Keeper that also records ``send_last`` and ``send_eof`` as calls."""

    def __init__(self) -> None:
        super().__init__(holds=False)
        self.calls: list[tuple[str, bytes]] = []

    def send(self, data: bytes) -> None:
        self.calls.append(("send", bytes(data)))

    def send_last(self, data: bytes | memoryview) -> None:
        self.calls.append(("send_last", bytes(data)))
        self.write_done = True

    def send_eof(self) -> None:
        self.calls.append(("send_eof", b""))


async def test_data_and_end_stream_in_one_read_reach_the_sink_as_one_send_last() -> None:
    sink = LastKeeper()
    client, _server, c_wire, leg = await _tunnel(sink)
    before = len(c_wire.writes)
    leg.send_last(memoryview(b"response"))  # both in one write, one read on the far side
    assert len(c_wire.writes) == before + 1 and leg.write_done
    await settle()
    assert sink.calls == [("send_last", b"response"), ("send_eof", b"")]
    # apart (two reads), they stay a send and an eof
    sink2 = LastKeeper()
    client2, _server2, _c_wire2, leg2 = await _tunnel(sink2)
    leg2.send(b"first")
    await settle()
    leg2.send_eof()
    await settle()
    assert sink2.calls == [("send", b"first"), ("send_eof", b"")]
    client.close()
    client2.close()


class ResetKeeper(LastKeeper):
    """A LastKeeper that records ``reset`` too, and lent views as sends."""

    def send_view(self, view: memoryview) -> bool:
        self.calls.append(("send", view.tobytes()))
        return True

    def reset(self) -> None:
        self.calls.append(("reset", b""))


async def _answering(
    sink: Leg,
) -> tuple[HboneProtocol, HboneProtocol, Wire, StreamLeg, StreamLeg]:
    """A tunnel with ``sink`` attached to the client's leg: (client, server, the client's
    wire, the client's leg, the server's leg for it)."""
    accepted: list[StreamLeg] = []
    client, server, c_wire = await _pair(accepted)
    leg = await client.open_stream("10.0.0.1:80")
    leg.attach(sink)
    await settle()
    [far] = accepted
    return client, server, c_wire, leg, far


def test_the_reset_codes_are_http2s() -> None:
    import h2.errors

    assert core.NO_ERROR == h2.errors.ErrorCodes.NO_ERROR
    assert core.CANCEL == h2.errors.ErrorCodes.CANCEL


async def test_a_full_answer_then_rst_stream_no_error_ends_the_exchange_without_a_reset() -> None:
    """RFC 9113 section 8.1: a server that has answered in full may send RST_STREAM with
    NO_ERROR to stop the rest of the request (Envoy and hyper do; so does our waypoint,
    ``end_reading``). The client's sink gets the whole answer and its FIN and is not
    reset (a TCP leg would drop whatever it still had to write); what the client sends
    on is dropped."""
    sink = ResetKeeper()
    client, server, c_wire, leg, far = await _answering(sink)
    leg.send(b"GET / HTTP/1.1\r\n")  # the request goes on (no END_STREAM from us)
    await settle()
    far.send(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nbody")
    await settle()
    far.end_reading()
    await settle()
    assert far.done and not far.was_reset
    assert sink.calls == [("send", b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nbody"),
                          ("send_eof", b"")]
    assert leg.done and not leg.was_reset and leg.stream_id not in client.streams
    writes = len(c_wire.writes)
    leg.send(b"more of the request")  # dropped: the far side reads no more
    await settle()
    assert len(c_wire.writes) == writes
    client.close()
    server.close()


async def test_end_reading_sends_its_rst_stream_only_after_the_whole_answer() -> None:
    """An answer larger than the window waits for it; its END_STREAM and the RST_STREAM
    NO_ERROR wait behind it (a reset sent at once would drop what still waits, and
    reach the client as an abrupt one)."""
    sink = ResetKeeper()
    client, server, _, leg, far = await _answering(sink)
    answer = bytes(range(256)) * (2 * HboneConfig().stream_window // 256)
    far.send(answer)
    far.end_reading()
    assert not far.done and server.core.pending(far.stream_id) > 0  # waits for window
    for _ in range(100):
        await settle()
        if far.done:
            break
    assert far.done and not far.was_reset and far.stream_id not in server.streams
    assert b"".join(d for c, d in sink.calls if c in ("send", "send_last")) == answer
    assert sink.calls[-1] == ("send_eof", b"")  # then nothing: no reset
    assert leg.done and not leg.was_reset
    client.close()
    server.close()


async def test_rst_stream_no_error_from_a_client_is_a_reset() -> None:
    """(RFC 9113 section 8.1 gives NO_ERROR that meaning for a server's reset only.)"""
    sink = ResetKeeper()
    accepted: list[StreamLeg] = []
    client, server, _ = await _pair(accepted, sink)
    leg = await client.open_stream("10.0.0.1:80")
    leg.send(b"request")
    leg.send_eof()
    await settle()
    client.core.reset(leg.stream_id, core.NO_ERROR)
    client.flush()
    await settle()
    assert sink.calls[-1] == ("reset", b"") and accepted[0].was_reset
    client.close()
    server.close()


@pytest.mark.parametrize(("answered", "code"), [
    (True, core.CANCEL),  # CANCEL after the answer: abrupt, whatever came before
    (False, core.NO_ERROR),  # NO_ERROR with no END_STREAM first: a truncated answer
])
async def test_a_reset_that_does_not_follow_a_complete_answer_resets_the_sink(
        answered: bool, code: int) -> None:
    sink = ResetKeeper()
    client, server, _, leg, far = await _answering(sink)
    far.send(b"answer" if answered else b"half an answer")
    if answered:
        far.send_eof()
    await settle()
    server.core.reset(far.stream_id, code)
    server.flush()
    await settle()
    assert sink.calls[-1] == ("reset", b"") and leg.was_reset
    client.close()
    server.close()


async def test_an_answer_that_closes_the_stream_before_attach_is_kept_for_it() -> None:
    """A quick answer and its END_STREAM can close the stream (our side ended already)
    before the outbound relay attaches its client leg: the answer still reaches that leg,
    then the FIN. (It was dropped as a refused CONNECT's bytes are, and the client got the
    FIN alone: the demo's rare "connection closed before the response was complete".)"""
    accepted: list[StreamLeg] = []
    client, _server, _wire = await _pair(accepted)
    leg = client.open_leg("10.0.0.1:80")
    leg.send(b"request")
    leg.send_eof()
    await settle()
    [far] = accepted
    far.send(b"answer")
    far.send_eof()
    await settle()
    assert leg.response is not None and leg.response.done()
    assert not client.core.is_open(leg.stream_id)  # closed both ways, nothing attached yet
    sink = LastKeeper()
    leg.attach(sink)
    assert sink.calls == [("send", b"answer"), ("send_eof", b"")]
    # the connection's window was given back all the same
    assert client.core._conn_window.current_window_size + \
        client.core._conn_window._bytes_processed == HboneConfig().connection_window
    client.close()
