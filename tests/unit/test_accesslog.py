"""One access-log line per connection at close, JSON with LOG_FORMAT=json."""

from __future__ import annotations

import io
import json

from tests.unit.test_log import json_log, lines  # noqa: F401 (json_log: the "stream" fixture)
from ztunnel_py.telemetry.accesslog import AccessLog, access_fields, connection_json
from ztunnel_py.telemetry.connection import ConnectionResult, Peer

SLEEP = "spiffe://cluster.local/ns/bar/sa/sleep"
HTTPBIN = "spiffe://cluster.local/ns/foo/sa/httpbin"




def record() -> ConnectionResult:
    return ConnectionResult(
        direction="inbound",
        src=Peer("10.0.1.5:40000", "sleep", "bar", SLEEP),
        dst=Peer("10.0.2.9:8000", "httpbin", "foo", HTTPBIN,
                 service="httpbin.foo.svc.cluster.local"),
        security="mutual_tls",
        hbone_target="10.0.2.9:8000",
    )


def test_one_json_line_per_connection_at_close(stream: io.StringIO) -> None:
    with AccessLog():
        recs = [record() for _ in range(3)]
        for i, rec in enumerate(recs):
            rec.open()
            rec.bytes_sent, rec.bytes_received = 10 * (i + 1), 1000 * (i + 1)
        assert lines(stream) == []  # nothing while open
        for rec in recs:
            rec.close()
            rec.close()  # a second close is ignored: still one line
    out = lines(stream)
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


def test_failure_carries_the_reason(stream: io.StringIO) -> None:
    with AccessLog():
        rec = record()
        rec.close("denied: no ALLOW policy matched: foo/allow-bar", "DENY")
    (line,) = lines(stream)
    assert line["event"] == "connection failed"
    assert line["level"] == "warning"
    assert line["error"] == "denied: no ALLOW policy matched: foo/allow-bar"
    assert line["response_flags"] == "DENY"


def test_detached_log_is_silent(stream: io.StringIO) -> None:
    access = AccessLog()
    access.attach()
    access.detach()
    record().close()
    assert lines(stream) == []


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
