"""One record per proxied connection, emitted once at close (STYLE.md §10).

The data path fills a ``ConnectionResult`` while the connection lives (byte
counters are plain integer adds on the relay's hot path) and calls
``ConnectionResult.close()`` exactly once; the registered sinks (access log,
Prometheus metrics) see the finished record.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

Sink = Callable[["ConnectionResult"], None]

_open_sinks: list[Sink] = []
_close_sinks: list[Sink] = []


def add_sink(on_close: Sink, on_open: Sink | None = None) -> None:
    """Register consumers of opened and finished connections (metrics, access log)."""
    if on_close not in _close_sinks:
        _close_sinks.append(on_close)
    if on_open is not None and on_open not in _open_sinks:
        _open_sinks.append(on_open)


def remove_sink(on_close: Sink, on_open: Sink | None = None) -> None:
    if on_close in _close_sinks:
        _close_sinks.remove(on_close)
    if on_open is not None and on_open in _open_sinks:
        _open_sinks.remove(on_open)


# Both made per connection: each writes its ``__init__`` (compiled, ``ztunnel_py.native``;
# a dataclass-made one stays interpreted).


@dataclass(init=False)
class Peer:
    """One end of a connection as the mesh sees it."""

    address: str  # "ip:port"
    workload: str  # workload (pod) name
    namespace: str
    principal: str  # SPIFFE id, "" when unknown
    app: str  # canonical service name
    version: str  # canonical revision
    service: str  # destination service hostname (destination only)

    def __init__(self, address: str = "", workload: str = "", namespace: str = "",
                 principal: str = "", app: str = "", version: str = "",
                 service: str = "") -> None:
        self.address = address
        self.workload = workload
        self.namespace = namespace
        self.principal = principal
        self.app = app
        self.version = version
        self.service = service


@dataclass(init=False)
class ConnectionResult:
    direction: str  # "outbound" | "inbound"
    src: Peer
    dst: Peer
    # Istio's connection_security_policy: "mutual_tls" over HBONE, "none" in plaintext
    security: str
    protocol: str
    hbone_target: str  # the :authority of the HBONE CONNECT, when tunnelled
    bytes_sent: int  # towards the destination
    bytes_received: int  # back from the destination
    started: float
    # "" while open; at close: "ok", or a short reason ("denied: <policy>", "upstream refused"...)
    result: str
    response_flags: str  # Envoy-style flags: "-", "UF" (upstream failure), "DENY"...
    opened: bool
    closed: bool
    # Set when a policy change revokes an open connection: wins over the relay's "reset".
    revoked: tuple[str, str] | None
    duration_final_s: float

    def __init__(self, direction: str, src: Peer | None = None, dst: Peer | None = None, *,
                 security: str = "none", protocol: str = "tcp", hbone_target: str = "",
                 bytes_sent: int = 0, bytes_received: int = 0, started: float | None = None,
                 result: str = "", response_flags: str = "-") -> None:
        self.direction = direction
        self.src = src if src is not None else Peer()
        self.dst = dst if dst is not None else Peer()
        self.security = security
        self.protocol = protocol
        self.hbone_target = hbone_target
        self.bytes_sent = bytes_sent
        self.bytes_received = bytes_received
        self.started = time.monotonic() if started is None else started
        self.result = result
        self.response_flags = response_flags
        self.opened = False
        self.closed = False
        self.revoked = None
        self.duration_final_s = 0.0

    @property
    def duration_s(self) -> float:
        return self.duration_final_s if self.closed else time.monotonic() - self.started

    def open(self) -> None:
        """The connection is established (counted as opened); later calls are ignored."""
        if self.opened:
            return
        self.opened = True
        for sink in list(_open_sinks):
            sink(self)

    def revoke(self, reason: str) -> None:
        """A policy change denies this open connection; the close records why."""
        self.revoked = (f"denied: {reason}", "DENY")

    def close(self, result: str = "ok", response_flags: str | None = None) -> None:
        """Finish the record once; later calls are ignored."""
        if self.closed:
            return
        self.closed = True
        if self.revoked is not None:
            result, response_flags = self.revoked
        self.result = result
        if response_flags is not None:
            self.response_flags = response_flags
        self.duration_final_s = time.monotonic() - self.started
        for sink in list(_close_sinks):
            sink(self)
