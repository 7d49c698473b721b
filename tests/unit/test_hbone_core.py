"""The sans-IO HBONE core: two in-memory peers exchanging bytes, no sockets."""

from __future__ import annotations

import pytest

from ztunnel_py.config import HboneConfig
from ztunnel_py.hbone import core
from ztunnel_py.hbone.core import HboneConnection, Role

SMALL = HboneConfig(
    stream_window=65_535, connection_window=65_535, max_frame_size=16_384,
    max_streams_per_connection=10,
)


class Pair:
    """A client and a server wired back to back; ``pump`` moves bytes until quiet."""

    def __init__(self, cfg: HboneConfig = SMALL) -> None:
        self.client = HboneConnection(Role.CLIENT, cfg)
        self.server = HboneConnection(Role.SERVER, cfg)
        self.client.initiate()
        self.server.initiate()
        self.client_events: list[core.Event] = []
        self.server_events: list[core.Event] = []
        self.pump()

    def pump(self) -> None:
        for _ in range(1000):
            c2s = self.client.data_to_send()
            s2c = self.server.data_to_send()
            if not c2s and not s2c:
                return
            if c2s:
                self.server_events += self.server.receive(c2s)
            if s2c:
                self.client_events += self.client.receive(s2c)
        raise AssertionError("peers never went quiet")

    def take(self, side: str) -> list[core.Event]:
        events = self.client_events if side == "client" else self.server_events
        out = list(events)
        events.clear()
        return out


def received(events: list[core.Event], stream_id: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, core.Data) and e.stream_id == stream_id)


def test_connect_carries_authority_and_hbone_headers() -> None:
    p = Pair()
    sid = p.client.open(
        "10.1.2.3:8080", forwarded="for=10.0.0.7", baggage="k8s.namespace.name=a",
        traceparent="00-0123456789abcdef0123456789abcdef-0123456789abcdef-01",
    )
    p.pump()
    [req] = p.take("server")
    assert isinstance(req, core.ConnectRequested)
    assert req.stream_id == sid
    assert req.authority == "10.1.2.3:8080"
    assert req.headers[":method"] == "CONNECT"
    assert req.headers["forwarded"] == "for=10.0.0.7"
    assert req.headers["baggage"] == "k8s.namespace.name=a"
    assert req.headers["traceparent"].startswith("00-0123456789abcdef")
    p.server.respond(sid, core.OK)
    p.pump()
    assert p.take("client") == [core.ConnectResponse(sid, 200)]


def test_traceparent_is_generated_when_absent() -> None:
    p = Pair()
    p.client.open("10.1.2.3:80")
    p.pump()
    [req] = p.take("server")
    assert isinstance(req, core.ConnectRequested)
    version, trace, span, flags = req.headers["traceparent"].split("-")
    assert (version, len(trace), len(span), flags) == ("00", 32, 16, "00")


@pytest.mark.parametrize("status", [400, 401, 503])
def test_refusal_ends_the_stream(status: int) -> None:
    p = Pair()
    sid = p.client.open("10.1.2.3:80")
    p.pump()
    p.take("server")
    p.server.respond(sid, status)
    p.pump()
    assert p.take("client") == [core.ConnectResponse(sid, status)]
    assert not p.client.is_open(sid)
    assert not p.server.is_open(sid)


def test_data_both_ways_and_half_close_each_direction() -> None:
    p = Pair()
    sid = p.client.open("10.1.2.3:80")
    p.pump()
    p.take("server")
    p.server.respond(sid, core.OK)
    assert p.client.send(sid, b"hello") is True
    p.client.end(sid)  # the client's TCP sender shut down
    p.pump()
    ev = p.take("server")
    assert received(ev, sid) == b"hello"
    assert core.StreamEnded(sid) in ev
    # the other direction still flows after the client's half-close
    assert p.server.send(sid, b"world") is True
    p.pump()
    ev = p.take("client")
    assert received(ev, sid) == b"world"
    assert core.StreamEnded(sid) not in ev
    assert p.server.is_open(sid)
    p.server.end(sid)
    p.pump()
    assert core.StreamEnded(sid) in p.take("client")
    assert not p.client.is_open(sid) and not p.server.is_open(sid)


