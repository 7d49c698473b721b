"""Logging set-up: structlog, console for humans, JSON with ``LOG_FORMAT=json``.

A last-line-of-defence processor removes anything that looks like private-key
material from every event before it is rendered.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from ztunnel_py.config import LogConfig

_KEY_PEM = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.S
)


def _scrub(value: Any) -> Any:
    if isinstance(value, str) and "PRIVATE KEY" in value:
        return _KEY_PEM.sub("[private key redacted]", value)
    if isinstance(value, bytes) and b"PRIVATE KEY" in value:
        return "[private key redacted]"
    return value


def redact_keys(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in event.items():
        event[key] = _scrub(value)
    return event


def configure(cfg: LogConfig | None = None, *, stream: Any = None) -> None:
    """Configure structlog and the stdlib root logger once per process."""
    cfg = cfg or LogConfig()
    level = getattr(logging, cfg.level.upper(), None)
    if not isinstance(level, int):
        raise ValueError(f"LOG_LEVEL={cfg.level!r}: expected debug, info, warning or error")
    renderer: Any
    if cfg.format == "json":
        renderer = structlog.processors.JSONRenderer()
    elif cfg.format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        raise ValueError(f"LOG_FORMAT={cfg.format!r}: expected console or json")
    out = stream or sys.stderr
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_keys,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=level, stream=out, format="%(levelname)s %(name)s: %(message)s")


def get(name: str) -> Any:
    """A lazy structlog logger carrying ``component=name``.

    Lazy: it binds at each use, so a logger taken at import time follows a
    later :func:`configure` (format, level, stream).
    """
    return structlog.get_logger(component=name)
