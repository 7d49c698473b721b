"""The receive fast path for DATA frames, byte by byte against h2's own handling.

Every scenario runs twice from the same start: a receiver with the fast path and a
reference receiver (``fast_receive=False``) that hands every byte to h2. Both must
report the same tunnel payload and events, keep the same flow-control windows, and
put the same bytes on the wire (WINDOW_UPDATEs, RST_STREAM, GOAWAY) - however the
input is split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import h2.connection
import h2.settings
import hpack
import pytest

from ztunnel_py.config import HboneConfig
from ztunnel_py.hbone import core, h2credit
from ztunnel_py.hbone.core import HboneConnection, Role

CFG = HboneConfig(
    stream_window=65_535, connection_window=65_535, max_frame_size=16_384,
    max_streams_per_connection=10,
)
TRACE = "00-0123456789abcdef0123456789abcdef-0123456789abcdef-00"


def _frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    head = len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big")
    return head + payload


def _raw_h2(conn: HboneConnection) -> h2.connection.H2Connection:
    return conn._h2


class Side:
    """A client and a server (fast or reference) after one tunnel was set up."""

    def __init__(self, fast: bool) -> None:
        self.client = HboneConnection(Role.CLIENT, CFG)
        self.server = HboneConnection(Role.SERVER, CFG, fast_receive=fast)
        self.client.initiate()
        self.server.initiate()
        self.events: list[core.Event] = []
        self.pump()
        self.sid = self.client.open("10.0.0.2:80", traceparent=TRACE)
        self.pump()
        self.server.respond(self.sid, core.OK)
        self.pump()
        self.events.clear()

    def pump(self) -> None:
        for _ in range(100):
            c2s, s2c = self.client.data_to_send(), self.server.data_to_send()
            if not c2s and not s2c:
                return
            if c2s:
                self.events += self.server.receive(c2s)
            if s2c:
                self.client.receive(s2c)
        raise AssertionError("peers never went quiet")

    def feed(self, wire: bytes, cuts: Iterable[int]) -> None:
        start = 0
        for cut in [*cuts, len(wire)]:
            if cut > start:
                self.events += self.server.receive(wire[start:cut])
                start = cut

    def windows(self) -> tuple[int, int, int, int]:
        h = _raw_h2(self.server)
        conn = h._inbound_flow_control_window_manager
        stream = h.streams[self.sid]._inbound_window_manager
        return (conn.current_window_size, conn._bytes_processed,
                stream.current_window_size, stream._bytes_processed)

    def credit(self) -> tuple[int, int]:
        """Window left plus acked-but-not-yet-announced bytes, connection and stream:
        equal to the full windows exactly when everything received was acked once."""
        w = self.windows()
        return w[0] + w[1], w[2] + w[3]


def merged(events: list[core.Event]) -> list[object]:
    """Events with consecutive Data of one stream joined (the split decides the pieces)."""
    out: list[object] = []
    for ev in events:
        if isinstance(ev, core.Data):
            last = out[-1] if out else None
            if isinstance(last, tuple) and last[0] == "data" and last[1] == ev.stream_id:
                out[-1] = ("data", ev.stream_id, last[2] + bytes(ev.data),
                           last[3] + ev.flow_length)
                continue
            out.append(("data", ev.stream_id, bytes(ev.data), ev.flow_length))
        else:
            out.append(ev)
    return out


def mixed_traffic(side: Side) -> bytes:
    """Plain, padded and END_STREAM DATA, a PING and a second stream's HEADERS."""
    c = side.client
    raw = _raw_h2(c)
    c.send(side.sid, b"a" * 100)
    raw.send_data(side.sid, b"b" * 50, pad_length=10)
    raw.ping(b"12345678")
    c.send(side.sid, b"c" * 70)
    sid2 = c.open("10.0.0.3:81", traceparent=TRACE)
    c.send(sid2, b"d" * 30)
    c.send(side.sid, b"e" * 20)
    c.end(side.sid)
    raw.send_data(sid2, b"f" * 25, end_stream=True)  # payload and END_STREAM in one frame
    return c.data_to_send()


def run(make_wire: Callable[[Side], bytes], cuts: Iterable[int]) -> tuple[Side, Side]:
    fast, ref = Side(True), Side(False)
    wire = make_wire(fast)
    assert make_wire(ref) == wire  # same start, same bytes
    cuts = list(cuts)
    fast.feed(wire, cuts)
    ref.feed(wire, [])
    return fast, ref


def ack_all(side: Side) -> bytes:
    for ev in side.events:
        if isinstance(ev, core.Data):
            side.server.ack(ev.stream_id, ev.flow_length)
    return side.server.data_to_send()


