"""Logging set-up: structlog, console for humans, JSON with ``LOG_FORMAT=json``.

A last-line-of-defence step removes anything that looks like private-key
material from every event before it is written.

Hot paths (one access-log line per connection) log through ``emitter(name)``:
with the JSON set-up it writes the very line structlog's chain would (same keys,
same order, same renderer) without the chain's per-processor calls; with any
other set-up it hands the event to structlog.

Lines reach the stream whole, one write each (structlog's ``PrintLogger`` made two:
the line, then its newline); an emitter's lines wait for the end of the event
loop's iteration and go out together (``_Lines``).
"""

from __future__ import annotations

import asyncio
import atexit
import datetime
import json
import logging
import re
import sys
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson
import structlog

from ztunnel_py.config import LogConfig

_KEY_PEM = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.S
)
_KEY_MARK = "PRIVATE KEY"
_REDACTED = "[private key redacted]"


def _scrub(value: Any) -> Any:
    if isinstance(value, str) and _KEY_MARK in value:
        return _KEY_PEM.sub(_REDACTED, value)
    if isinstance(value, bytes) and b"PRIVATE KEY" in value:
        return _REDACTED
    return value


def redact_keys(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in event.items():
        event[key] = _scrub(value)
    return event


class UtcStamper:
    """``structlog.processors.TimeStamper(fmt="iso", utc=True)``, same text
    (``2026-01-02T03:04:05.123456Z``), with the date and time of day formatted once
    per second instead of a ``datetime`` per line."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def text(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = datetime.datetime.fromtimestamp(second, tz=datetime.UTC).strftime(
                "%Y-%m-%dT%H:%M:%S"
            )
        micro = int((now - second) * 1_000_000)
        # datetime.isoformat leaves out a zero fraction
        return f"{self._prefix}.{micro:06d}Z" if micro else self._prefix + "Z"

    def __call__(
        self, _logger: Any, _name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event["timestamp"] = self.text()
        return event


def _json_fallback(obj: Any) -> Any:
    """What structlog's JSONRenderer does with values JSON has no type for."""
    try:
        return obj.__structlog__()
    except AttributeError:
        return repr(obj)


def _dumps(event: Mapping[str, Any]) -> str:
    try:
        return orjson.dumps(event, default=_json_fallback).decode()
    except TypeError:  # what orjson refuses (ints past 64 bits, non-str keys): the stdlib
        return json.dumps(event, default=_json_fallback)


def render_json(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> str:
    """The JSON renderer (orjson, in C), redacting on the rendered line: one substring
    search per line instead of a check per value; a line that mentions a private key is
    rendered again from scrubbed values, and scrubbed as text if anything is left (a
    key inside some object's ``repr``)."""
    line = _dumps(event)
    if _KEY_MARK in line:
        line = _dumps(redact_keys(_logger, _name, event))
        if _KEY_MARK in line:
            line = _KEY_PEM.sub(_REDACTED, line)
    return line


class _Lines:
    """The log lines of one output stream. ``later`` (an emitter's: one per connection or
    request) waits for the end of the event loop's iteration, and every line waiting
    then goes out in one write: a write to the container runtime's pipe wakes its
    reader, and a busy proxy finishes many connections per iteration. ``now`` (every
    other line) goes out at once, after the waiting ones: order is kept. Without a
    running loop, or with 64 KiB waiting, ``later`` is ``now``; at exit nothing waits."""

    LIMIT = 64 << 10

    def __init__(self, file: Any) -> None:
        self.file = file
        self._waiting: list[str] = []
        self._size = 0
        self._flushing_on: asyncio.AbstractEventLoop | None = None  # a flush is due there

    def later(self, line: str) -> None:
        self._waiting.append(line)
        self._size += len(line)
        if self._size >= self.LIMIT:
            self.flush()
        elif self._flushing_on is None or not self._flushing_on.is_running():
            # (a loop that stopped before its flush ran does not keep the lines)
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._flushing_on = loop
            loop.call_soon(self.flush)

    def now(self, line: str) -> None:
        self._waiting.append(line)
        self.flush()

    def flush(self) -> None:
        self._flushing_on = None
        if not self._waiting:
            return
        lines, self._waiting, self._size = self._waiting, [], 0
        try:
            self.file.write("\n".join(lines) + "\n")
            self.file.flush()
        except (OSError, ValueError):  # a closed or broken stream: lose the lines, not the caller
            pass


class _LineLogger:
    """structlog's ``PrintLogger`` (every level method writes the rendered line), through
    ``_Lines.now``."""

    def __init__(self, lines: _Lines) -> None:
        self._lines = lines

    def msg(self, message: str) -> None:
        self._lines.now(message)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = \
        failure = msg


class _LineLoggerFactory:
    def __init__(self, lines: _Lines) -> None:
        self._logger = _LineLogger(lines)

    def __call__(self, *args: Any) -> _LineLogger:
        return self._logger


@dataclass(frozen=True)
class _Setup:
    """What ``configure`` installed; ``emitter`` takes its fast path while structlog
    still runs exactly this (the same processors, wrapper and logger factory)."""

    key: tuple[Any, ...]  # see ``_config_key``
    json: bool
    stamper: UtcStamper
    lines: _Lines


def _config_key() -> tuple[Any, ...]:
    """structlog's set-up by content: its processors list can change in place
    (``structlog.testing.capture_logs`` does that)."""
    cfg = structlog.get_config()
    return (*cfg["processors"], cfg["wrapper_class"], cfg["logger_factory"])


_setup: _Setup | None = None
# The lowest level kept, as ``configure`` set it (structlog's level is set there and by
# ``reset`` only): a hot path compares with it before it builds a line that would be
# dropped, one attribute read.
level = logging.NOTSET


@atexit.register
def _flush_at_exit() -> None:
    """Nothing waits at exit: the current stream's lines out (one hook per process, not
    one per ``configure``)."""
    if _setup is not None:
        _setup.lines.flush()


def configure(cfg: LogConfig | None = None, *, stream: Any = None) -> None:
    """Configure structlog and the stdlib root logger once per process."""
    global _setup, level
    cfg = cfg or LogConfig()
    chosen = getattr(logging, cfg.level.upper(), None)
    if not isinstance(chosen, int):
        raise ValueError(f"LOG_LEVEL={cfg.level!r}: expected debug, info, warning or error")
    stamper = UtcStamper()
    tail: list[Any]
    if cfg.format == "json":
        tail = [render_json]
    elif cfg.format == "console":
        tail = [redact_keys, structlog.dev.ConsoleRenderer(colors=False)]
    else:
        raise ValueError(f"LOG_FORMAT={cfg.format!r}: expected console or json")
    out = stream or sys.stderr
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        stamper,
        structlog.processors.format_exc_info,
        *tail,
    ]
    wrapper_class = structlog.make_filtering_bound_logger(chosen)
    if _setup is not None:  # the old stream's lines out before the new one takes over
        _setup.lines.flush()
    lines = _Lines(out)
    logger_factory = _LineLoggerFactory(lines)
    structlog.configure(
        processors=processors,
        wrapper_class=wrapper_class,
        logger_factory=logger_factory,
        cache_logger_on_first_use=False,
    )
    _setup = _Setup(_config_key(), cfg.format == "json", stamper, lines)
    level = chosen
    logging.basicConfig(level=chosen, stream=out, format="%(levelname)s %(name)s: %(message)s")


def reset() -> None:
    """structlog's defaults back (tests); ``level`` too: structlog's default logger keeps
    every level."""
    global _setup, level
    if _setup is not None:
        _setup.lines.flush()
    _setup = None
    level = logging.NOTSET
    structlog.reset_defaults()


def get(name: str) -> Any:
    """A lazy structlog logger carrying ``component=name``.

    Lazy: it binds at each use, so a logger taken at import time follows a
    later :func:`configure` (format, level, stream).
    """
    return structlog.get_logger(component=name)


class Emitter:
    """Log lines of one component on a hot path: ``emitter("access").info(event, fields)``.

    Under ``configure``'s JSON set-up the line is built here: the event dict in
    structlog's order (``component``, the fields, ``event``, context variables,
    ``level``, ``timestamp``), rendered by the chain's own renderer and written by
    the chain's logger, about a quarter of the chain's cost. Under any other set-up
    (console, tests that capture logs) the event goes through structlog as usual.
    """

    def __init__(self, component: str) -> None:
        self.component = component
        self._for: tuple[Any, ...] = ()
        self._fast: _Setup | None = None
        self._logger: Any = None  # the structlog logger otherwise

    def info(self, event: str, fields: Mapping[str, Any]) -> None:
        self._emit(logging.INFO, "info", event, fields)

    def warning(self, event: str, fields: Mapping[str, Any]) -> None:
        self._emit(logging.WARNING, "warning", event, fields)

    def _resolve(self) -> None:
        key = _config_key()
        if key == self._for:
            return
        self._for = key
        setup = _setup
        if setup is not None and setup.json and setup.key == key:
            self._fast = setup
        else:
            self._fast = None
            self._logger = structlog.get_logger().bind(component=self.component)

    def _emit(self, at: int, name: str, event: str, fields: Mapping[str, Any]) -> None:
        self._resolve()
        setup = self._fast
        if setup is None or "exc_info" in fields:
            getattr(self._logger or structlog.get_logger().bind(component=self.component),
                    name)(event, **fields)
            return
        if at < level:
            return
        ev: dict[str, Any] = {"component": self.component, **fields, "event": event}
        structlog.contextvars.merge_contextvars(None, name, ev)
        ev["level"] = name
        ev["timestamp"] = setup.stamper.text()
        setup.lines.later(render_json(None, name, ev))


def emitter(component: str) -> Emitter:
    """An :class:`Emitter` for ``component`` (keep it: it resolves the set-up once)."""
    return Emitter(component)
