"""One access-log line per connection, at close (STYLE.md §10).

The line is a structlog event (JSON with ``LOG_FORMAT=json``) whose keys follow
Istio's ztunnel access log: ``src.addr``, ``src.workload``, ``src.namespace``,
``src.identity``, ``dst.addr``, ``dst.hbone_addr``, ``dst.service``,
``dst.workload``, ``dst.namespace``, ``dst.identity``, ``direction``,
``bytes_sent`` (towards the destination), ``bytes_recv`` (back from it),
``duration_ms``, and ``result`` — plus ``error`` when the connection did not
end well (the reason: "denied: ...", "upstream refused"...).

:func:`connection_json` is the same record as a JSON-ready dict, for the admin
``/connections`` endpoint.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from ztunnel_py import log
from ztunnel_py.telemetry.connection import ConnectionResult, add_sink, remove_sink

EVENT = "connection complete"
FAILED_EVENT = "connection failed"


def access_fields(rec: ConnectionResult) -> dict[str, Any]:
    """The access-log fields of a finished (or live) connection (unknown ones left out
    rather than logged as empty strings)."""
    src, dst = rec.src, rec.dst
    fields: dict[str, Any] = {}
    # one test and store per field, in the line's order (compiled: no pairs built per call)
    if src.address:
        fields["src.addr"] = src.address
    if src.workload:
        fields["src.workload"] = src.workload
    if src.namespace:
        fields["src.namespace"] = src.namespace
    if src.principal:
        fields["src.identity"] = src.principal
    if dst.address:
        fields["dst.addr"] = dst.address
    if rec.hbone_target:
        fields["dst.hbone_addr"] = rec.hbone_target
    if dst.service:
        fields["dst.service"] = dst.service
    if dst.workload:
        fields["dst.workload"] = dst.workload
    if dst.namespace:
        fields["dst.namespace"] = dst.namespace
    if dst.principal:
        fields["dst.identity"] = dst.principal
    if rec.direction:
        fields["direction"] = rec.direction
    if rec.security:
        fields["security"] = rec.security
    fields["bytes_sent"] = rec.bytes_sent
    fields["bytes_recv"] = rec.bytes_received
    fields["duration_ms"] = round(rec.duration_s * 1000.0, 3)
    if rec.response_flags:
        fields["response_flags"] = rec.response_flags
    fields["result"] = rec.result or "open"
    if rec.result and rec.result != "ok":
        fields["error"] = rec.result
    return fields


def connection_json(rec: ConnectionResult) -> dict[str, Any]:
    """``rec`` as a JSON-ready dict: ConnectionResult's field names, plus ``duration_s``
    and ``started_unix`` (wall-clock start)."""
    out = asdict(rec)
    out["duration_s"] = round(rec.duration_s, 6)
    out["started_unix"] = round(time.time() - rec.duration_s, 3)
    return out


class AccessLog:
    """A ConnectionResult sink that logs one line per connection at close."""

    def __init__(self, logger: Any = None) -> None:
        """``logger``: a structlog-style logger to use instead of ``log.emitter``."""
        self._logger = logger
        self._attached = False
        self._emitter = log.emitter("access")

    def on_close(self, rec: ConnectionResult) -> None:
        fields = access_fields(rec)
        failed = "error" in fields
        if self._logger is not None:
            if failed:
                self._logger.warning(FAILED_EVENT, **fields)
            else:
                self._logger.info(EVENT, **fields)
        elif failed:
            self._emitter.warning(FAILED_EVENT, fields)
        else:
            self._emitter.info(EVENT, fields)

    def attach(self) -> None:
        add_sink(self.on_close)
        self._attached = True

    def detach(self) -> None:
        if self._attached:
            remove_sink(self.on_close)
            self._attached = False

    def __enter__(self) -> AccessLog:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()