def stream_states(side: Side) -> list[object]:
    raw = _raw_h2(side.server)
    return [(sid, st.state_machine.state, st.closed_by) for sid, st in sorted(raw.streams.items())]


def test_every_two_way_split_matches_h2() -> None:
    wire = mixed_traffic(Side(True))
    for cut in range(len(wire) + 1):
        fast, ref = run(mixed_traffic, [cut])
        assert merged(fast.events) == merged(ref.events), f"split at {cut}"
        assert stream_states(fast) == stream_states(ref), f"split at {cut}"
        assert any(isinstance(e, core.StreamEnded) for e in fast.events)
        assert fast.windows() == ref.windows(), f"split at {cut}"
        assert ack_all(fast) == ack_all(ref), f"split at {cut}"
        assert fast.windows() == ref.windows(), f"split at {cut}"


def test_one_byte_at_a_time_matches_h2() -> None:
    wire = mixed_traffic(Side(True))
    fast, ref = run(mixed_traffic, range(1, len(wire)))
    assert merged(fast.events) == merged(ref.events)
    assert fast.windows() == ref.windows()
    assert ack_all(fast) == ack_all(ref)


def test_plain_data_takes_the_fast_path_and_padding_does_not() -> None:
    fast, _ = run(mixed_traffic, [])
    # three plain DATA frames and the empty END_STREAM one on stream 1, two on stream 3;
    # the padded one goes through h2
    assert fast.server.fast_data_frames == 6
    plain = Side(True)
    raw = _raw_h2(plain.client)
    raw.send_data(plain.sid, b"x" * 40, pad_length=5)
    plain.feed(plain.client.data_to_send(), [])
    assert plain.server.fast_data_frames == 0
    [ev] = plain.events
    assert isinstance(ev, core.Data) and ev.data == b"x" * 40 and ev.flow_length == 46


def test_one_whole_frame_per_read_matches_h2() -> None:
    """Interactive traffic: each read is exactly one small DATA frame (the shortcut at
    the top of ``receive``), fed one frame per call, interleaved with frames it must
    leave alone: padded, END_STREAM, a PING, then a frame of a stream never opened."""
    fast, ref = Side(True), Side(False)
    for side in (fast, ref):
        frames = [
            _frame(0, 0, side.sid, b"GET / HTTP/1.1\r\n\r\n"),
            _frame(0, 0, side.sid, b"x" * 300),
            _frame(0, 0x8, side.sid, b"\x03abc\x00\x00\x00"),  # padded
            _frame(6, 0, 0, b"12345678"),  # PING
            _frame(0, 0, side.sid, b"y" * 10),
            _frame(0, 0x1, side.sid, b"last"),  # END_STREAM
        ]
        for f in frames:
            side.feed(f, [])
    assert merged(fast.events) == merged(ref.events)
    assert [bytes(e.data) for e in fast.events if isinstance(e, core.Data)] == [
        b"GET / HTTP/1.1\r\n\r\n", b"x" * 300, b"abc", b"y" * 10, b"last"]
    assert stream_states(fast) == stream_states(ref)
    assert fast.windows() == ref.windows()
    assert ack_all(fast) == ack_all(ref)
    assert fast.server.data_to_send() == ref.server.data_to_send()
    assert fast.server.fast_data_frames == 4  # all but the padded one
    for side in (fast, ref):  # a stream never opened: h2's protocol error, both ways
        with pytest.raises(core.ProtocolError):
            side.feed(_frame(0, 0, 99, b"stray"), [])
    assert fast.server.data_to_send() == ref.server.data_to_send()


def test_windows_stay_exact_over_many_windows() -> None:
    """Four windows' worth, acked as it arrives: the WINDOW_UPDATEs are h2's, batched."""
    payload = bytes(range(256)) * 200
    fast, ref = Side(True), Side(False)
    got: dict[bool, bytes] = {True: b"", False: b""}
    for side in (fast, ref):
        side.client.send(side.sid, payload)
        for _ in range(50):
            wire = side.client.data_to_send()
            if not wire:
                break
            side.feed(wire, range(0, len(wire), 7777))
            updates = ack_all(side)
            got[side is fast] += b"".join(
                e.data for e in side.events if isinstance(e, core.Data))
            side.events.clear()
            side.client.receive(updates)
    assert got[True] == got[False] == payload
    # acks come per event, and the fast path's events are bigger, so h2 may announce its
    # WINDOW_UPDATEs at other moments; the accounting itself must be the same
    assert fast.credit() == ref.credit() == (65_535, 65_535)
    assert fast.server.fast_data_frames > 0


def _both(wire_of: Callable[[Side], bytes]) -> tuple[Side, Side, bytes]:
    fast, ref = Side(True), Side(False)
    wire = wire_of(fast)
    assert wire_of(ref) == wire
    return fast, ref, wire


