"""One typed wrapper per BPF map (bpf/include/maps.h), over a raw byte backend.

The layouts mirror bpf/include/types.h. Addresses and ports are stored as the
packet carries them (network byte order); marks and counters in host order.
Each wrapper takes a :class:`MapBackend`: :class:`~ztunnel_py.redirect.bpfsys.PinnedMap`
in the agent, :class:`DictBackend` (the dict-backed twin) in unit tests.
"""

from __future__ import annotations

import enum
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol


class MapBackend(Protocol):
    key_size: int
    value_size: int

    def lookup(self, key: bytes) -> bytes | None: ...
    def update(self, key: bytes, value: bytes) -> None: ...
    def delete(self, key: bytes) -> bool: ...
    def iter_keys(self) -> Iterator[bytes]: ...


class DictBackend:
    """A BPF map twin over a dict, with the kernel's size checks."""

    def __init__(self, key_size: int, value_size: int, max_entries: int = 4096) -> None:
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self.data: dict[bytes, bytes] = {}

    def lookup(self, key: bytes) -> bytes | None:
        self._check(key)
        return self.data.get(key)

    def update(self, key: bytes, value: bytes) -> None:
        self._check(key)
        if len(value) != self.value_size:
            raise ValueError(f"value of {len(value)} bytes, want {self.value_size}")
        if key not in self.data and len(self.data) >= self.max_entries:
            raise OSError(7, "map full")  # E2BIG, as the kernel says
        self.data[key] = value

    def delete(self, key: bytes) -> bool:
        self._check(key)
        return self.data.pop(key, None) is not None

    def iter_keys(self) -> Iterator[bytes]:
        return iter(list(self.data))

    def _check(self, key: bytes) -> None:
        if len(key) != self.key_size:
            raise ValueError(f"key of {len(key)} bytes, want {self.key_size}")


def ip_key(ip: str) -> bytes:
    return socket.inet_aton(ip)


def ip_of(key: bytes) -> str:
    return socket.inet_ntoa(key)


class Reason(enum.IntEnum):
    """``enum zt_reason`` in bpf/include/types.h."""

    OUT_CAPTURED = 0
    IN_HBONE = 1
    IN_PLAIN = 2
    ESTABLISHED = 3
    DROP_NO_LISTENER = 4
    DROP_ASSIGN = 5
    DROP_NO_CONFIG = 6
    PASS_NODE = 7
    PASS_MARK = 8
    PASS_NOT_ENROLLED = 9
    PASS_LOCAL = 10
    SAME_NODE = 11
    DROP_SPOOFED = 12


REASON_SLOTS = 13


# -- zt_cfg -------------------------------------------------------------------

_CFG = struct.Struct("=II4s2s2s2sH")
_INT_KEY = struct.Struct("=i")


@dataclass(frozen=True)
class CaptureSettings:
    """``struct zt_config``: what every hook needs to know about the agent."""

    agent_mark: int
    route_mark: int
    listen_ip: str  # "0.0.0.0" = wildcard listeners
    port_out: int
    port_in: int
    port_hbone: int


class ConfigMap:
    size = (_INT_KEY.size, _CFG.size)

    def __init__(self, backend: MapBackend) -> None:
        self._b = backend

    def set(self, s: CaptureSettings) -> None:
        value = _CFG.pack(
            s.agent_mark,
            s.route_mark,
            socket.inet_aton(s.listen_ip),
            struct.pack("!H", s.port_out),
            struct.pack("!H", s.port_in),
            struct.pack("!H", s.port_hbone),
            1,
        )
        self._b.update(_INT_KEY.pack(0), value)

    def get(self) -> CaptureSettings | None:
        raw = self._b.lookup(_INT_KEY.pack(0))
        if raw is None:
            return None
        agent, route, ip, out, inp, hbone, ready = _CFG.unpack(raw)
        if not ready:
            return None
        return CaptureSettings(
            agent, route, socket.inet_ntoa(ip),
            struct.unpack("!H", out)[0], struct.unpack("!H", inp)[0],
            struct.unpack("!H", hbone)[0],
        )


# -- zt_pods ------------------------------------------------------------------

