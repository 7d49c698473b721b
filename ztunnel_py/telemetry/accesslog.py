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


def put_field(fields: dict[str, Any], key: str, value: str | int | float) -> None:
    """An access-log field, put only when set ("" and 0 are what an empty one holds): one
    test and store per field, cheaper than building every pair and filtering them."""
    if value:
        fields[key] = value


def access_fields(rec: ConnectionResult) -> dict[str, Any]:
    """The access-log fields of a finished (or live) connection (unknown ones left out
    rather than logged as empty strings)."""
    src, dst = rec.src, rec.dst
    fields: dict[str, Any] = {}
    put_field(fields, "src.addr", src.address)
    put_field(fields, "src.workload", src.workload)
    put_field(fields, "src.namespace", src.namespace)
    put_field(fields, "src.identity", src.principal)
    put_field(fields, "dst.addr", dst.address)
    put_field(fields, "dst.hbone_addr", rec.hbone_target)
    put_field(fields, "dst.service", dst.service)
    put_field(fields, "dst.workload", dst.workload)
    put_field(fields, "dst.namespace", dst.namespace)
    put_field(fields, "dst.identity", dst.principal)
    put_field(fields, "direction", rec.direction)
    put_field(fields, "security", rec.security)
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