def test_over_the_window_is_h2s_flow_control_error() -> None:
    """Raw frames past the 65,535-byte stream window: both refuse at the same frame."""
    def flood(side: Side) -> bytes:
        return b"".join(_frame(0, 0, side.sid, b"z" * 16_384) for _ in range(5))

    fast, ref, wire = _both(flood)
    for side in (fast, ref):
        with pytest.raises(core.ProtocolError):
            side.feed(wire, range(0, len(wire), 1000))
    assert fast.server.data_to_send() == ref.server.data_to_send()  # the same GOAWAY
    assert merged(fast.events) == merged(ref.events)
    assert sum(len(e.data) for e in fast.events if isinstance(e, core.Data)) == 3 * 16_384


@pytest.mark.parametrize(
    "wire_of",
    [
        pytest.param(lambda s: _frame(0, 0, s.sid, b"y" * 16_385), id="oversized"),
        pytest.param(lambda s: _frame(0, 0, 99, b"y" * 10), id="idle-stream"),
        pytest.param(lambda s: _frame(0, 0, 0, b"y" * 10), id="stream-0"),
        pytest.param(
            lambda s: _frame(1, 0, 5, b"\x82") + _frame(0, 0, s.sid, b"y" * 10),
            id="data-inside-header-block",
        ),
    ],
)
def test_protocol_errors_are_h2s(wire_of: Callable[[Side], bytes]) -> None:
    fast, ref, wire = _both(wire_of)
    for side in (fast, ref):
        with pytest.raises(core.ProtocolError):
            side.feed(wire, [4, 9, 12])
    assert fast.server.fast_data_frames == 0
    assert fast.server.data_to_send() == ref.server.data_to_send()


def test_reset_mid_frame_credits_the_rest_back() -> None:
    side = Side(True)
    side.client.send(side.sid, b"q" * 10_000)
    wire = side.client.data_to_send()
    side.feed(wire, [])
    del side.events[:]
    side.client.send(side.sid, b"r" * 10_000)
    wire = side.client.data_to_send()
    side.feed(wire[:4000], [])
    first = [e for e in side.events if isinstance(e, core.Data)]
    assert sum(e.flow_length for e in first) == 4000 - 9
    side.server.reset(side.sid)
    side.events.clear()
    side.feed(wire[4000:], [])
    assert not [e for e in side.events if isinstance(e, core.Data)]
    h = _raw_h2(side.server)._inbound_flow_control_window_manager
    # received = 20,000; the caller acks what it was handed, the rest was credited already
    side.server.ack(side.sid, 10_000 + 4000 - 9)
    assert h.current_window_size + h._bytes_processed == h.max_window_size


def test_consecutive_frames_of_a_stream_become_one_event() -> None:
    side = Side(True)
    side.client.send(side.sid, b"s" * 40_000)  # three 16 KiB frames
    wire = side.client.data_to_send()
    side.feed(wire, [])
    assert side.server.fast_data_frames == 3
    assert side.events == [core.Data(side.sid, b"s" * 40_000, 40_000)]


# -- header blocks written by hand ----------------------------------------------------


def _header_blocks(wire: bytes) -> list[tuple[int, int, bytes]]:
    """(type, flags, payload) of every frame in ``wire``."""
    out = []
    while wire:
        n = int.from_bytes(wire[:3], "big")
        out.append((wire[3], wire[4], wire[9 : 9 + n]))
        wire = wire[9 + n :]
    return out


def test_connect_block_decodes_like_h2s_and_leaves_the_dynamic_table_alone() -> None:
    side = Side(True)
    side.client.data_to_send()
    sid = side.client.open("[fd00::1]:8080", forwarded='for="[fd00::2]"',
                           baggage="k8s.namespace.name=" + "n" * 300, traceparent=TRACE)
    [(ftype, flags, block)] = _header_blocks(side.client.data_to_send())
    assert (ftype, flags) == (0x1, 0x4)  # HEADERS, END_HEADERS
    decoder = hpack.Decoder()
    fields = decoder.decode(block, raw=False)
    assert fields == [
        (":method", "CONNECT"), (":authority", "[fd00::1]:8080"),
        ("forwarded", 'for="[fd00::2]"'), ("baggage", "k8s.namespace.name=" + "n" * 300),
        ("traceparent", TRACE),
    ]
    assert isinstance(fields[-1], hpack.NeverIndexedHeaderTuple)
    assert len(decoder.header_table.dynamic_entries) == 0
    # h2's own state followed: the stream exists, is open, and takes data
    assert _raw_h2(side.client).streams[sid].open
    assert side.client.send(sid, b"hello")


