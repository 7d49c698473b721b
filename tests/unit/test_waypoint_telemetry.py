"""Request telemetry: Istio labels, histograms in the exposition, W3C traceparent."""

from __future__ import annotations

import os
import random

import pytest
from prometheus_client.parser import text_string_to_metric_families

from waypoint import telemetry
from waypoint.request import Peer
from waypoint.telemetry import (
    HTTP_LABELS,
    RandomIds,
    RequestRecord,
    WaypointMetrics,
    labels_of,
    next_traceparent,
    request_id,
)
from ztunnel_py.state.model import FrozenMap, Workload


def _w(name: str, ns: str, sa: str, **labels: str) -> Workload:
    return Workload(uid=f"{ns}/{name}", name=name, namespace=ns, service_account=sa, node="n",
                    ips=("10.0.0.1",), labels=FrozenMap(labels))


def _rec(**kw: object) -> RequestRecord:
    base: dict[str, object] = dict(
        source=Peer("10.0.0.1", "spiffe://cluster.local/ns/front/sa/pp",
                    _w("productpage-v1", "front", "pp", app="productpage", version="v1")),
        destination=_w("reviews-v2", "bookinfo", "reviews", app="reviews", version="v2"),
        destination_service="reviews.bookinfo.svc.cluster.local",
        status=200, flags="-", duration_ms=12.0, request_bytes=10, response_bytes=2000)
    base.update(kw)
    return RequestRecord(**base)  # type: ignore[arg-type]


def test_labels_follow_istio() -> None:
    got = dict(zip(HTTP_LABELS, labels_of(_rec()), strict=True))
    assert got["reporter"] == "waypoint"
    assert got["source_workload"] == "productpage-v1"
    assert got["source_workload_namespace"] == "front"
    assert got["source_principal"] == "spiffe://cluster.local/ns/front/sa/pp"
    assert (got["source_app"], got["source_version"]) == ("productpage", "v1")
    assert got["destination_workload"] == "reviews-v2"
    assert got["destination_principal"] == "spiffe://cluster.local/ns/bookinfo/sa/reviews"
    assert got["destination_service"] == "reviews.bookinfo.svc.cluster.local"
    assert (got["destination_service_name"], got["destination_service_namespace"]) == \
        ("reviews", "bookinfo")
    assert (got["destination_canonical_service"], got["destination_canonical_revision"]) == \
        ("reviews", "v2")
    assert got["request_protocol"] == "http"
    assert (got["response_code"], got["response_flags"], got["grpc_response_status"]) == \
        ("200", "-", "-")


def test_unknowns_are_reported_as_unknown() -> None:
    got = dict(zip(HTTP_LABELS, labels_of(RequestRecord(status=503, flags="UH")), strict=True))
    assert got["source_workload"] == "unknown"
    assert got["destination_service"] == "unknown"
    assert got["response_flags"] == "UH"


def test_exposition_has_counter_and_histograms() -> None:
    m = WaypointMetrics()
    m.record(_rec())
    m.record(_rec(duration_ms=700.0))
    m.record(_rec(status=500, flags="FI"))
    fams = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    assert set(fams) >= {"istio_requests", "istio_request_duration_milliseconds",
                         "istio_request_bytes", "istio_response_bytes"}
    total = {s.labels["response_code"]: s.value for s in fams["istio_requests"].samples
             if s.name == "istio_requests_total"}
    assert total == {"200": 2.0, "500": 1.0}
    buckets = {s.labels["le"]: s.value
               for s in fams["istio_request_duration_milliseconds"].samples
               if s.name.endswith("_bucket") and s.labels["response_code"] == "200"}
    assert buckets["25.0"] == 1 and buckets["1000.0"] == 2 and buckets["+Inf"] == 2
    assert not any(s.name.endswith("_created") for f in fams.values() for s in f.samples)
    assert m.count(response_flags="FI") == 1


def test_traceparent_keeps_the_trace_and_makes_a_new_span() -> None:
    rng = random.Random(1)
    incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    out = next_traceparent(incoming, RandomIds(rng.randbytes).next())
    version, trace, span, flags = out.split("-")
    assert (version, trace, flags) == ("00", "4bf92f3577b34da6a3ce929d0e0e4736", "01")
    assert span != "00f067aa0ba902b7" and len(span) == 16
    ids = RandomIds(rng.randbytes).next()
    assert next_traceparent(incoming, ids).split("-")[2] != span  # a new span every hop


@pytest.mark.parametrize("bad", [None, "", "garbage", "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
                                 "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"])
def test_traceparent_starts_a_trace_when_the_caller_sent_none_or_a_bad_one(
        bad: str | None) -> None:
    out = next_traceparent(bad, RandomIds(random.Random(2).randbytes).next())
    version, trace, _span, flags = out.split("-")
    assert version == "00" and len(trace) == 32 and trace != "0" * 32 and flags == "01"


