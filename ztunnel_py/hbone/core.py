"""HBONE, sans-IO: HTTP/2 CONNECT tunnels on ``h2`` with no sockets in sight.

``HboneConnection`` wraps one ``h2.connection.H2Connection`` (client or server
role) and speaks in tunnel terms: ``open()`` a CONNECT to an ``ip:port``,
``respond()`` 200/400/401/503, ``send()`` bytes, ``end()`` (TCP half-close →
END_STREAM), ``reset()`` (TCP reset → RST_STREAM), ``ack()`` bytes that the
local writer has drained. ``receive(bytes)`` returns tunnel events; bytes to
put on the wire come out of ``data_to_send()``. Tests push bytes between two
in-memory peers.

Flow control gives real backpressure in both directions:

* received DATA is credited back to the peer only when the caller ``ack()``s
  it, i.e. once the local TCP writer has drained it. A slow local reader
  therefore closes the peer's window instead of growing our buffers;
* ``send()`` frames only what the peer's windows allow and keeps the rest
  pending (``pending(stream_id)``); the caller stops reading its source while
  anything is pending and resumes on the ``Writable`` event.

Speed: h2 stays the authority on the protocol (connection and stream state
machines, settings, validation of the peer's headers, every unusual frame), but
the per-byte and per-tunnel work happens here, following h2's own bookkeeping:
DATA frames are written and (on established streams) read by hand, WINDOW_UPDATEs
come from h2's window managers but are written here, and our few header blocks
(CONNECT, a status) are encoded here without touching the HPACK dynamic table;
received ones of that plain shape (static table, no Huffman) whose fields h2's
validation would pass unchanged are read here too, every other block by h2.
``tests/unit/test_hbone_fastpath.py`` holds each shortcut to h2's behaviour byte
for byte.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import ipaddress
import random
import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
import hpack
import hyperframe.frame

from ztunnel_py.config import HboneConfig
from ztunnel_py.hbone import h2credit


def _short_data_repr(data: bytes | None) -> str:
    """Same text as hyperframe's ``_raw_data_repr``, but hexlifies 10 bytes, not all of them.

    h2 formats ``repr(frame)`` for every received frame (for a trace log that is
    off), which hexlified each whole DATA payload: ~15% of the tunnel's CPU.
    """
    if not data:
        return "None"
    r = bytes(data[:11]).hex()
    if len(r) > 20:
        r = r[:20] + "..."
    return "<hex:" + r + ">"


hyperframe.frame._raw_data_repr = _short_data_repr

# HTTP/2 default initial window (RFC 9113 §6.9.2); the connection window starts here.
_DEFAULT_WINDOW = 65_535
_LARGEST_WINDOW = 2**31 - 1  # RFC 9113 §6.9.1
# State sets as tuples: ``in`` finds an enum member by identity, where a set would hash
# it (a Python-level ``Enum.__hash__`` for h2's ConnectionState, on every DATA frame).
# Stream states in which we may send DATA (we never send it otherwise).
_SENDABLE = (h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_REMOTE)
# ...and in which the peer may send it to us (the receive fast path's precondition).
_RECEIVABLE = (h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_LOCAL)
# h2's ``H2Stream.open`` (a property) without its frame
_STREAM_OPEN = (*_SENDABLE, h2.stream.StreamState.HALF_CLOSED_LOCAL)
_CONNECTION_OPEN = (
    h2.connection.ConnectionState.CLIENT_OPEN, h2.connection.ConnectionState.SERVER_OPEN
)
# h2's stream inputs we drive (per tunnel), looked up once
_RECV_HEADERS: Final = h2.stream.StreamInputs.RECV_HEADERS
_RECV_END_STREAM: Final = h2.stream.StreamInputs.RECV_END_STREAM
_SEND_HEADERS: Final = h2.stream.StreamInputs.SEND_HEADERS
_SEND_END_STREAM: Final = h2.stream.StreamInputs.SEND_END_STREAM
# Frame layout (RFC 9113 §4.1, §6): the bits the receive fast path looks at. (``Final``:
# compiled, each is a constant in the code, not a lookup in the module's dict.)
_FRAME_HEADER: Final = 9
FRAME_HEADER: Final = 9  # the room a sender leaves in front of payload written in place
# Payload this big is lent as a view into the receive buffer (``lend_views``) instead of
# copied out: below it a copy costs less than tracking who still holds the buffer.
LEND_MIN: Final = 16 << 10
_PREFACE: Final = len(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # the client's connection preface
_DATA: Final = 0x0
_HEADERS: Final = 0x1
_PUSH_PROMISE: Final = 0x5
_CONTINUATION: Final = 0x9
_END_STREAM: Final = 0x1
_END_HEADERS: Final = 0x4
_PADDED: Final = 0x8
_PRIORITY: Final = 0x20
_WINDOW_UPDATE: Final = b"\x00\x00\x04\x08\x00"  # length 4, type WINDOW_UPDATE, no flags
_WINDOW_UPDATE_0: Final = b"\x00\x00\x04\x08\x00\x00\x00\x00\x00"  # ...on the connection


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class HboneError(Exception):
    """Base of the HBONE errors."""


class BadRequest(HboneError):
    """A CONNECT request we cannot serve as asked (maps to 400)."""


class ProtocolError(HboneError):
    """The peer broke HTTP/2 (the connection is unusable)."""


# -- HBONE statuses (DESIGN.md) ---------------------------------------------------

OK = 200
BAD_REQUEST = 400
UNAUTHORIZED = 401
SERVICE_UNAVAILABLE = 503

# RST_STREAM codes the legs tell apart (RFC 9113 section 7)
NO_ERROR: Final = 0  # after a complete answer: "read no more of it" (RFC 9113 section 8.1)
CANCEL: Final = 8  # anything else we reset: abrupt


# -- events -------------------------------------------------------------------------
# (Each writes its own ``__init__``: compiled, a dataclass-made one would stay a Python
# function, called per tunnel or per read.)


@dataclass(init=False)
class ConnectRequested:
    """Server side: a peer asks for a tunnel to ``authority`` (``ip:port``)."""

    stream_id: int
    authority: str
    headers: Mapping[str, str]

    def __init__(self, stream_id: int, authority: str, headers: Mapping[str, str]) -> None:
        self.stream_id = stream_id
        self.authority = authority
        self.headers = headers


@dataclass(init=False)
class ConnectResponse:
    """Client side: the server answered our CONNECT (200 means the tunnel is up)."""

    stream_id: int
    status: int

    def __init__(self, stream_id: int, status: int) -> None:
        self.stream_id = stream_id
        self.status = status


class Data:
    """Tunnel payload; ``ack()`` ``flow_length`` once it has been written out locally.

    Not a dataclass at all, unlike the other events: one is built per read on the data
    path, and compiled, this plain class is built and read natively.
    ``data`` is a memoryview into the buffer given to ``receive`` when the connection
    lends views (``HboneConnection.lend_views``): valid until that buffer is reused.
    """

    def __init__(self, stream_id: int, data: bytes | memoryview, flow_length: int) -> None:
        self.stream_id = stream_id
        self.data = data
        self.flow_length = flow_length

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Data) and (
            self.stream_id, bytes(self.data), self.flow_length
        ) == (other.stream_id, bytes(other.data), other.flow_length)

    def __repr__(self) -> str:
        return f"Data({self.stream_id}, {_short_data_repr(bytes(self.data))}, {self.flow_length})"


@dataclass(init=False)
class StreamEnded:
    """The peer half-closed the tunnel (END_STREAM = its TCP sender shut down)."""

    stream_id: int

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


@dataclass(init=False)
class StreamReset:
    """The stream is gone abruptly (RST_STREAM, or a rejected CONNECT)."""

    stream_id: int
    error_code: int
    remote: bool

    def __init__(self, stream_id: int, error_code: int, remote: bool = True) -> None:
        self.stream_id = stream_id
        self.error_code = error_code
        self.remote = remote


@dataclass(init=False)
class Writable:
    """Everything pending on the stream has been framed: resume reading its source."""

    stream_id: int

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


@dataclass(init=False)
class ConnectionEnded:
    """GOAWAY received or a protocol error: no new streams; ``error_code`` 0 is graceful."""

    error_code: int
    reason: str

    def __init__(self, error_code: int, reason: str = "") -> None:
        self.error_code = error_code
        self.reason = reason


Event = (
    ConnectRequested
    | ConnectResponse
    | Data
    | StreamEnded
    | StreamReset
    | Writable
    | ConnectionEnded
)


# -- headers ------------------------------------------------------------------------


def format_authority(ip: str, port: int) -> str:
    """``10.0.0.1:80`` / ``[fd00::1]:80``."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