@pytest.mark.parametrize("status", [200, 400, 401, 503])
def test_status_blocks_decode(status: int) -> None:
    fast = Side(True)
    sid = fast.client.open("10.0.0.9:80", traceparent=TRACE)
    fast.pump()
    fast.server.respond(sid, status)
    [(ftype, flags, block)] = _header_blocks(fast.server.data_to_send())
    assert ftype == 0x1 and flags & 0x4
    assert bool(flags & 0x1) is (status != 200)  # a refusal ends the stream
    assert hpack.Decoder().decode(block, raw=False) == [(":status", str(status))]


def test_a_pending_table_size_update_goes_through_h2() -> None:
    """After the peer shrinks its HPACK table, h2 must send the size update first."""
    side = Side(True)
    raw_server = _raw_h2(side.server)
    raw_server.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
    side.pump()
    sid = side.client.open("10.0.0.9:80", traceparent=TRACE)
    [(_, _, block)] = _header_blocks(side.client.data_to_send())
    assert block[0] & 0xE0 == 0x20  # starts with a dynamic table size update
    [ev] = side.server.receive(_frame(0x1, 0x4, sid, block))
    assert isinstance(ev, core.ConnectRequested) and ev.authority == "10.0.0.9:80"


def test_ack_writes_what_h2s_acknowledge_received_data_would() -> None:
    """Our inline ack against h2's own, ack by ack: same WINDOW_UPDATEs, same windows."""
    ours, theirs = Side(True), Side(True)
    for side in (ours, theirs):
        side.client.send(side.sid, b"w" * 60_000)
        side.feed(side.client.data_to_send(), [])
    for n in (1, 1000, 20_000, 12_000, 26_999):
        ours.server.ack(ours.sid, n)
        _raw_h2(theirs.server).acknowledge_received_data(n, theirs.sid)
        assert ours.server.data_to_send() == theirs.server.data_to_send()
        assert ours.windows() == theirs.windows()
    assert ours.credit() == (65_535, 65_535)
    # a closed stream: only the connection window is credited, as h2 does
    for side in (ours, theirs):
        side.client.send(side.sid, b"v" * 40_000)
        side.feed(side.client.data_to_send(), [])
        side.server.reset(side.sid)
        side.server.data_to_send()
    ours.server.ack(ours.sid, 40_000)
    _raw_h2(theirs.server).acknowledge_received_data(40_000, theirs.sid)
    assert ours.server.data_to_send() == theirs.server.data_to_send()
    conn = [_raw_h2(s.server)._inbound_flow_control_window_manager for s in (ours, theirs)]
    assert (conn[0].current_window_size, conn[0]._bytes_processed) == (
        conn[1].current_window_size, conn[1]._bytes_processed)


def test_a_reused_read_buffer_is_never_kept() -> None:
    """The transport decrypts into one buffer it reuses: feed through a bytearray that is
    scribbled over after every call, with frames and headers split across calls."""
    fast, ref = Side(True), Side(False)
    wire = mixed_traffic(fast)
    assert mixed_traffic(ref) == wire
    buffer = bytearray(64)
    for start in range(0, len(wire), 37):
        piece = wire[start : start + 37]
        buffer[: len(piece)] = piece
        fast.events += fast.server.receive(memoryview(buffer)[: len(piece)])
        buffer[:] = b"\xee" * len(buffer)
    ref.feed(wire, [])
    assert merged(fast.events) == merged(ref.events)
    assert fast.windows() == ref.windows()


# -- header blocks read by hand ---------------------------------------------------------


def _connect_block(*fields: tuple[str, str]) -> bytes:
    return core._request_block(fields)


def outcome(side: Side, wire: bytes, cuts: Iterable[int] = ()) -> tuple[object, ...]:
    """What the server made of ``wire``: events (or h2's error), bytes it queued, states."""
    try:
        side.feed(wire, cuts)
        error = ""
    except core.ProtocolError as exc:
        error = str(exc)
    return merged(side.events), error, side.server.data_to_send(), stream_states(side)


def test_connect_takes_the_header_fast_path_like_h2() -> None:
    def wire_of(side: Side) -> bytes:
        side.client.data_to_send()
        sid = side.client.open("10.0.0.7:8080", forwarded="for=10.0.1.1", baggage="a=b",
                               traceparent=TRACE)
        side.client.send(sid, b"hello")
        return side.client.data_to_send()

    for cuts in ([], [5], [9], [20]):
        fast, ref, wire = _both(wire_of)
        got, want = outcome(fast, wire, cuts), outcome(ref, wire)
        assert got == want
        (req,) = [e for e in fast.events if isinstance(e, core.ConnectRequested)]
        assert req.authority == "10.0.0.7:8080"
        assert dict(req.headers) == {":method": "CONNECT", ":authority": "10.0.0.7:8080",
                                     "forwarded": "for=10.0.1.1", "baggage": "a=b",
                                     "traceparent": TRACE}
        # a block split across reads goes to h2; a whole one does not
        assert fast.server.fast_header_blocks == (1 if not cuts or cuts[0] < 9 else 0)
        assert ref.server.fast_header_blocks == 0
        # the stream is h2's as much as the reference's: it answers and carries data
        for side in (fast, ref):
            side.server.respond(req.stream_id, core.OK)
            assert side.server.send(req.stream_id, b"back")
        assert fast.server.data_to_send() == ref.server.data_to_send()