def test_remembered_labels_are_those_of_the_record() -> None:
    m = WaypointMetrics()
    first = _rec()
    m.record(first)
    m.record(_rec(source=first.source, destination=first.destination, duration_ms=1.0))
    (key, series), = m.http.series.items()
    assert key == labels_of(first) and series.count == 2 and series.duration.sum == 13.0
    # Same names, different workload objects (a new snapshot): labels built again, and
    # every field of the record that is a label makes its own series.
    other = _rec(destination=_w("reviews-v3", "bookinfo", "reviews", app="reviews",
                                version="v3"))
    for rec in (other, _rec(status=503, flags="UF"), _rec(grpc_status="14"),
                _rec(source=Peer("10.0.0.2", "spiffe://cluster.local/ns/x/sa/y")),
                _rec(destination_service="ratings.bookinfo.svc.cluster.local"),
                _rec(protocol="grpc"), _rec(security="none")):
        m.record(rec)
        assert m.http.series[labels_of(rec)].count == 1
    assert len(m.http.series) == 8
    assert m.count(destination_workload="reviews-v2") == 8 and \
        m.count(destination_workload="reviews-v3") == 1


def test_label_cache_is_bounded() -> None:

    m = WaypointMetrics()
    for i in range(telemetry.LABEL_CACHE_SIZE + 10):
        m.record(_rec(source=Peer(f"10.0.{i // 250}.{i % 250}", f"spiffe://td/ns/n/sa/{i}")))
    assert len(m.http._labels) <= telemetry.LABEL_CACHE_SIZE
    assert sum(s.count for s in m.http.series.values()) == telemetry.LABEL_CACHE_SIZE + 10


def _json_lines(out: object) -> list[dict[str, object]]:
    import io
    import json

    assert isinstance(out, io.StringIO)
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


@pytest.mark.parametrize("level", ["info", "warning"])
def test_access_log_line_per_request_under_json(level: str) -> None:
    import io

    import structlog

    from waypoint.telemetry import access_log
    from ztunnel_py import log
    from ztunnel_py.config import LogConfig

    out = io.StringIO()
    log.configure(LogConfig(format="json", level=level), stream=out)
    try:
        rec = _rec(method="GET", path="/r", authority="reviews:9080", route="canary",
                   upstream="10.1.0.2:8080", attempts=1, traceparent="00-" + "a" * 32 + "-"
                   + "b" * 16 + "-01", mirrored_to=("reviews-v3",))
        access_log(rec)
        structlog.get_logger().bind(component="waypoint.access").info(
            "request complete", **{"src.addr": "10.0.0.1"})  # the chain's own line, to compare
    finally:
        log.reset()
    lines = _json_lines(out)
    if level == "warning":
        assert lines == []  # not built, not written
        return
    line, chain = lines
    assert list(line)[:1] == ["component"] and list(line)[-3:] == ["event", "level", "timestamp"]
    assert line["component"] == chain["component"] == "waypoint.access"
    assert line["event"] == "request complete" and line["level"] == "info"
    assert line["src.addr"] == "10.0.0.1" and line["dst.workload"] == "reviews-v2"
    assert line["response_code"] == 200 and line["route"] == "canary"
    assert line["mirrored_to"] == "reviews-v3" and line["bytes_sent"] == 2000
    assert "grpc_status" not in line  # empty fields are left out


def test_access_log_goes_through_structlog_when_logs_are_captured() -> None:
    import structlog

    from waypoint.telemetry import access_log

    with structlog.testing.capture_logs() as captured:
        access_log(_rec(method="DELETE", path="/admin"))
    assert [(c["component"], c["event"], c["method"], c["path"]) for c in captured] == [
        ("waypoint.access", "request complete", "DELETE", "/admin")]


def test_one_draw_gives_span_trace_and_request_id_from_separate_digits() -> None:
    import uuid

    ids = RandomIds(random.Random(3).randbytes).next()
    assert len(ids) == 80 and int(ids, 16) >= 0
    _version, trace, span, _flags = next_traceparent(None, ids).split("-")
    rid = request_id(ids)
    assert (span, trace) == (ids[:16], ids[16:48])
    assert str(uuid.UUID(rid)) == rid and rid.replace("-", "") == ids[48:]
    assert RandomIds(random.Random(4).randbytes).next() != ids


def test_ids_drawn_in_batches_are_fresh_for_every_request() -> None:
    draws: list[int] = []

    def draw(n: int) -> bytes:
        draws.append(n)
        return os.urandom(n)

    source = RandomIds(draw)
    seen = [source.next() for _ in range(3 * telemetry.IDS_PER_DRAW + 1)]
    assert draws == [40 * telemetry.IDS_PER_DRAW] * 4  # a draw per IDS_PER_DRAW requests
    assert all(len(ids) == 80 and int(ids, 16) >= 0 for ids in seen)
    assert len(set(seen)) == len(seen)
    seeded = random.Random(5)
    assert RandomIds(seeded.randbytes).next() == random.Random(5).randbytes(640).hex()[:80]