# trace ids: unique, not secret (see new_traceparent); seeded from the OS
_random_bits = random.Random().getrandbits  # noqa: S311

# A canonical dotted quad (no leading zeros): exactly the IPv4 strings that
# ``ipaddress`` accepts and prints back unchanged, so they need no parsing.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"  # ASCII digits only
_CANONICAL_V4 = re.compile(rf"(?:{_OCTET}\.){{3}}{_OCTET}")


def canonical_ip(text: str) -> str:
    """``text`` as ``ipaddress`` prints it; ValueError when it is not an IP address."""
    if _CANONICAL_V4.fullmatch(text):
        return text
    return str(ipaddress.ip_address(text))


@functools.lru_cache(maxsize=4096)  # the same few destinations, tunnel after tunnel
def parse_authority(authority: str) -> tuple[str, int]:
    """An HBONE ``:authority`` must be a literal ``ip:port``; anything else is a 400."""
    host, sep, port_text = authority.rpartition(":")
    if not sep or not (port_text.isascii() and port_text.isdigit()):
        raise BadRequest(f":authority {authority!r} is not ip:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = canonical_ip(host)
    except ValueError:
        raise BadRequest(f":authority {authority!r} does not name an IP address") from None
    port = int(port_text)
    if not 0 < port < 65536:
        raise BadRequest(f":authority {authority!r} has port {port} out of range")
    return ip, port


def new_traceparent() -> str:
    """A fresh W3C ``traceparent`` (version 00, random trace and span ids, not sampled).

    Trace ids need to be unique, not secret: they come from ``random`` (as OpenTelemetry's
    default id generator does), not a getrandom() syscall per tunnel. All-zero ids are
    invalid (W3C Trace Context §3.2.2.3, §3.2.2.4) and are drawn again."""
    ids = _random_bits(192)
    while not ids >> 64 or not ids & 0xFFFF_FFFF_FFFF_FFFF:
        ids = _random_bits(192)
    text = f"{ids:048x}"
    return f"00-{text[:32]}-{text[32:]}-00"


def forwarded_for(client_ip: str) -> str:
    """RFC 7239 ``forwarded: for=...`` (IPv6 quoted and bracketed)."""
    return f'for="[{client_ip}]"' if ":" in client_ip else f"for={client_ip}"


@functools.lru_cache(maxsize=4096)  # the same few clients, tunnel after tunnel
def parse_forwarded_for(value: str) -> str | None:
    """The first ``for=`` address of a ``forwarded`` header, or None."""
    for element in value.split(","):
        for pair in element.split(";"):
            key, sep, raw = pair.strip().partition("=")
            if sep and key.strip().lower() == "for":
                addr = raw.strip().strip('"').strip("[]")
                try:
                    return canonical_ip(addr)
                except ValueError:
                    return None
    return None


# -- header blocks, by hand (RFC 7541) ------------------------------------------------

# HPACK static table indexes (RFC 7541 Appendix A) of the names and fields we send.
_STATIC_AUTHORITY, _STATIC_METHOD, _STATIC_STATUS = 1, 2, 8
_STATIC_STATUS_FIELD = {200: 8, 400: 12}  # ":status 200" and ":status 400" are entries


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer with ``first``'s high bits in the first octet (RFC 7541 §5.1)."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_str(text: str) -> bytes:
    raw = text.encode()
    return _hpack_int(len(raw), 7, 0) + raw  # no Huffman: cheaper than the bytes it saves


def _literal(name: str | int, value: str, *, never_indexed: bool = False) -> bytes:
    """A literal field that leaves the dynamic table alone: without indexing (0000) or
    never indexed (0001), with a static name index or a literal name."""
    first = 0x10 if never_indexed else 0x00
    if isinstance(name, int):
        return _hpack_int(name, 4, first) + _hpack_str(value)
    return bytes((first,)) + _hpack_str(name) + _hpack_str(value)


_NAME_INDEX = {":authority": _STATIC_AUTHORITY, ":method": _STATIC_METHOD}


def _request_block(headers: Iterable[tuple[str, str]]) -> bytes:
    out = []
    for field_ in headers:
        name, value = field_
        never = isinstance(field_, hpack.NeverIndexedHeaderTuple)
        out.append(_literal(_NAME_INDEX.get(name, name), value, never_indexed=never))
    return b"".join(out)


@functools.lru_cache(maxsize=1024)
def _connect_fields(authority: str, forwarded: str, baggage: str) -> bytes:
    """The CONNECT block's fields that repeat from tunnel to tunnel (destination, client
    address, caller), encoded once per combination."""
    fields = [(":method", "CONNECT"), (":authority", authority)]
    if forwarded:
        fields.append(("forwarded", forwarded))
    if baggage:
        fields.append(("baggage", baggage))
    return _request_block(fields)


_TRACEPARENT_NAME = _literal("traceparent", "", never_indexed=True)[:-1]  # name, no value


def _status_block(status: int) -> bytes:
    index = _STATIC_STATUS_FIELD.get(status)
    if index is not None:
        return bytes((0x80 | index,))  # indexed field
    return _literal(_STATIC_STATUS, str(status))


# -- header blocks read by hand (the receive fast path) --------------------------------

_STATIC_TABLE = tuple(
    (name.decode(), value.decode()) for name, value in hpack.table.HeaderTable.STATIC_TABLE
)
_PLAIN_BLOCK_MAX = 4096  # bigger blocks go to h2 (its header list size limit is 64 KiB)
_REQUEST_PSEUDO = frozenset({":method", ":authority"})  # a CONNECT: no :scheme, no :path
_RESPONSE_PSEUDO = frozenset({":status"})
# field names h2 passes through unchanged: lowercase tokens (RFC 9110 §5.6.2)...
_FIELD_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
# ...except those it checks further (connection-specific fields, RFC 9113 §8.2.2)
_CHECKED_NAMES = frozenset(
    {"connection", "proxy-connection", "keep-alive", "transfer-encoding", "upgrade", "te",
     "host", "content-length", "cookie"}
)
# names seen to pass (the few every CONNECT carries), so that each is matched once
_GOOD_NAMES: set[str] = set()
_GOOD_NAMES_MAX = 256


def _value_ok(value: str) -> bool:
    """What h2 passes unchanged: no NUL/CR/LF, no surrounding whitespace (RFC 9113
    §8.2.1); empty is allowed."""
    if "\r" in value or "\n" in value or "\x00" in value:
        return False
    return not value or (value[0] not in " \t" and value[-1] not in " \t")


class _NotPlain(Exception):
    """The block needs h2's decoder (dynamic table, Huffman, a size update...)."""


def _plain_int(block: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    """An HPACK integer (RFC 7541 §5.1) at ``pos``: (value, next position)."""
    limit = (1 << prefix_bits) - 1
    value = block[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        if shift > 21:
            raise _NotPlain  # no field we read is that long
        byte = block[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _plain_str(block: bytes, pos: int) -> tuple[str, int]:
    length = block[pos]
    if length & 0x80:
        raise _NotPlain  # Huffman-coded
    if length == 0x7F:
        length, pos = _plain_int(block, pos, 7)
    else:
        pos += 1
    end = pos + length
    if end > len(block):
        raise _NotPlain
    return block[pos:end].decode(), end


def _plain_fields(data: memoryview) -> list[tuple[str, str]] | None:
    """The fields of a header block that only uses the static table and plain literals
    without indexing (what ``_request_block`` / ``_status_block`` write), or None.

    Reading such a block leaves the HPACK decoder's state as it was, so a block this
    refuses goes to h2 untouched, and one it reads is exactly what h2's decoder would
    have read (``tests/unit/test_hbone_fastpath.py``)."""
    block = bytes(data)
    fields: list[tuple[str, str]] = []
    pos, n = 0, len(block)
    try:
        while pos < n:
            first = block[pos]
            if first & 0x80:  # indexed field
                index, pos = _plain_int(block, pos, 7)
                if not 0 < index <= len(_STATIC_TABLE):
                    return None
                fields.append(_STATIC_TABLE[index - 1])
                continue
            if first & 0xE0:  # incremental indexing (01), or a table size update (001)
                return None
            index = first & 0x0F  # without indexing / never indexed
            if index == 0x0F:
                index, pos = _plain_int(block, pos, 4)
            else:
                pos += 1
            if index > len(_STATIC_TABLE):
                return None
            if index:
                name = _STATIC_TABLE[index - 1][0]
            else:
                name, pos = _plain_str(block, pos)
            value, pos = _plain_str(block, pos)
            fields.append((name, value))
    except (_NotPlain, IndexError, UnicodeDecodeError):
        return None
    return fields


def _tunnel_fields(
    fields: list[tuple[str, str]], pseudo: frozenset[str]
) -> dict[str, str] | None:
    """The fields as a dict when they are exactly the ``pseudo`` fields (each once, first)
    and ordinary fields that h2's validation would pass unchanged; None otherwise."""
    out: dict[str, str] = {}
    seen = 0
    regular = False
    for name, value in fields:
        if name[:1] == ":":
            if regular or name not in pseudo or name in out or not value:
                return None
            seen += 1
        else:
            if name not in _GOOD_NAMES:
                if name in _CHECKED_NAMES or not _FIELD_NAME.fullmatch(name):
                    return None
                if len(_GOOD_NAMES) < _GOOD_NAMES_MAX:
                    _GOOD_NAMES.add(name)
            regular = True
        if not _value_ok(value):
            return None
        out[name] = value
    return out if seen == len(pseudo) else None


# -- the connection -----------------------------------------------------------------


class _Window:
    """h2's ``WindowManager`` (``h2.windows``), compiled, put in its place in the
    connection and in each of our streams (``_adopt``): h2 calls it by name as ever, and
    the fast paths read and change its fields natively instead of through a Python
    object's attributes (a few of them per DATA frame and per acknowledgement). One
    window, shared: nothing is mirrored."""

    def __init__(self, max_window_size: int, current_window_size: int,
                 bytes_processed: int) -> None:
        self.max_window_size = max_window_size
        self.current_window_size = current_window_size
        self._bytes_processed = bytes_processed

    def window_consumed(self, size: int) -> None:
        self.current_window_size -= size
        if self.current_window_size < 0:
            raise h2.exceptions.FlowControlError("Flow control window shrunk below 0")

    def window_opened(self, size: int) -> None:
        self.current_window_size += size
        if self.current_window_size > _LARGEST_WINDOW:
            raise h2.exceptions.FlowControlError(
                f"Flow control window mustn't exceed {_LARGEST_WINDOW}")
        self.max_window_size = max(self.current_window_size, self.max_window_size)

    def process_bytes(self, size: int) -> int | None:
        self._bytes_processed += size
        return self._maybe_update_window()

    def _maybe_update_window(self) -> int | None:
        """h2's rule: credit everything processed once half the window is processed, or
        once the window is exhausted and a little (1 KiB, or a quarter window) is."""
        processed = self._bytes_processed
        if not processed:
            return None
        increment = 0
        if (
            self.current_window_size == 0 and processed > min(1024, self.max_window_size // 4)
        ) or processed >= self.max_window_size // 2:
            increment = min(processed, self.max_window_size - self.current_window_size)
            self._bytes_processed = 0
        self.current_window_size += increment
        return increment

    def acknowledged(self, size: int) -> int:
        """``process_bytes`` without the calls while no update can be due (below half
        the window processed, the window not exhausted): the increment to announce, 0
        for none."""
        processed = self._bytes_processed + size
        if processed < self.max_window_size // 2 and self.current_window_size:
            self._bytes_processed = processed
            return 0
        return self.process_bytes(size) or 0


class _Credit:
    """A send window (``h2credit``): h2 reads and writes ``value`` through a property of
    its connection or stream, the data path natively."""

    def __init__(self) -> None:
        self.value = 0


def _adopt(manager: Any) -> _Window:
    """A ``_Window`` with the state of h2's ``manager`` (or ``manager`` itself)."""
    if isinstance(manager, _Window):
        return manager
    return _Window(manager.max_window_size, manager.current_window_size,
                   manager._bytes_processed)


class _Stream:
    """Our side of one stream: what waits for window, and how far it has ended; and
    h2's stream, with its receive window adopted (``_Window``).

    While we hold a stream, its h2 state follows from our flags: it may send DATA until
    ``ended_local`` and receive it until ``ended_remote`` (we drop a stream when it is
    reset either way or ended both ways) - so the per-frame paths test the flags."""

    def __init__(self, stream_id: int, h2_stream: Any) -> None:
        self.pending: deque[memoryview] = deque()
        self.pending_bytes = 0
        self.end_after_pending = False
        self.reset_after_end = False  # then RST_STREAM NO_ERROR (``end_reading``)
        self.ended_local = False
        self.ended_remote = False
        self.closed = False
        self.h2_stream = h2_stream
        self.window = _adopt(h2_stream._inbound_window_manager)
        h2_stream._inbound_window_manager = self.window
        self.credit: _Credit = h2_stream.credit  # its send window (``h2credit.Stream``)
        # a declared content-length: h2 counts that stream's DATA, so h2 receives it all
        self.sized = h2_stream._expected_content_length is not None
        self.head_tail = b"\x00\x00" + stream_id.to_bytes(4, "big")  # DATA, no flags


class HboneConnection:
    """One HTTP/2 connection carrying HBONE tunnels (sans-IO)."""

    def __init__(
        self, role: Role, config: HboneConfig | None = None, *, fast_receive: bool = True
    ) -> None:
        """``fast_receive=False`` hands every received byte to h2 (the reference the
        fast path is tested against)."""
        self.role = role
        self.config = config or HboneConfig()
        self._credit = _Credit()  # the connection's send window
        self._h2 = h2credit.Connection(
            h2.config.H2Configuration(
                client_side=role is Role.CLIENT,
                header_encoding="utf-8",
                validate_inbound_headers=True,  # the peer's headers are checked...
                validate_outbound_headers=False,  # ...ours are built right here
                normalize_outbound_headers=False,
            ),
            self._credit, _Credit,
        )
        self._h2.local_settings = h2.settings.Settings(
            client=role is Role.CLIENT,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.config.stream_window,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: self.config.max_frame_size,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: (
                    self.config.max_streams_per_connection
                ),
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        # Header blocks are a few short fields per tunnel: Huffman coding them costs more
        # CPU (pure Python, both ends) than the bytes it saves on a LAN.
        encoder = self._h2.encoder
        setattr(encoder, "encode", functools.partial(type(encoder).encode, encoder, huffman=False))  # noqa: B010
        # h2 reads this at construction only; keep it in step with our SETTINGS
        self._h2.max_inbound_frame_size = self.config.max_frame_size
        h2c: Any = self._h2  # (its receive windows become ``_Window``s)
        self._conn_window = _adopt(h2c._inbound_flow_control_window_manager)
        h2c._inbound_flow_control_window_manager = self._conn_window
        # whether h2's connection is open, kept here (``_h2_changed``, after each call into
        # h2 that can change it): the per-frame paths read it
        self._h2_open = False
        # the settings the per-frame and per-tunnel paths read, kept here and read from h2
        # by ``_settings_changed`` (just below, and as they change): h2's ``Settings``
        # properties are Python calls keyed by enums
        self._max_out_frame = self._local_window = self._remote_window = 0
        self._local_max_streams = self._remote_max_streams = 0
        self._settings_changed()
        self._out: list[bytes | memoryview] = []  # h2's bytes, then our DATA frames, in order
        self._streams: dict[int, _Stream] = {}
        self._blocked: set[int] = set()  # streams with pending data
        self.ended = False  # GOAWAY sent or received, or the peer broke the protocol
        self._started = False
        # receive fast path state (see ``receive``)
        self._fast_receive = fast_receive
        self._preface_left = _PREFACE if role is Role.SERVER else 0
        self._head = b""  # a frame header split across reads (< 9 bytes)
        self._h2_left = 0  # bytes of the current frame still owed to h2
        self._fast_left = 0  # payload bytes of the current fast-path DATA frame
        self._fast_sid = 0
        self._fast_end = False  # the current fast-path frame carries END_STREAM
        self._in_header_block = False  # HEADERS without END_HEADERS: h2 gets all until done
        # Data events carry views into receive()'s buffer instead of copies (``_emit``):
        # for a caller that writes them out before it reuses the buffer (``aio``)
        self.lend_views = False
        self.fast_data_frames = 0  # DATA frames taken by the fast path (tests, profiling)
        self.fast_header_blocks = 0  # CONNECTs and statuses taken by the fast path

    # -- lifecycle ---------------------------------------------------------------

    def initiate(self) -> None:
        """Queue the connection preface, our SETTINGS and the connection window."""
        if self._started:
            return
        self._started = True
        self._h2.initiate_connection()
        extra = self.config.connection_window - _DEFAULT_WINDOW
        if extra > 0:
            self._h2.increment_flow_control_window(extra)
        self._h2_changed()

    def _settings_changed(self) -> None:
        """Re-read the settings in effect (ours once acknowledged, the peer's once
        received)."""
        local, remote = self._h2.local_settings, self._h2.remote_settings
        self._max_out_frame = self._h2.max_outbound_frame_size  # the peer's frame size
        self._local_window = local.initial_window_size
        self._local_max_streams = local.max_concurrent_streams
        self._remote_window = remote.initial_window_size
        self._remote_max_streams = remote.max_concurrent_streams

    def _h2_changed(self) -> None:
        """Re-read what we keep of h2's connection state (after h2 ran)."""
        h2c = self._h2
        self._h2_open = h2c.state_machine.state in _CONNECTION_OPEN

    def data_to_send(self) -> bytes:
        return b"".join(self.chunks_to_send())

    def chunks_to_send(self) -> list[bytes | memoryview]:
        """What to write, in order, without joining (for ``transport.writelines``)."""
        if self._h2._data_to_send:  # (h2's data_to_send() allocates even when empty)
            self._out.append(self._h2.data_to_send())
        out, self._out = self._out, []
        return out

    def close(self, error_code: int = 0) -> None:
        """Send GOAWAY: no new streams; open ones are left to the caller."""
        if not self.ended:
            self.ended = True
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.close_connection(error_code)
            self._h2_changed()

    @property
    def wants_write(self) -> bool:
        """Whether ``chunks_to_send`` has anything."""
        return bool(self._out or self._h2._data_to_send)

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def can_open(self) -> bool:
        """Whether one more stream fits (peer's limit, not ended)."""
        if self.ended:
            return False
        limit = self._remote_max_streams
        # Every stream a client has open is one of ours, and we forget a stream no later
        # than h2 closes it: far below the limit our count decides; near it, h2 counts
        # (its count walks every stream, a cost per new tunnel worth avoiding).
        if self.role is Role.CLIENT and len(self._streams) < limit - 1:
            return True
        return self._h2.open_outbound_streams < limit

    def pending(self, stream_id: int) -> int:
        s = self._streams.get(stream_id)
        return s.pending_bytes if s else 0

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    # -- client ------------------------------------------------------------------

    def open(
        self,
        authority: str,
        *,
        forwarded: str = "",
        baggage: str = "",
        traceparent: str = "",
        extra: Iterable[tuple[str, str]] = (),
    ) -> int:
        """Send ``CONNECT authority`` on a new stream; returns its id."""
        if self.role is not Role.CLIENT:
            raise HboneError("only the client role opens tunnels")
        if self.ended:
            raise HboneError("connection is closing; open a new one")
        # (h2's get_next_available_stream_id, without its log call)
        highest: int = self._h2.highest_outbound_stream_id
        stream_id = highest + 2 if highest else 1
        if stream_id > _LARGEST_WINDOW:  # (the largest stream id too)
            raise h2.exceptions.NoAvailableStreamIDError("Exhausted allowed stream IDs")
        # unique per request: never worth a slot in the peer's HPACK table
        trace = traceparent or new_traceparent()
        extra = list(extra)
        block = b"".join((
            _connect_fields(authority, forwarded, baggage), _TRACEPARENT_NAME, _hpack_str(trace),
            _request_block(extra) if extra else b"",
        ))
        if not self._send_header_block(stream_id, block, end_stream=False, authority=authority):
            headers = [(":method", "CONNECT"), (":authority", authority)]
            if forwarded:
                headers.append(("forwarded", forwarded))
            if baggage:
                headers.append(("baggage", baggage))
            headers.append(hpack.NeverIndexedHeaderTuple("traceparent", trace))  # type: ignore[arg-type]
            headers.extend(extra)
            self._h2.send_headers(stream_id, headers)
            self._h2_changed()  # (a client's first HEADERS opens the connection)
        self._streams[stream_id] = _Stream(stream_id, self._h2.streams[stream_id])
        return stream_id

    # -- server ------------------------------------------------------------------

    def respond(self, stream_id: int, status: int) -> None:
        """Answer a CONNECT; anything but 200 also ends the stream."""
        if stream_id not in self._streams:
            return
        done = status != OK
        if not self._send_header_block(stream_id, _status_block(status), end_stream=done):
            self._h2.send_headers(stream_id, [(":status", str(status))], end_stream=done)
            self._h2_changed()
        if done:
            self._forget(stream_id)

    # -- both --------------------------------------------------------------------

    def frame_header(self, stream_id: int, n: int) -> bytes | None:
        """The 9-byte header of one DATA frame of ``n`` bytes (no flags) for this stream,
        with both send windows charged, when the common case holds: the stream is open
        for sending, nothing of it is queued, and ``n`` fits one frame and both windows.
        None otherwise (nothing charged): ``send`` queues and splits as h2 allows.

        The caller sends the header and then the payload, after ``chunks_to_send()``:
        ``send`` queues both, ``aio`` writes them in place from a leg's read buffer."""
        s = self._streams.get(stream_id)
        if s is None or s.ended_local or s.end_after_pending:
            return None
        return self._frame_header(s, stream_id, n)

    def _frame_header(self, s: _Stream, stream_id: int, n: int) -> bytes | None:
        if s.pending or not n or n > self._max_out_frame:
            return None
        conn_window, stream_window = self._credit, s.credit
        if n > conn_window.value or n > stream_window.value:
            return None
        conn_window.value -= n
        stream_window.value -= n
        return n.to_bytes(3, "big") + s.head_tail

    def send(self, stream_id: int, data: bytes) -> bool:
        """Frame ``data`` as far as the windows allow; True when nothing is left pending."""
        s = self._streams.get(stream_id)
        if s is None or s.ended_local or s.end_after_pending:
            return True
        head = self._frame_header(s, stream_id, len(data))
        if head is not None:  # the common case: one frame, out with the next write
            out = self._out
            if self._h2._data_to_send:
                out.append(self._h2.data_to_send())
            out.append(head)
            out.append(data)
            return True
        if data:
            s.pending.append(memoryview(data))
            s.pending_bytes += len(data)
            self._flush(stream_id, s)
        return s.pending_bytes == 0

    def end(self, stream_id: int) -> None:
        """Half-close: END_STREAM once the pending data has been framed."""
        s = self._streams.get(stream_id)
        if s is None or s.ended_local:
            return
        s.end_after_pending = True
        self._flush(stream_id, s)

    def end_reading(self, stream_id: int) -> None:
        """END_STREAM once the pending data has been framed, and then RST_STREAM with
        NO_ERROR: we have answered in full and read no more of the peer's side (RFC 9113
        section 8.1). The stream is ours until both have gone out (``is_open``)."""
        s = self._streams.get(stream_id)
        if s is None:
            return
        if s.ended_local:
            self.reset(stream_id, NO_ERROR)
            return
        s.reset_after_end = True
        self.end(stream_id)

    def reset(self, stream_id: int, error_code: int = CANCEL) -> None:
        if stream_id not in self._streams:
            return
        self._forget(stream_id)
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._h2.reset_stream(stream_id, error_code)
        self._h2_changed()

    def ack(self, stream_id: int, flow_length: int) -> None:
        """The local writer drained ``flow_length`` bytes of this stream: open the window."""
        if flow_length <= 0:
            return
        # h2's acknowledge_received_data, inline (once per read on the data path): its
        # window managers decide when a WINDOW_UPDATE is due (half a window, or an
        # exhausted one), we write the frames. While none can be due (below half the
        # window processed, and the window not exhausted: the rule of h2's
        # ``_maybe_update_window``) the count is kept here, without the manager's two
        # method calls; for both windows, as each is one per read.
        h2c = self._h2
        increment = self._conn_window.acknowledged(flow_length)
        if increment:
            h2c._data_to_send += _WINDOW_UPDATE_0 + increment.to_bytes(4, "big")
        s = self._streams.get(stream_id)
        if s is not None:
            increment = s.window.acknowledged(flow_length)
        else:  # one we dropped: h2 may still count it open (closed ones' windows are moot)
            stream = h2c.streams.get(stream_id)
            if stream is None or stream.state_machine.state not in _STREAM_OPEN:
                return
            increment = stream._inbound_window_manager.process_bytes(flow_length) or 0
        if increment:
            h2c._data_to_send += (
                _WINDOW_UPDATE + stream_id.to_bytes(4, "big") + increment.to_bytes(4, "big")
            )

    def receive(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed received bytes; returns the tunnel events they complete.

        ``data`` may be a view of a buffer the caller reuses: nothing of it is kept
        past this call (a partial frame header is copied; payload handed out is copied
        too, unless ``lend_views``: then a large piece is a view into ``data``).

        DATA frames on established streams take a fast path: the 9-byte frame header is
        parsed here, flow control is charged exactly as h2 would (both windows, before
        any payload is handed out) and the payload goes straight out as ``Data`` events,
        piece by piece as it arrives, without h2's frame buffer, frame objects and
        events; END_STREAM advances h2's stream state as h2 would. Every other frame, and
        any DATA frame that is unusual (padding, unknown or closing stream, oversized,
        over the window, inside a header block) is handed to h2 whole, in order, so h2
        stays the judge of the protocol: h2's own buffer is always at a frame boundary
        when the fast path runs. Consecutive payload of one stream within one call
        becomes one ``Data`` event (one write and one ack downstream, not one per frame).
        """
        if not self._fast_receive:
            return self._receive_h2(bytes(data), [])
        n = len(data)
        if (  # the interactive case: one whole small DATA frame, no flags, at a boundary
            _FRAME_HEADER < n < LEND_MIN
            and not (self._fast_left or self._h2_left or self._head or self._preface_left
                     or self._in_header_block)
        ):
            # as bytes: one small copy, and then every index below is native
            frame = data if isinstance(data, bytes) else bytes(data)
            if (
                frame[3] == _DATA
                and not frame[4]
                and (frame[0] << 16 | frame[1] << 8 | frame[2]) == n - _FRAME_HEADER
            ):
                sid = (frame[5] & 0x7F) << 24 | frame[6] << 16 | frame[7] << 8 | frame[8]
                if self._charge(sid, n - _FRAME_HEADER):
                    self.fast_data_frames += 1
                    return [Data(sid, frame[_FRAME_HEADER:], n - _FRAME_HEADER)]
        out: list[Event] = []
        batch: list[bytes | memoryview] = []  # for h2, in order, flushed before each fast frame
        view = memoryview(data)
        run: list[memoryview] = []  # payload of ``run_sid`` not yet turned into an event
        run_sid = 0
        pos = 0
        if self._preface_left:
            k = min(self._preface_left, n)
            batch.append(view[:k])
            self._preface_left -= k
            pos = k
        while pos < n:
            if self._fast_left:
                k = min(self._fast_left, n - pos)
                self._fast_left -= k
                sid = self._fast_sid
                if sid != run_sid and run:
                    self._emit(out, run_sid, run)
                    run = []
                run_sid = sid
                run.append(view[pos : pos + k])
                pos += k
                if not self._fast_left and self._fast_end:
                    self._fast_end = False
                    self._emit(out, run_sid, run)
                    run = []
                    self._end_of_stream(sid, out)
                continue
            if self._h2_left:
                k = min(self._h2_left, n - pos)
                batch.append(view[pos : pos + k])
                self._h2_left -= k
                pos += k
                continue
            # at a frame boundary
            if self._head:
                need = _FRAME_HEADER - len(self._head)
                head: bytes | memoryview = self._head + view[pos : pos + need]
            else:
                head = view[pos : pos + _FRAME_HEADER]
            if len(head) < _FRAME_HEADER:
                self._head = bytes(head)
                break
            pos += _FRAME_HEADER - len(self._head)
            self._head = b""
            length = (head[0] << 16) | (head[1] << 8) | head[2]
            ftype = head[3]
            flags = head[4]
            if (
                ftype == _DATA
                and not flags & _PADDED
                and (length or flags & _END_STREAM)
                and not self._in_header_block
            ):
                if batch:  # h2 must be up to date before the fast path looks at its state
                    if run:
                        self._emit(out, run_sid, run)
                        run = []
                    self._receive_h2(b"".join(batch), out)
                    batch = []
                sid = int.from_bytes(head[5:9], "big") & 0x7FFF_FFFF
                if self._charge(sid, length):
                    self.fast_data_frames += 1
                    end = bool(flags & _END_STREAM)
                    if length:
                        self._fast_left = length
                        self._fast_sid = sid
                        self._fast_end = end
                    else:  # an empty frame that ends the stream (our TCP FIN's usual form)
                        if run:
                            self._emit(out, run_sid, run)
                            run = []
                        self._end_of_stream(sid, out)
                    continue
            elif ftype in (_HEADERS, _PUSH_PROMISE):
                if (
                    ftype == _HEADERS
                    and flags & _END_HEADERS
                    and not flags & (_PADDED | _PRIORITY)
                    and not self._in_header_block
                    and n - pos >= length
                ):
                    # a whole header block in this read: maybe a tunnel's CONNECT or status
                    if run:
                        self._emit(out, run_sid, run)
                        run = []
                    if batch:
                        self._receive_h2(b"".join(batch), out)
                        batch = []
                    sid = int.from_bytes(head[5:9], "big") & 0x7FFF_FFFF
                    block = view[pos : pos + length]
                    if self._fast_headers(sid, bool(flags & _END_STREAM), block, out):
                        pos += length
                        continue
                self._in_header_block = not flags & _END_HEADERS
            elif ftype == _CONTINUATION and flags & _END_HEADERS:
                self._in_header_block = False
            batch.append(head)
            self._h2_left = length
        if run:
            self._emit(out, run_sid, run)
        if batch:
            self._receive_h2(b"".join(batch), out)
        return out

    def _fast_headers(
        self, sid: int, end_stream: bool, block: memoryview, out: list[Event]
    ) -> bool:
        """A tunnel's header block without h2's HEADERS machinery: a CONNECT opening a new
        stream (server) or the final status of one of our CONNECTs (client), when the
        block is plain (``_plain_fields``) and its fields are exactly what h2 would let
        through unchanged (``_tunnel_fields``). h2's connection and stream state machines
        take the same inputs as in ``_receive_headers_frame``. False: h2 reads the frame."""
        h2c = self._h2
        if not self._h2_open or len(block) > _PLAIN_BLOCK_MAX:
            return False
        fields = _plain_fields(block)
        if fields is None:
            return False
        if self.role is Role.SERVER:
            if (
                end_stream
                or sid in h2c.streams
                or not sid & 1
                or sid <= h2c.highest_inbound_stream_id
                # h2 counts open streams exactly (walking them) only near the limit
                or len(h2c.streams) >= self._local_max_streams
            ):
                return False
            headers = _tunnel_fields(fields, _REQUEST_PSEUDO)
            if headers is None or headers.get(":method") != "CONNECT":
                return False
            # (h2's connection state machine takes RECV_HEADERS from open to open: skipped)
            new = self._h2.begin_stream(
                sid, self._local_window, self._remote_window, self._max_out_frame)
            new.state_machine.process_input(_RECV_HEADERS)
            self.fast_header_blocks += 1
            self._streams[sid] = _Stream(sid, new)
            out.append(ConnectRequested(sid, headers[":authority"], headers))
            return True
        stream = h2c.streams.get(sid)
        if (
            sid not in self._streams
            or stream is None
            or stream.state_machine.state not in _RECEIVABLE
            or stream.state_machine.headers_received
        ):
            return False
        headers = _tunnel_fields(fields, _RESPONSE_PSEUDO)
        if headers is None:
            return False
        status = headers[":status"]
        if not (len(status) == 3 and status.isascii() and status.isdigit()) or status[0] == "1":
            return False  # informational responses (and nonsense) are h2's
        stream.state_machine.process_input(_RECV_HEADERS)
        if end_stream:
            stream.state_machine.process_input(_RECV_END_STREAM)
        self.fast_header_blocks += 1
        code = int(status)
        out.append(ConnectResponse(sid, code))
        if code != OK:
            self.reset(sid)
        if end_stream:
            self._remote_end(sid, out)
        return True

    def _emit(self, out: list[Event], stream_id: int, run: list[memoryview]) -> None:
        """``Data`` for consecutive fast-path payload of one stream: one event with a
        copy of it all; or, when lending views (``lend_views``), each piece of at least
        ``LEND_MIN`` bytes is an event of its own carrying the view itself (the pieces
        between them still copied, and joined)."""
        n = sum(map(len, run)) if len(run) > 1 else len(run[0])
        if stream_id not in self._streams:  # dropped by us mid-frame: credit it back now
            self.ack(stream_id, n)
            return
        if not self.lend_views or n < LEND_MIN:
            out.append(Data(
                stream_id, run[0].tobytes() if len(run) == 1 else b"".join(run), n))
            return
        small: list[memoryview] = []
        for piece in run:
            if len(piece) < LEND_MIN:
                small.append(piece)
                continue
            if small:
                m = sum(map(len, small))
                out.append(Data(stream_id, b"".join(small), m))
                small = []
            out.append(Data(stream_id, piece, len(piece)))
        if small:
            out.append(Data(stream_id, b"".join(small), sum(map(len, small))))

    def _end_of_stream(self, sid: int, out: list[Event]) -> None:
        """END_STREAM of a fast-path frame: h2's stream state, then ours."""
        s = self._streams.get(sid)
        if s is None:
            return  # we reset it meanwhile; the peer learns that from our RST_STREAM
        s.h2_stream.state_machine.process_input(_RECV_END_STREAM)
        self._remote_end(sid, out)

    def _charge(self, sid: int, length: int) -> bool:
        """Take a DATA frame on the fast path if h2 would accept it as plain stream data;
        charge both receive windows exactly as h2's ``_receive_data_frame`` does."""
        s = self._streams.get(sid)
        if (
            s is None
            or s.ended_remote
            or s.sized
            or not self._h2_open
            or length > self.config.max_frame_size  # (h2's max_inbound_frame_size)
        ):
            return False
        conn_window = self._conn_window
        stream_window = s.window
        if length > conn_window.current_window_size or length > stream_window.current_window_size:
            return False  # h2 raises the flow-control error
        conn_window.current_window_size -= length
        stream_window.current_window_size -= length
        return True

    def _receive_h2(self, data: bytes, out: list[Event]) -> list[Event]:
        try:
            h2_events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.ended = True
            raise ProtocolError(f"HTTP/2 protocol error from peer: {exc}") from None
        finally:
            self._h2_changed()
        flush = False
        for ev in h2_events:
            if isinstance(ev, h2.events.DataReceived):
                sid = ev.stream_id
                if sid in self._streams and ev.data:
                    out.append(Data(sid, ev.data, ev.flow_controlled_length))
                elif ev.flow_controlled_length:
                    # padding, or data for a stream we dropped: credit it back at once
                    self.ack(sid, ev.flow_controlled_length)
            elif isinstance(ev, h2.events.RequestReceived):
                self._on_request(ev, out)
            elif isinstance(ev, h2.events.ResponseReceived):
                self._on_response(ev, out)
            elif isinstance(ev, h2.events.StreamEnded):
                if ev.stream_id is not None:
                    self._remote_end(ev.stream_id, out)
            elif isinstance(ev, h2.events.StreamReset):
                sid = ev.stream_id
                if sid is not None and sid in self._streams:
                    self._forget(sid)
                    out.append(StreamReset(sid, int(ev.error_code or 0), remote=True))
            elif isinstance(ev, h2.events.WindowUpdated):
                flush = True
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                flush = True
                self._settings_changed()
            elif isinstance(ev, h2.events.SettingsAcknowledged):
                self._settings_changed()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.ended = True
                out.append(
                    ConnectionEnded(int(ev.error_code or 0), repr(ev.additional_data or b""))
                )
        if flush:
            for sid in list(self._blocked):
                s = self._streams.get(sid)
                if s is None:
                    self._blocked.discard(sid)
                    continue
                self._flush(sid, s)
                if s.pending_bytes == 0:
                    out.append(Writable(sid))
        return out

    # -- internals ---------------------------------------------------------------

    def _on_request(self, ev: h2.events.RequestReceived, out: list[Event]) -> None:
        sid = ev.stream_id
        if sid is None:
            return
        h2_stream = self._h2.streams.get(sid)
        if h2_stream is None:  # closed within the same read: nothing to answer
            return
        raw: Any = ev.headers or []
        headers = {str(k): str(v) for k, v in raw}
        self._streams[sid] = _Stream(sid, h2_stream)
        if headers.get(":method") != "CONNECT" or ":path" in headers:
            self.respond(sid, BAD_REQUEST)
            out.append(StreamReset(sid, 0, remote=False))
            return
        out.append(ConnectRequested(sid, headers.get(":authority", ""), headers))

    def _on_response(self, ev: h2.events.ResponseReceived, out: list[Event]) -> None:
        sid = ev.stream_id
        if sid is None or sid not in self._streams:
            return
        s = self._streams[sid]
        s.sized = s.h2_stream._expected_content_length is not None
        status = 0
        raw: Any = ev.headers or []
        for k, v in raw:
            if k in (":status", b":status"):
                status = int(v)
        out.append(ConnectResponse(sid, status))
        if status != OK:
            self.reset(sid)

    def _remote_end(self, stream_id: int, out: list[Event]) -> None:
        s = self._streams.get(stream_id)
        if s is None or s.ended_remote:
            return
        s.ended_remote = True
        out.append(StreamEnded(stream_id))
        if s.ended_local:
            self._forget(stream_id)

    def _send_header_block(
        self, stream_id: int, block: bytes, *, end_stream: bool, authority: str | None = None
    ) -> bool:
        """Queue a HEADERS frame we encoded ourselves, with h2's state changes of
        ``send_headers`` (connection and stream state machines, the new stream).

        Our blocks never touch the HPACK dynamic table (static indexes and literals
        without indexing only), so h2's encoder stays in step with the peer's decoder.
        False (the caller uses h2) when the encoder owes the peer a table size update,
        or the block needs CONTINUATION frames.
        """
        h2c = self._h2
        if h2c.encoder.header_table.resized or len(block) > h2c.max_outbound_frame_size:
            return False
        stream = h2c.streams.get(stream_id)
        if stream is None:
            limit = self._remote_max_streams
            # h2's count walks every stream; there are never more open than h2 holds
            if len(h2c.streams) >= limit and h2c.open_outbound_streams + 1 > limit:
                raise h2.exceptions.TooManyStreamsError(f"max outbound streams is {limit}")
        if not self._h2_open:  # (from open to open it changes nothing: skipped)
            h2c.state_machine.process_input(h2.connection.ConnectionInputs.SEND_HEADERS)
            self._h2_changed()  # (a client's first HEADERS opens the connection)
        if stream is None:
            stream = self._h2.begin_stream(
                stream_id, self._local_window, self._remote_window, self._max_out_frame)
        stream.state_machine.process_input(_SEND_HEADERS)
        flags = _END_HEADERS
        if end_stream:
            stream.state_machine.process_input(_SEND_END_STREAM)
            flags |= _END_STREAM
        if authority is not None:  # what h2's send_headers records for a request
            stream._authority = authority.encode()
            stream.request_method = b"CONNECT"
        else:
            stream.request_method = None
        h2c._data_to_send += (
            len(block).to_bytes(3, "big") + bytes((_HEADERS, flags)) + stream_id.to_bytes(4, "big")
        )
        h2c._data_to_send += block
        return True

    def _flush(self, stream_id: int, s: _Stream) -> None:
        h2c = self._h2
        max_frame = self._max_out_frame
        stream = s.h2_stream
        if stream.state_machine.state not in _SENDABLE:
            return
        out = self._out
        while s.pending:
            window = min(self._credit.value, s.credit.value)
            if window <= 0:
                break
            chunk = s.pending[0]
            n = min(len(chunk), window, max_frame)
            if n == len(chunk):
                s.pending.popleft()
            else:
                s.pending[0] = chunk[n:]
                chunk = chunk[:n]
            s.pending_bytes -= n
            # A DATA frame written by hand: h2 would copy the payload three times
            # (tobytes, frame serialisation, its output buffer). The flow-control
            # bookkeeping is exactly h2's own (send_data in connection and stream).
            if h2c._data_to_send:  # h2's frames queued so far go first
                out.append(h2c.data_to_send())
            out.append(n.to_bytes(3, "big") + s.head_tail)
            out.append(chunk)
            self._credit.value -= n
            s.credit.value -= n
        if s.pending:
            self._blocked.add(stream_id)
            return
        self._blocked.discard(stream_id)
        if s.end_after_pending and not s.ended_local:
            s.ended_local = True
            # h2's end_stream, by hand: the state changes, then an empty END_STREAM frame
            if not self._h2_open:  # (from open to open it changes nothing: skipped)
                h2c.state_machine.process_input(h2.connection.ConnectionInputs.SEND_DATA)
                self._h2_changed()
            stream.state_machine.process_input(_SEND_END_STREAM)
            h2c._data_to_send += b"\x00\x00\x00\x00\x01" + stream_id.to_bytes(4, "big")
            if s.ended_remote:
                self._forget(stream_id)
            elif s.reset_after_end:
                self.reset(stream_id, NO_ERROR)

    def _forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)
        self._blocked.discard(stream_id)