def test_a_huffman_or_indexed_block_goes_to_h2() -> None:
    """Another implementation's CONNECT (h2's own encoder: Huffman, dynamic table)."""
    def wire_of(side: Side) -> bytes:
        raw = _raw_h2(side.client)
        raw.encoder = hpack.Encoder()  # Huffman on, indexing on
        side.client.data_to_send()
        for sid in (3, 5):  # the second block refers to the first one's table entries
            raw.send_headers(sid, [(":method", "CONNECT"), (":authority", "10.0.0.7:80"),
                                   ("baggage", "x=y")])
        return side.client.data_to_send()

    fast, ref, wire = _both(wire_of)
    assert outcome(fast, wire) == outcome(ref, wire)
    assert fast.server.fast_header_blocks == 0
    assert [e.stream_id for e in fast.events if isinstance(e, core.ConnectRequested)] == [3, 5]


CONNECT_A = [(":method", "CONNECT"), (":authority", "a:1")]


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param([(":method", "CONNECT")], id="no-authority"),
        pytest.param([(":method", "GET"), (":authority", "a:1")], id="not-connect"),
        pytest.param([(":method", "CONNECT"), (":authority", "")], id="empty-authority"),
        pytest.param([(":method", "CONNECT"), *CONNECT_A], id="twice"),
        pytest.param([(":method", "CONNECT"), ("x", "1"), (":authority", "a:1")],
                     id="pseudo-after-regular"),
        *(
            pytest.param([*CONNECT_A, extra], id=name)
            for name, extra in [
                ("path", (":path", "/")),
                ("uppercase", ("X-Up", "1")),
                ("connection", ("connection", "x")),
                ("te", ("te", "trailers")),
                ("host", ("host", "b:2")),
                ("content-length", ("content-length", "0")),
                ("leading-space", ("x", " v")),
                ("crlf", ("x", "v\r\nz: 1")),
                ("empty-name", ("", "v")),
                ("custom-pseudo", (":custom", "v")),
            ]
        ),
    ],
)
def test_unusual_requests_are_h2s(fields: list[tuple[str, str]]) -> None:
    fast, ref, wire = _both(lambda s: _frame(0x1, 0x4, 5, _connect_block(*fields)))
    assert outcome(fast, wire) == outcome(ref, wire)
    assert fast.server.fast_header_blocks == 0


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(_frame(0x1, 0x5, 5, _connect_block((":method", "CONNECT"),
                                                        (":authority", "a:1"))),
                     id="end-stream"),
        pytest.param(_frame(0x1, 0x4, 4, _connect_block((":method", "CONNECT"),
                                                        (":authority", "a:1"))),
                     id="even-stream"),
        pytest.param(_frame(0x1, 0x4, 1, _connect_block((":method", "CONNECT"),
                                                        (":authority", "a:1"))),
                     id="old-stream"),
        pytest.param(_frame(0x1, 0x4, 5, b"\x82\x86\x84\x41\x03a:1"), id="incremental"),
        pytest.param(_frame(0x1, 0x4, 5, b"\xbf\x7f"), id="bad-index"),
        pytest.param(_frame(0x1, 0x4, 5, b"\x02\x05ab"), id="truncated"),
        pytest.param(_frame(0x1, 0x4, 5, b"\x00\x01\xff\x01a"), id="not-utf8"),
    ],
)
def test_odd_frames_and_blocks_are_h2s(wire: bytes) -> None:
    fast, ref, wire = _both(lambda s: wire)
    assert outcome(fast, wire) == outcome(ref, wire)
    assert fast.server.fast_header_blocks == 0


def test_the_stream_limit_is_h2s() -> None:
    """Past SETTINGS_MAX_CONCURRENT_STREAMS (10): the same refusal either way."""
    block = _connect_block((":method", "CONNECT"), (":authority", "10.0.0.9:80"))
    wire = b"".join(_frame(0x1, 0x4, sid, block) for sid in range(3, 3 + 2 * 12, 2))
    fast, ref, wire = _both(lambda s: wire)
    got, want = outcome(fast, wire), outcome(ref, wire)
    assert got == want
    assert "streams" in str(got[1])
    assert fast.server.fast_header_blocks > 0