def test_reset_propagates() -> None:
    p = Pair()
    sid = p.client.open("10.1.2.3:80")
    p.pump()
    p.take("server")
    p.server.respond(sid, core.OK)
    p.pump()
    p.take("client")
    p.server.reset(sid)
    p.pump()
    [ev] = p.take("client")
    assert isinstance(ev, core.StreamReset) and ev.stream_id == sid and ev.remote
    assert not p.client.is_open(sid)


def test_unacknowledged_data_closes_the_senders_window() -> None:
    """Backpressure: nothing is credited back until the receiver acks it."""
    p = Pair()
    sid = p.client.open("10.1.2.3:80")
    p.pump()
    p.take("server")
    p.server.respond(sid, core.OK)
    p.pump()
    payload = bytes(range(256)) * 1024  # 256 KiB, four windows
    assert p.client.send(sid, payload) is False
    p.pump()
    got = received(p.take("server"), sid)
    assert len(got) == 65_535  # exactly one window, then the sender stops
    assert p.client.pending(sid) == len(payload) - 65_535
    # the receiver drains and acks: the rest flows, a window at a time
    total = got
    for _ in range(10):
        p.server.ack(sid, len(got))
        p.pump()
        events = p.take("server")
        got = received(events, sid)
        total += got
        if len(total) == len(payload):
            break
    assert total == payload
    assert p.client.pending(sid) == 0
    assert core.Writable(sid) in p.take("client")


def test_end_waits_for_pending_data() -> None:
    p = Pair()
    sid = p.client.open("10.1.2.3:80")
    p.pump()
    p.take("server")
    p.server.respond(sid, core.OK)
    p.pump()
    payload = b"x" * 100_000
    p.client.send(sid, payload)
    p.client.end(sid)
    p.pump()
    ev = p.take("server")
    assert core.StreamEnded(sid) not in ev  # data first
    p.server.ack(sid, len(received(ev, sid)))
    p.pump()
    ev = p.take("server")
    assert len(received(ev, sid)) == 100_000 - 65_535
    assert core.StreamEnded(sid) in ev


def test_large_windows_and_frames_are_negotiated() -> None:
    cfg = HboneConfig(stream_window=1 << 20, connection_window=4 << 20, max_frame_size=1 << 16)
    p = Pair(cfg)
    sid = p.client.open("10.1.2.3:80")
    p.pump()
    p.take("server")
    p.server.respond(sid, core.OK)
    p.pump()
    p.client.send(sid, b"y" * (1 << 20))
    wire = p.client.data_to_send()
    # 64 KiB DATA frames: sixteen 9-byte headers for one full stream window
    assert len(wire) == (1 << 20) + 16 * 9
    ev = p.server.receive(wire)
    assert sum(len(e.data) for e in ev if isinstance(e, core.Data)) == 1 << 20  # unacked


def test_stream_limit_is_the_peers_max_concurrent_streams() -> None:
    p = Pair()
    ids = []
    for _ in range(10):
        assert p.client.can_open
        ids.append(p.client.open("10.1.2.3:80"))
    p.pump()
    assert not p.client.can_open
    p.client.reset(ids[0])
    assert p.client.can_open


def test_non_connect_requests_get_400() -> None:
    import h2.config
    import h2.connection
    import h2.events

    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    raw.initiate_connection()
    raw.send_headers(
        1, [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "x")],
        end_stream=True,
    )
    server = HboneConnection(Role.SERVER, SMALL)
    server.initiate()
    events = server.receive(raw.data_to_send())
    assert not any(isinstance(e, core.ConnectRequested) for e in events)
    replies = raw.receive_data(server.data_to_send())
    [resp] = [e for e in replies if isinstance(e, h2.events.ResponseReceived)]
    assert dict(resp.headers)[b":status"] == b"400"