_POD = struct.Struct("=II")


class PodsMap:
    """Enrolled pods of this node: pod IPv4 -> its host-side veth ifindex."""

    size = (4, _POD.size)

    def __init__(self, backend: MapBackend) -> None:
        self._b = backend

    def put(self, ip: str, ifindex: int) -> None:
        self._b.update(ip_key(ip), _POD.pack(ifindex, 0))

    def remove(self, ip: str) -> bool:
        return self._b.delete(ip_key(ip))

    def items(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for key in self._b.iter_keys():
            raw = self._b.lookup(key)
            if raw is not None:
                out[ip_of(key)] = _POD.unpack(raw)[0]
        return out


# -- zt_nodeips ---------------------------------------------------------------


class NodeIpsMap:
    """The node's own addresses: pod traffic to them is never captured."""

    size = (4, 4)

    def __init__(self, backend: MapBackend) -> None:
        self._b = backend

    def replace(self, ips: Iterable[str]) -> None:
        want = {ip_key(ip) for ip in ips}
        for key in list(self._b.iter_keys()):
            if key not in want:
                self._b.delete(key)
        for key in want:
            self._b.update(key, struct.pack("=I", 1))

    def items(self) -> set[str]:
        return {ip_of(k) for k in self._b.iter_keys()}


# -- zt_reasons (per CPU) -----------------------------------------------------


class ReasonsMap:
    """Packets per :class:`Reason`, summed over CPUs."""

    def __init__(self, backend: MapBackend) -> None:
        self._b = backend

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for reason in Reason:
            raw = self._b.lookup(_INT_KEY.pack(int(reason)))
            total = 0
            if raw is not None:
                total = sum(v for (v,) in struct.iter_unpack("=Q", raw))
            out[reason.name.lower()] = total
        return out


# -- zt_podstats --------------------------------------------------------------

_STATS = struct.Struct("=QQQQ")


@dataclass(frozen=True)
class PodCounters:
    """``struct zt_pod_stats``: connections captured and packets dropped, per pod."""

    out_captured: int = 0
    in_captured: int = 0
    established: int = 0
    dropped: int = 0


class PodStatsMap:
    size = (4, _STATS.size)

    def __init__(self, backend: MapBackend) -> None:
        self._b = backend

    def ensure(self, ip: str) -> None:
        """Create the pod's (zeroed) counters; the programs only ever add to them."""
        if self._b.lookup(ip_key(ip)) is None:
            self._b.update(ip_key(ip), _STATS.pack(0, 0, 0, 0))

    def remove(self, ip: str) -> bool:
        return self._b.delete(ip_key(ip))

    def get(self, ip: str) -> PodCounters | None:
        raw = self._b.lookup(ip_key(ip))
        return None if raw is None else PodCounters(*_STATS.unpack(raw))

    def items(self) -> dict[str, PodCounters]:
        out: dict[str, PodCounters] = {}
        for key in self._b.iter_keys():
            raw = self._b.lookup(key)
            if raw is not None:
                out[ip_of(key)] = PodCounters(*_STATS.unpack(raw))
        return out


@dataclass
class CaptureMaps:
    """The five maps of one node's capture."""

    config: ConfigMap
    pods: PodsMap
    node_ips: NodeIpsMap
    reasons: ReasonsMap
    pod_stats: PodStatsMap

    @staticmethod
    def fake(cpus: int = 2) -> CaptureMaps:
        """All five over :class:`DictBackend` (for unit tests)."""
        return CaptureMaps(
            ConfigMap(DictBackend(*ConfigMap.size, max_entries=1)),
            PodsMap(DictBackend(*PodsMap.size)),
            NodeIpsMap(DictBackend(*NodeIpsMap.size, max_entries=64)),
            ReasonsMap(DictBackend(4, 8 * cpus, max_entries=REASON_SLOTS)),
            PodStatsMap(DictBackend(*PodStatsMap.size)),
        )


# map name (bpf/include/maps.h) -> whether its values are per CPU
MAP_NAMES = {
    "zt_cfg": False,
    "zt_pods": False,
    "zt_nodeips": False,
    "zt_reasons": True,
    "zt_podstats": False,
}