class ClientSide:
    """A client (fast or reference) with a CONNECT sent, and a server to answer it."""

    def __init__(self, fast: bool) -> None:
        self.client = HboneConnection(Role.CLIENT, CFG, fast_receive=fast)
        self.server = HboneConnection(Role.SERVER, CFG)
        self.client.initiate()
        self.server.initiate()
        self.server.receive(self.client.data_to_send())
        self.client.receive(self.server.data_to_send())
        self.server.receive(self.client.data_to_send())
        self.sid = self.client.open("10.0.0.2:80", traceparent=TRACE)
        self.server.receive(self.client.data_to_send())

    def states(self) -> list[object]:
        raw = _raw_h2(self.client)
        return [(sid, st.state_machine.state) for sid, st in sorted(raw.streams.items())]


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(lambda s: s.server.respond(s.sid, 200), id="200"),
        pytest.param(lambda s: s.server.respond(s.sid, 401), id="401-ends-stream"),
        pytest.param(lambda s: s.server.respond(s.sid, 503), id="503"),
        pytest.param(lambda s: _raw_h2(s.server).send_headers(s.sid, [(":status", "200"),
                                                                       ("x-a", "1")]),
                     id="h2-encoded"),
        pytest.param(lambda s: _raw_h2(s.server).send_headers(s.sid, [(":status", "100")]),
                     id="informational"),
        pytest.param(lambda s: _raw_h2(s.server).send_headers(
            s.sid, [(":status", "200")], end_stream=True), id="200-and-end"),
    ],
)
def test_responses_match_h2(answer: Callable[[ClientSide], None]) -> None:
    sides = [ClientSide(True), ClientSide(False)]
    results = []
    for side in sides:
        answer(side)
        wire = side.server.data_to_send()
        events = side.client.receive(wire)
        results.append((events, side.client.data_to_send(), side.states(),
                        side.client.is_open(side.sid)))
    assert results[0] == results[1]
    assert sides[1].client.fast_header_blocks == 0


def test_our_status_takes_the_fast_path() -> None:
    side = ClientSide(True)
    side.server.respond(side.sid, 200)
    [ev] = side.client.receive(side.server.data_to_send())
    assert ev == core.ConnectResponse(side.sid, 200)
    assert side.client.fast_header_blocks == 1
    # a second status on the stream is not a response: h2 judges it (trailers without
    # END_STREAM are a protocol error)
    with pytest.raises(core.ProtocolError):
        side.client.receive(_frame(0x1, 0x4, side.sid, b"\x88"))
    assert side.client.fast_header_blocks == 1


def test_closed_streams_are_not_counted_by_walking() -> None:
    """Many short tunnels on one connection: h2's stream table is cleaned up as it fills,
    and a new stream never trips the limit because of closed ones."""
    side = Side(True)
    for _ in range(3 * CFG.max_streams_per_connection):
        sid = side.client.open("10.0.0.2:80", traceparent=TRACE)
        side.pump()
        side.server.respond(sid, core.OK)
        side.client.end(sid)
        side.server.end(sid)
        side.pump()
        assert not side.client.is_open(sid) and not side.server.is_open(sid)
    assert len(_raw_h2(side.client).streams) <= CFG.max_streams_per_connection
    assert len(_raw_h2(side.server).streams) <= CFG.max_streams_per_connection
    # near the limit h2 takes the CONNECT (and cleans up its table): once in a while only
    assert side.server.fast_header_blocks > 2 * CFG.max_streams_per_connection


@pytest.mark.parametrize("resized", [False, True])
def test_connect_blocks_carry_every_field_in_order(resized: bool) -> None:
    """The encoded-once fields, the trace and extra fields; the same through h2 (when the
    encoder owes a table size update)."""
    side = Side(True)
    if resized:
        _raw_h2(side.server).update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
        side.pump()
    decoder = hpack.Decoder()
    for authority in ("10.0.0.9:80", "10.0.0.9:80", "10.0.0.10:81"):  # cached, then not
        side.client.open(authority, forwarded="for=10.0.1.1", baggage="a=b",
                         traceparent=TRACE, extra=[("x-one", "1"), ("x-two", "2")])
        [(_, _, block)] = _header_blocks(side.client.data_to_send())
        assert decoder.decode(block, raw=False) == [
            (":method", "CONNECT"), (":authority", authority), ("forwarded", "for=10.0.1.1"),
            ("baggage", "a=b"), ("traceparent", TRACE), ("x-one", "1"), ("x-two", "2"),
        ]


