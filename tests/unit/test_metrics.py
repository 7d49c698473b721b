"""Istio's TCP metrics and the agent's health gauges, fed by ConnectionResult sinks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from ztunnel_py.telemetry.connection import ConnectionResult, Peer
from ztunnel_py.telemetry.metrics import TCP_LABELS, CertificateExpiry, Metrics, tcp_labels

SLEEP = "spiffe://cluster.local/ns/bar/sa/sleep"
HTTPBIN = "spiffe://cluster.local/ns/foo/sa/httpbin"


def record(direction: str = "inbound", sent: int = 0, received: int = 0) -> ConnectionResult:
    rec = ConnectionResult(
        direction=direction,
        src=Peer("10.0.1.5:40000", "sleep", "bar", SLEEP, "sleep", "v1"),
        dst=Peer("10.0.2.9:8000", "httpbin", "foo", HTTPBIN, "httpbin", "v2",
                 "httpbin.foo.svc.cluster.local"),
        security="mutual_tls",
    )
    rec.bytes_sent = sent
    rec.bytes_received = received
    return rec


def labels(reporter: str = "destination", **over: str) -> dict[str, str]:
    base = {
        "reporter": reporter,
        "source_workload": "sleep",
        "source_workload_namespace": "bar",
        "source_principal": SLEEP,
        "source_app": "sleep",
        "source_version": "v1",
        "source_canonical_service": "sleep",
        "source_canonical_revision": "v1",
        "source_cluster": "Kubernetes",
        "destination_workload": "httpbin",
        "destination_workload_namespace": "foo",
        "destination_principal": HTTPBIN,
        "destination_app": "httpbin",
        "destination_version": "v2",
        "destination_service": "httpbin.foo.svc.cluster.local",
        "destination_service_name": "httpbin",
        "destination_service_namespace": "foo",
        "destination_canonical_service": "httpbin",
        "destination_canonical_revision": "v2",
        "destination_cluster": "Kubernetes",
        "request_protocol": "tcp",
        "response_flags": "-",
        "connection_security_policy": "mutual_tls",
    }
    base.update(over)
    return base


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    with Metrics() as m:
        yield m


def value(m: Metrics, name: str, lbls: dict[str, str]) -> float | None:
    return m.registry.get_sample_value(name, lbls)


def test_label_names_are_istios() -> None:
    assert set(TCP_LABELS) >= {
        "reporter", "source_workload", "source_workload_namespace", "source_principal",
        "source_app", "source_version", "destination_workload",
        "destination_workload_namespace", "destination_service", "destination_principal",
        "destination_app", "destination_version", "request_protocol", "response_flags",
        "connection_security_policy",
    }
    assert dict(zip(TCP_LABELS, tcp_labels(record()), strict=True)) == labels()


def test_n_connections_exact_counts_and_bytes(metrics: Metrics) -> None:
    n = 7
    for i in range(n):
        rec = record(sent=100 + i, received=1000 + i)
        rec.open()
        rec.close()
    expected_request_bytes = sum(100 + i for i in range(n))
    expected_response_bytes = sum(1000 + i for i in range(n))
    lb = labels()
    assert value(metrics, "istio_tcp_connections_opened_total", lb) == n
    assert value(metrics, "istio_tcp_connections_closed_total", lb) == n
    # Istio: received = bytes during request (source -> destination); sent = during response.
    assert value(metrics, "istio_tcp_received_bytes_total", lb) == expected_request_bytes
    assert value(metrics, "istio_tcp_sent_bytes_total", lb) == expected_response_bytes


def test_reporter_follows_direction(metrics: Metrics) -> None:
    out = record("outbound", sent=5)
    out.open()
    out.close()
    assert value(metrics, "istio_tcp_connections_closed_total", labels("source")) == 1
    assert value(metrics, "istio_tcp_connections_closed_total", labels("destination")) is None


def test_open_counted_at_open_and_active_gauge(metrics: Metrics) -> None:
    rec = record()
    rec.open()
    assert value(metrics, "istio_tcp_connections_opened_total", labels()) == 1
    assert value(metrics, "istio_tcp_connections_closed_total", labels()) == 0
    assert value(metrics, "ztunnel_connections_active", {"direction": "inbound"}) == 1
    assert metrics.connections.snapshot() == [rec]
    rec.close()
    assert value(metrics, "ztunnel_connections_active", {"direction": "inbound"}) == 0
    assert metrics.connections.snapshot() == []


def test_closed_without_open_counts_as_opened(metrics: Metrics) -> None:
    rec = record()
    rec.close("denied: foo/allow-nothing", "DENY")
    lb = labels(response_flags="DENY")
    assert value(metrics, "istio_tcp_connections_opened_total", lb) == 1
    assert value(metrics, "istio_tcp_connections_closed_total", lb) == 1


def test_unknown_values_and_plaintext() -> None:
    with Metrics() as m:
        rec = ConnectionResult("inbound", src=Peer("192.168.9.9:5555"), dst=Peer("10.0.2.9:80"))
        rec.open()
        rec.close()
        sample = value(m, "istio_tcp_connections_closed_total", {
            **dict.fromkeys(TCP_LABELS, "unknown"),
            "reporter": "destination", "source_cluster": "Kubernetes",
            "destination_cluster": "Kubernetes", "request_protocol": "tcp",
            "response_flags": "-", "connection_security_policy": "none",
        })
        assert sample == 1


def test_text_format_parses_and_has_no_created_series(metrics: Metrics) -> None:
    rec = record(sent=3, received=4)
    rec.open()
    rec.close()
    text = metrics.render().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("istio_tcp_connections_opened", "istio_tcp_connections_closed",
                 "istio_tcp_sent_bytes", "istio_tcp_received_bytes"):
        assert families[name].type == "counter"
        samples = families[name].samples
        assert [s.name for s in samples] == [name + "_total"]
    assert "_created" not in text


def test_dedicated_registry_not_global(metrics: Metrics) -> None:
    rec = record()
    rec.open()
    rec.close()
    assert metrics.registry is not REGISTRY
    assert REGISTRY.get_sample_value("istio_tcp_connections_opened_total", labels()) is None


def test_detach_stops_counting() -> None:
    m = Metrics()
    m.attach()
    m.detach()
    rec = record()
    rec.open()
    rec.close()
    assert value(m, "istio_tcp_connections_opened_total", labels()) is None


def test_health_gauges() -> None:
    certs = [CertificateExpiry(SLEEP, 2_000_000_000.0), CertificateExpiry(HTTPBIN, 2_000_003_600.0)]
    counters = {
        "reasons": {"out_captured": 42, "drop_no_listener": 3},
        "pods": {"10.0.1.5": {"uid": "bar/sleep-1", "out_captured": 40, "in_hbone": 2}},
    }
    m = Metrics(certificates=lambda: certs, config_version=lambda: "v17",
                capture_counters=lambda: counters)
    assert value(m, "ztunnel_certificates", {}) == 2
    assert value(m, "ztunnel_certificate_expiry_timestamp_seconds",
                 {"identity": HTTPBIN}) == 2_000_003_600.0
    assert value(m, "ztunnel_config_version_info", {"version": "v17"}) == 1
    assert value(m, "ztunnel_capture_packets_total", {"reason": "drop_no_listener"}) == 3
    assert value(m, "ztunnel_capture_pod_packets_total",
                 {"pod_ip": "10.0.1.5", "uid": "bar/sleep-1", "counter": "in_hbone"}) == 2
    counters["reasons"]["drop_no_listener"] = 5  # read at scrape time
    assert value(m, "ztunnel_capture_packets_total", {"reason": "drop_no_listener"}) == 5
    flat = Metrics(capture_counters=lambda: {"drop_assign": 7})
    assert value(flat, "ztunnel_capture_packets_total", {"reason": "drop_assign"}) == 7
    list(text_string_to_metric_families(m.render().decode()))


def test_failing_health_source_does_not_break_the_scrape() -> None:
    def broken() -> str:
        raise RuntimeError("bpf map gone")

    m = Metrics(config_version=broken, certificates=lambda: [CertificateExpiry(SLEEP, 1.0)])
    text = m.render().decode()
    assert "ztunnel_config_version_info" not in text
    assert value(m, "ztunnel_certificates", {}) == 1


def test_labels_made_at_open_serve_the_close_unless_the_flags_changed(
    metrics: Metrics,
) -> None:
    kept, revoked = record(sent=5), record(sent=7)
    kept.open()
    revoked.open()
    kept.close()
    revoked.revoke("foo/deny-all")
    revoked.close()
    plain, deny = labels(), labels(response_flags="DENY")
    assert value(metrics, "istio_tcp_connections_opened_total", plain) == 2
    assert value(metrics, "istio_tcp_connections_closed_total", plain) == 1
    assert value(metrics, "istio_tcp_received_bytes_total", plain) == 5
    # the revoked connection closes on its own series (as before: labels at close)
    assert value(metrics, "istio_tcp_connections_closed_total", deny) == 1
    assert value(metrics, "istio_tcp_received_bytes_total", deny) == 7
    assert not metrics.tcp._live  # nothing kept for closed connections