def test_goaway_is_reported() -> None:
    p = Pair()
    p.server.close()
    p.pump()
    [ev] = p.take("client")
    assert isinstance(ev, core.ConnectionEnded) and ev.error_code == 0
    assert not p.client.can_open


def test_garbage_is_a_protocol_error() -> None:
    server = HboneConnection(Role.SERVER, SMALL)
    server.initiate()
    with pytest.raises(core.ProtocolError):
        server.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


@pytest.mark.parametrize(
    ("authority", "expected"),
    [("10.0.0.1:80", ("10.0.0.1", 80)), ("[fd00::1]:443", ("fd00::1", 443))],
)
def test_parse_authority(authority: str, expected: tuple[str, int]) -> None:
    assert core.parse_authority(authority) == expected
    assert core.format_authority(*expected) == authority


@pytest.mark.parametrize(
    "authority", ["", "example.com:80", "10.0.0.1", "10.0.0.1:0", "1.2.3.4:99999"]
)
def test_parse_authority_rejects(authority: str) -> None:
    with pytest.raises(core.BadRequest):
        core.parse_authority(authority)


def test_forwarded_round_trip() -> None:
    assert core.parse_forwarded_for(core.forwarded_for("10.0.0.7")) == "10.0.0.7"
    assert core.parse_forwarded_for(core.forwarded_for("fd00::7")) == "fd00::7"
    assert core.parse_forwarded_for("by=x;for=10.1.1.1, for=10.2.2.2") == "10.1.1.1"
    assert core.parse_forwarded_for("for=unknown") is None


@pytest.mark.parametrize(
    "text",
    ["10.0.0.1", "0.0.0.0", "255.255.255.255", "010.0.0.1", "10.0.0.01", "256.0.0.1",
     "1.2.3", "1.2.3.4.5", "1.2.3.4\n", " 1.2.3.4", "\u0661.2.3.4", "fd00::1",
     "::ffff:10.0.0.1", "FD00::0001", "", "x"],
)
def test_canonical_ip_agrees_with_ipaddress(text: str) -> None:
    import ipaddress

    try:
        expected: str | None = str(ipaddress.ip_address(text))
    except ValueError:
        expected = None
    if expected is None:
        with pytest.raises(ValueError):
            core.canonical_ip(text)
    else:
        assert core.canonical_ip(text) == expected


@pytest.mark.parametrize(
    "authority", ["010.0.0.1:80", "\u0661.0.0.1:80", "10.0.0.1:\u0668\u0660", "10.0.0.1:+80"]
)
def test_parse_authority_rejects_lookalikes(authority: str) -> None:
    # non-ASCII digits and octal-looking octets never pass as an address or a port
    with pytest.raises(core.BadRequest):
        core.parse_authority(authority)


def test_traceparent_ids_are_never_all_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    draws = iter([0, 1, 1 << 64, (5 << 64) | 7])  # zero, zero trace, zero span, good
    monkeypatch.setattr(core, "_random_bits", lambda bits: next(draws))
    assert core.new_traceparent() == f"00-{5:032x}-{7:016x}-00"


def test_the_state_tuples_are_h2s_own_sets() -> None:
    # the tuples stand in for h2's predicates (membership by identity, no hashing)
    from h2.stream import STREAM_OPEN, StreamState

    from ztunnel_py.hbone import core as c

    assert {s for s in StreamState if STREAM_OPEN[s]} == set(c._STREAM_OPEN)
    assert set(c._SENDABLE) | set(c._RECEIVABLE) == set(c._STREAM_OPEN)
    assert len(set(c._STREAM_OPEN)) == len(c._STREAM_OPEN)