def test_small_acks_on_an_exhausted_window_match_h2() -> None:
    """The whole window in flight, then acks too small for half a window: h2's rule for an
    exhausted window (update after 1024 bytes) must still fire at the same ack."""
    ours, theirs = Side(True), Side(True)
    for side in (ours, theirs):
        side.client.send(side.sid, b"x" * 65_535)
        side.feed(side.client.data_to_send(), [])
        assert side.windows()[0] == 0 and side.windows()[2] == 0
    for n in (300, 500, 300, 10, 2000, 30_000, 1, 1, 16_000):
        ours.server.ack(ours.sid, n)
        _raw_h2(theirs.server).acknowledge_received_data(n, theirs.sid)
        assert ours.server.data_to_send() == theirs.server.data_to_send(), n
        assert ours.windows() == theirs.windows(), n


# -- lending views instead of copies (the TCP legs write them out before the next read) --


def test_lent_views_are_large_pieces_of_the_buffer_itself() -> None:
    """With ``lend_views``, a frame's payload of at least LEND_MIN bytes comes out as a view
    into the very buffer fed in (no copy), each large piece an event of its own; small
    pieces are copied. Payload and windows are what h2 would make of the same bytes."""
    fast, ref = Side(True), Side(False)
    fast.server.lend_views = True
    big = bytes(range(256)) * 64  # 16 KiB: one full frame at this max frame size
    for side in (fast, ref):
        side.client.send(side.sid, big)
        side.client.send(side.sid, b"tail")
    wire = fast.client.data_to_send()
    assert ref.client.data_to_send() == wire
    buffer = bytearray(wire)
    events = fast.server.receive(memoryview(buffer))
    ref.feed(wire, [])
    data = [ev for ev in events if isinstance(ev, core.Data)]
    assert [type(ev.data) for ev in data] == [memoryview, bytes]
    view = data[0].data
    assert isinstance(view, memoryview) and view.obj is buffer  # lent, not copied
    assert bytes(view) == big and data[1].data == b"tail"
    assert [ev.flow_length for ev in data] == [len(big), 4]
    assert merged(events) == merged(ref.events)
    assert fast.windows() == ref.windows()


def test_frame_header_charges_both_windows_or_declines() -> None:
    side = Side(True)
    c = side.client
    raw = _raw_h2(c)
    conn0 = raw.outbound_flow_control_window
    stream0 = raw.streams[side.sid].outbound_flow_control_window
    head = c.frame_header(side.sid, 1000)
    assert head == (1000).to_bytes(3, "big") + b"\x00\x00" + side.sid.to_bytes(4, "big")
    assert raw.outbound_flow_control_window == conn0 - 1000
    assert raw.streams[side.sid].outbound_flow_control_window == stream0 - 1000
    # what the peer makes of that header and 1000 bytes: plain stream data
    side.events += side.server.receive(c.data_to_send() + head + b"z" * 1000)
    assert merged(side.events) == [("data", side.sid, b"z" * 1000, 1000)]
    # declined, nothing charged: over one frame, over the window, queued data, no stream
    left = raw.outbound_flow_control_window
    assert c.frame_header(side.sid, CFG.max_frame_size + 1) is None
    assert c.frame_header(side.sid, left + 1) is None
    assert c.frame_header(side.sid, 0) is None
    assert c.frame_header(99, 10) is None
    assert raw.outbound_flow_control_window == left
    c.send(side.sid, b"q" * (left + 10))  # fills the window and queues the rest
    assert c.pending(side.sid) == 10
    assert c.frame_header(side.sid, 1) is None  # never ahead of queued bytes


