"""One access-log line per connection at close, JSON with LOG_FORMAT=json."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
import structlog

from ztunnel_py import log
from ztunnel_py.config import LogConfig
from ztunnel_py.telemetry.accesslog import AccessLog, access_fields, connection_json
from ztunnel_py.telemetry.connection import ConnectionResult, Peer

SLEEP = "spiffe://cluster.local/ns/bar/sa/sleep"
HTTPBIN = "spiffe://cluster.local/ns/foo/sa/httpbin"


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    log.configure(LogConfig(format="json", level="info"), stream=stream)
    try:
        yield stream
    finally:
        structlog.reset_defaults()


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def record() -> ConnectionResult:
    return ConnectionResult(
        direction="inbound",
        src=Peer("10.0.1.5:40000", "sleep", "bar", SLEEP),
        dst=Peer("10.0.2.9:8000", "httpbin", "foo", HTTPBIN,
                 service="httpbin.foo.svc.cluster.local"),
        security="mutual_tls",
        hbone_target="10.0.2.9:8000",
    )


def test_one_json_line_per_connection_at_close(json_log: io.StringIO) -> None:
    with AccessLog():
        recs = [record() for _ in range(3)]
        for i, rec in enumerate(recs):
            rec.open()
            rec.bytes_sent, rec.bytes_received = 10 * (i + 1), 1000 * (i + 1)
        assert lines(json_log) == []  # nothing while open
        for rec in recs:
            rec.close()
            rec.close()  # a second close is ignored: still one line
    out = lines(json_log)
    assert len(out) == 3
    first = out[0]
    assert first["event"] == "connection complete"
    assert first["level"] == "info"
    assert first["component"] == "access"
    assert first["src.addr"] == "10.0.1.5:40000"
    assert first["src.workload"] == "sleep"
    assert first["src.namespace"] == "bar"
    assert first["src.identity"] == SLEEP
    assert first["dst.addr"] == "10.0.2.9:8000"
    assert first["dst.hbone_addr"] == "10.0.2.9:8000"
    assert first["dst.service"] == "httpbin.foo.svc.cluster.local"
    assert first["dst.workload"] == "httpbin"
    assert first["dst.namespace"] == "foo"
    assert first["dst.identity"] == HTTPBIN
    assert first["direction"] == "inbound"
    assert (first["bytes_sent"], first["bytes_recv"]) == (10, 1000)
    assert isinstance(first["duration_ms"], float) and first["duration_ms"] >= 0
    assert first["result"] == "ok"
    assert "error" not in first
    assert [o["bytes_recv"] for o in out] == [1000, 2000, 3000]


def test_failure_carries_the_reason(json_log: io.StringIO) -> None:
    with AccessLog():
        rec = record()
        rec.close("denied: no ALLOW policy matched: foo/allow-bar", "DENY")
    (line,) = lines(json_log)
    assert line["event"] == "connection failed"
    assert line["level"] == "warning"
    assert line["error"] == "denied: no ALLOW policy matched: foo/allow-bar"
    assert line["response_flags"] == "DENY"


def test_detached_log_is_silent(json_log: io.StringIO) -> None:
    access = AccessLog()
    access.attach()
    access.detach()
    record().close()
    assert lines(json_log) == []


def test_unknown_fields_are_left_out() -> None:
    fields = access_fields(ConnectionResult("outbound", src=Peer("10.0.0.1:1")))
    assert "src.identity" not in fields and "dst.service" not in fields
    assert fields["result"] == "open"


def test_connection_json_is_valid_json() -> None:
    rec = record()
    rec.open()
    data = json.loads(json.dumps(connection_json(rec)))
    assert data["src"]["principal"] == SLEEP
    assert data["direction"] == "inbound"
    assert data["closed"] is False
    assert data["duration_s"] >= 0
