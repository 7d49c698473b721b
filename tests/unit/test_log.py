"""log.py: the JSON chain, redaction on the rendered line, and the hot-path emitter
writing the same lines as structlog's chain."""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from ztunnel_py import log
from ztunnel_py.config import LogConfig

PEM = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49\n-----END PRIVATE KEY-----\n"
FIELDS = {"src.addr": "10.0.0.1:4000", "bytes_sent": 10, "duration_ms": 1.5, "result": "ok"}


@pytest.fixture(name="stream")
def json_log() -> Iterator[io.StringIO]:
    """``log.configure``'s JSON set-up, writing to a string (test_accesslog uses it too)."""
    out = io.StringIO()
    log.configure(LogConfig(format="json", level="info"), stream=out)
    try:
        yield out
    finally:
        log.reset()


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


def test_emitter_writes_the_line_structlog_writes(stream: io.StringIO) -> None:
    structlog.get_logger().bind(component="access").info("connection complete", **FIELDS)
    log.emitter("access").info("connection complete", FIELDS)
    chain, fast = lines(stream)
    assert list(chain) == list(fast)  # same keys, same order
    assert list(fast)[:1] == ["component"] and list(fast)[-3:] == ["event", "level", "timestamp"]
    for key in chain:
        if key != "timestamp":
            assert chain[key] == fast[key], key
    assert fast["level"] == "info" and fast["component"] == "access"


def test_emitter_follows_level_and_context(stream: io.StringIO) -> None:
    log.configure(LogConfig(format="json", level="warning"), stream=stream)
    em = log.emitter("access")
    em.info("dropped", FIELDS)
    with structlog.contextvars.bound_contextvars(node="node1"):
        em.warning("kept", FIELDS)
    (line,) = lines(stream)
    assert line["event"] == "kept" and line["level"] == "warning" and line["node"] == "node1"


def test_emitter_goes_through_structlog_under_another_set_up(stream: io.StringIO) -> None:
    em = log.emitter("access")
    with structlog.testing.capture_logs() as captured:
        em.warning("connection failed", {"error": "upstream refused"})
    assert captured == [{"component": "access", "error": "upstream refused",
                         "event": "connection failed", "log_level": "warning"}]
    em.info("after", FIELDS)  # the JSON set-up is back: the fast path again
    assert lines(stream)[-1]["event"] == "after"


def test_console_set_up_still_works() -> None:
    out = io.StringIO()
    log.configure(LogConfig(format="console", level="info"), stream=out)
    try:
        log.emitter("access").info("connection complete", {"key": PEM})
    finally:
        log.reset()
    assert "connection complete" in out.getvalue()
    assert "PRIVATE KEY" not in out.getvalue().replace("[private key redacted]", "")


@pytest.mark.parametrize("via", ["chain", "emitter"])
def test_private_keys_never_reach_the_line(stream: io.StringIO, via: str) -> None:
    class Holder:
        def __repr__(self) -> str:
            return f"Holder({PEM!r})"

    fields = {"text": f"key: {PEM} end", "raw": PEM.encode(), "obj": Holder(), "n": 1}
    if via == "chain":
        structlog.get_logger().info("loaded", **fields)
    else:
        log.emitter("x").info("loaded", fields)
    text = stream.getvalue()
    assert "MIGHAgEAMBMGByqGSM49" not in text
    (line,) = lines(stream)
    assert line["text"] == "key: [private key redacted]\n end"
    assert line["raw"] == "[private key redacted]"
    assert line["n"] == 1


def test_json_values_orjson_refuses_still_render(stream: io.StringIO) -> None:
    structlog.get_logger().info("big", n=1 << 70, when=datetime.date(2026, 1, 2))
    (line,) = lines(stream)
    assert line["n"] == 1 << 70 and line["when"] == "datetime.date(2026, 1, 2)"


def test_stamper_text_is_timestampers() -> None:
    stamper = log.UtcStamper()
    for _ in range(3):
        before = datetime.datetime.now(tz=datetime.UTC)
        text = stamper.text()
        after = datetime.datetime.now(tz=datetime.UTC)
        assert text.endswith("Z")
        parsed = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        assert before - datetime.timedelta(microseconds=1) <= parsed <= after
        # the same shape as TimeStamper(fmt="iso", utc=True)
        assert len(text) == len(before.replace(microsecond=123456).isoformat()) - 5


def test_stamper_leaves_out_a_zero_fraction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log.time, "time", lambda: 1_767_322_800.0)
    stamper = log.UtcStamper()
    expected = datetime.datetime.fromtimestamp(1_767_322_800, tz=datetime.UTC).isoformat()
    assert stamper.text() == expected.replace("+00:00", "Z")
    monkeypatch.setattr(log.time, "time", lambda: 1_767_322_800.25)
    assert stamper.text() == expected.replace("+00:00", ".250000Z")


class _Writes(io.StringIO):
    """A stream that records each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_emitter_lines_of_one_loop_iteration_go_out_in_one_write() -> None:
    out = _Writes()
    log.configure(LogConfig(format="json", level="info"), stream=out)
    try:
        em = log.emitter("access")

        async def main() -> list[str]:
            em.info("first", FIELDS)
            em.info("second", FIELDS)
            seen = list(out.writes)  # nothing yet: the iteration is not over
            await asyncio.sleep(0)
            em.info("third", FIELDS)
            structlog.get_logger().warning("urgent")  # at once, after the waiting line
            return seen

        assert asyncio.run(main()) == []
        em.info("no loop", FIELDS)  # outside a loop: at once
    finally:
        log.reset()
    events = [[json.loads(line)["event"] for line in w.splitlines()] for w in out.writes]
    assert events == [["first", "second"], ["third", "urgent"], ["no loop"]]
    assert all(w.endswith("\n") for w in out.writes)


def test_a_full_buffer_goes_out_at_once() -> None:
    out = _Writes()
    log.configure(LogConfig(format="json", level="info"), stream=out)
    try:
        em = log.emitter("access")

        async def main() -> int:
            big = {"payload": "x" * 1000}
            for _ in range(80):  # ~80 KiB: over the 64 KiB limit once
                em.info("big", big)
            return len(out.writes)

        assert asyncio.run(main()) == 1
    finally:
        log.reset()
    assert len(out.writes) == 2  # the rest at the end of the iteration
    assert sum(w.count("\n") for w in out.writes) == 80


def test_a_loop_that_stops_before_its_flush_does_not_keep_the_lines() -> None:
    out = _Writes()
    log.configure(LogConfig(format="json", level="info"), stream=out)
    em = log.emitter("access")
    first = asyncio.new_event_loop()
    try:

        def emit_and_stop() -> None:
            em.info("first", FIELDS)  # its flush is due on ``first``...
            first.stop()  # ...which stops before running it

        first.call_soon(emit_and_stop)
        first.run_forever()

        async def main() -> None:
            em.info("second", FIELDS)  # another loop: the flush is due here now
            await asyncio.sleep(0)

        asyncio.run(main())
        events = [json.loads(line)["event"] for w in out.writes for line in w.splitlines()]
        assert events == ["first", "second"]
    finally:
        first.close()
        log.reset()


def test_level_follows_the_configured_level_until_reset() -> None:
    out = io.StringIO()
    log.configure(LogConfig(format="json", level="warning"), stream=out)
    try:
        assert log.level == logging.WARNING
        log.configure(LogConfig(format="json", level="debug"), stream=out)
        assert log.level == logging.DEBUG
    finally:
        log.reset()
    assert log.level == logging.NOTSET  # structlog's defaults keep every level