def test_adopted_windows_keep_h2s_rule_and_state() -> None:
    """``core._Window`` replaces h2's ``WindowManager`` in the connection and in our
    streams: the same operations give the same increments, states and errors."""
    import random

    import h2.exceptions
    import h2.windows

    rng = random.Random(7)
    for size in (65_535, 1 << 20, 4_000):
        ours = core._adopt(h2.windows.WindowManager(size))
        ref = h2.windows.WindowManager(size)
        for _ in range(5_000):
            op, n = rng.randrange(4), rng.randrange(1, size // 3)
            if op == 0:
                n = min(n, ref.current_window_size)
                ours.window_consumed(n)
                ref.window_consumed(n)
            elif op == 1:
                assert ours.process_bytes(n) == ref.process_bytes(n)
            elif op == 2:
                assert ours.acknowledged(n) == (ref.process_bytes(n) or 0)
            else:
                assert ours._maybe_update_window() == ref._maybe_update_window()
            state = (ours.max_window_size, ours.current_window_size, ours._bytes_processed)
            assert state == (ref.max_window_size, ref.current_window_size, ref._bytes_processed)
        with pytest.raises(h2.exceptions.FlowControlError):
            ours.window_consumed(ours.current_window_size + 1)
        with pytest.raises(h2.exceptions.FlowControlError):
            ours.window_opened(2**31 + 5)


def test_h2_and_the_fast_path_share_one_receive_window() -> None:
    """The connection's and each stream's receive window are the adopted ``_Window``s, in
    h2 as in ours: what h2 charges (a padded frame) the fast path sees, and back."""
    side = Side(True)
    h = _raw_h2(side.server)
    conn = h._inbound_flow_control_window_manager
    stream = h.streams[side.sid]._inbound_window_manager
    assert isinstance(conn, core._Window) and isinstance(stream, core._Window)
    assert side.server._streams[side.sid].window is stream
    before = side.windows()
    _raw_h2(side.client).send_data(side.sid, b"p" * 40, pad_length=9)  # h2's path
    side.client.send(side.sid, b"q" * 60)  # the fast path
    side.feed(side.client.data_to_send(), [])
    assert side.windows()[0] == before[0] - 50 - 60
    assert side.windows()[2] == before[2] - 50 - 60


def test_new_streams_start_as_h2s_would() -> None:
    """Streams we create in h2's table (``h2credit.Connection.begin_stream``: our CONNECTs,
    the peer's on the fast path) start with the windows and frame size h2's own
    ``_begin_new_stream`` gives, with each side's settings in effect, before and after
    they change."""
    cfg = HboneConfig(stream_window=300_000, connection_window=1 << 20,
                      max_frame_size=32_768, max_streams_per_connection=10)
    client, server = HboneConnection(Role.CLIENT, cfg), HboneConnection(Role.SERVER, cfg)

    def h2_made(conn: HboneConnection, sid: int) -> tuple[int, int, int | None]:
        raw = _raw_h2(conn)
        # h2's own, not h2credit's override of it
        made = h2.connection.H2Connection._begin_new_stream(
            raw, sid, h2.connection.AllowedStreamIDs(sid & 1))
        del raw.streams[sid]
        return made._inbound_window_manager.max_window_size, \
            made.outbound_flow_control_window, made.max_outbound_frame_size

    def ours(conn: HboneConnection, sid: int) -> tuple[int, int, int | None]:
        st = _raw_h2(conn).streams[sid]
        return st._inbound_window_manager.max_window_size, \
            st.outbound_flow_control_window, st.max_outbound_frame_size

    # before any SETTINGS went either way: our receive window (h2 takes its own settings
    # as in effect at once), the peer's defaults
    early = HboneConnection(Role.CLIENT, cfg)
    sid = early.open("10.0.0.2:80", traceparent=TRACE)
    assert ours(early, sid) == h2_made(early, sid + 2) == (300_000, 65_535, 16_384)
    client.initiate()
    server.initiate()
    for _ in range(3):
        server.receive(client.data_to_send())
        client.receive(server.data_to_send())
    for _ in range(2):  # (a server's h2 opens on the first HEADERS: that one is h2's)
        sid = client.open("10.0.0.2:80", traceparent=TRACE)
        server.receive(client.data_to_send())
    assert server.fast_header_blocks == 1
    assert _raw_h2(client).highest_outbound_stream_id == sid
    assert _raw_h2(server).highest_inbound_stream_id == sid
    assert ours(client, sid) == h2_made(client, sid + 2) == (300_000, 300_000, 32_768)
    assert ours(server, sid) == h2_made(server, sid + 2) == (300_000, 300_000, 32_768)


def test_h2_and_the_data_path_share_each_send_window() -> None:
    """The send windows live in ``core._Credit`` holders behind properties of h2's objects
    (``h2credit``): the peer's WINDOW_UPDATEs and SETTINGS (h2's to handle) move the
    window the data path charges, and h2 sees every charge."""
    side = Side(True)
    c, s = side.client, side.server
    raw = _raw_h2(c)
    stream = raw.streams[side.sid]
    assert isinstance(stream, h2credit.Stream) and isinstance(raw, h2credit.Connection)
    credit = c._streams[side.sid].credit
    assert stream.outbound_flow_control_window == credit.value == 65_535
    c.send(side.sid, b"w" * 65_535)  # the whole stream window
    assert credit.value == 0 and raw.local_flow_control_window(side.sid) == 0
    assert c.frame_header(side.sid, 1) is None
    side.events += s.receive(c.data_to_send())
    for ev in side.events:
        if isinstance(ev, core.Data):
            s.ack(ev.stream_id, ev.flow_length)
    c.receive(s.data_to_send())  # the server's WINDOW_UPDATEs, through h2
    assert credit.value == raw.local_flow_control_window(side.sid) > 0
    assert c.frame_header(side.sid, 1) is not None
    # the peer grows the initial window: h2 moves every stream's window by the difference
    before = credit.value
    _raw_h2(s).update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100_000})
    c.receive(s.data_to_send())
    assert credit.value == before + 100_000 - 65_535
    assert raw.outbound_flow_control_window == c._credit.value
