"""The few bpf(2) commands the agent needs, through ctypes: no bcc in the agent.

The agent only opens pinned programs and maps and reads or writes map
entries; compiling (bcc, LLVM, ~75 MB) happens in a short-lived child
(:mod:`ztunnel_py.redirect.compile`). Keys and values are raw bytes here; the
typed wrappers in :mod:`ztunnel_py.redirect.maps` give them shape.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
from collections.abc import Iterator
from pathlib import Path

# bpf(2) commands (include/uapi/linux/bpf.h)
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_OBJ_GET_INFO_BY_FD = 15

BPF_ANY = 0

_SYSCALL_NR = {"x86_64": 321, "aarch64": 280}


class BpfError(OSError):
    """A bpf(2) call failed; the message names the command and the object."""


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    nr = _SYSCALL_NR.get(platform.machine())
    if nr is None:
        raise BpfError(errno.ENOSYS, f"bpf(2): unsupported machine {platform.machine()}")
    ret = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf(2) {what}: {os.strerror(err)}")
    return int(ret)


def _attr() -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(128)


def _put(buf: ctypes.Array[ctypes.c_char], offset: int, ctype: type, value: int) -> None:
    ctype.from_buffer(buf, offset).value = value  # type: ignore[attr-defined]


def _addr(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


def obj_get(path: Path) -> int:
    """Open a pinned program or map; returns a new fd (the caller closes it)."""
    attr = _attr()
    name = ctypes.create_string_buffer(os.fsencode(path))
    _put(attr, 0, ctypes.c_uint64, _addr(name))
    return _bpf(BPF_OBJ_GET, attr, f"open pinned {path} (is the capture installed?)")


def obj_pin(fd: int, path: Path) -> None:
    attr = _attr()
    name = ctypes.create_string_buffer(os.fsencode(path))
    _put(attr, 0, ctypes.c_uint64, _addr(name))
    _put(attr, 8, ctypes.c_uint32, fd)
    _bpf(BPF_OBJ_PIN, attr, f"pin fd {fd} at {path}")


class _MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("_rest", ctypes.c_uint8 * 64),
    ]


class _ProgInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("_rest", ctypes.c_uint8 * 200),
    ]


def _info(fd: int, info: ctypes.Structure) -> None:
    attr = _attr()
    _put(attr, 0, ctypes.c_uint32, fd)
    _put(attr, 4, ctypes.c_uint32, ctypes.sizeof(info))
    _put(attr, 8, ctypes.c_uint64, ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"info of fd {fd}")


def map_shape(fd: int) -> tuple[str, int, int, int]:
    """(name, key size, value size, max entries) of an open map."""
    info = _MapInfo()
    _info(fd, info)
    return info.name.decode(), info.key_size, info.value_size, info.max_entries


def prog_id(fd: int) -> int:
    info = _ProgInfo()
    _info(fd, info)
    return int(info.id)


def possible_cpus() -> int:
    """Slots of a per-CPU map value (``/sys/devices/system/cpu/possible``)."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


class PinnedMap:
    """Raw access to one BPF map by fd: bytes in, bytes out."""

    def __init__(self, fd: int, name: str, key_size: int, value_size: int) -> None:
        self.fd = fd
        self.name = name
        self.key_size = key_size
        self.value_size = value_size

    @classmethod
    def open(cls, path: Path, *, percpu: bool = False) -> PinnedMap:
        fd = obj_get(path)
        name, key_size, value_size, _ = map_shape(fd)
        if percpu:
            value_size = ((value_size + 7) // 8 * 8) * possible_cpus()
        return cls(fd, name, key_size, value_size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _elem(self, cmd: int, key: bytes, value: ctypes.Array[ctypes.c_char] | None,
              flags: int = 0) -> int:
        if len(key) != self.key_size:
            raise ValueError(f"map {self.name}: key of {len(key)} bytes, want {self.key_size}")
        attr = _attr()
        kbuf = ctypes.create_string_buffer(key, len(key))
        _put(attr, 0, ctypes.c_uint32, self.fd)
        _put(attr, 8, ctypes.c_uint64, _addr(kbuf))
        if value is not None:
            _put(attr, 16, ctypes.c_uint64, _addr(value))
        _put(attr, 24, ctypes.c_uint64, flags)
        return _bpf(cmd, attr, f"map {self.name} command {cmd}")

    def lookup(self, key: bytes) -> bytes | None:
        value = ctypes.create_string_buffer(self.value_size)
        try:
            self._elem(BPF_MAP_LOOKUP_ELEM, key, value)
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return value.raw

    def update(self, key: bytes, value: bytes) -> None:
        if len(value) != self.value_size:
            raise ValueError(
                f"map {self.name}: value of {len(value)} bytes, want {self.value_size}"
            )
        buf = ctypes.create_string_buffer(value, len(value))
        self._elem(BPF_MAP_UPDATE_ELEM, key, buf, BPF_ANY)

    def delete(self, key: bytes) -> bool:
        try:
            self._elem(BPF_MAP_DELETE_ELEM, key, None)
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def iter_keys(self) -> Iterator[bytes]:
        attr = _attr()
        nxt = ctypes.create_string_buffer(self.key_size)
        _put(attr, 0, ctypes.c_uint32, self.fd)
        _put(attr, 8, ctypes.c_uint64, 0)  # NULL key: the first one
        _put(attr, 16, ctypes.c_uint64, _addr(nxt))
        while True:
            try:
                _bpf(BPF_MAP_GET_NEXT_KEY, attr, f"map {self.name} next key")
            except BpfError as exc:
                if exc.errno == errno.ENOENT:
                    return
                raise
            key = nxt.raw
            yield key
            cur = ctypes.create_string_buffer(key, len(key))
            nxt = ctypes.create_string_buffer(self.key_size)
            _put(attr, 8, ctypes.c_uint64, _addr(cur))
            _put(attr, 16, ctypes.c_uint64, _addr(nxt))  # `cur` lives until the next turn
