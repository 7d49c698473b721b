"""The :15020 metrics and :15021 readiness endpoints, served on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ztunnel_py.telemetry.connection import ConnectionResult, Peer
from ztunnel_py.telemetry.http import (
    AGENT_CONDITIONS,
    EndpointError,
    HttpEndpoint,
    Readiness,
    TelemetryServer,
)
from ztunnel_py.telemetry.metrics import CertificateExpiry, Metrics

SLEEP = "spiffe://cluster.local/ns/bar/sa/sleep"
HTTPBIN = "spiffe://cluster.local/ns/foo/sa/httpbin"


async def request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(5):
            data = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, body


async def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    return await request(port, f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


@pytest.fixture
async def stack() -> AsyncIterator[tuple[Metrics, Readiness, TelemetryServer]]:
    readiness = Readiness(*AGENT_CONDITIONS)
    with Metrics(config_version=lambda: "v3",
                 certificates=lambda: [CertificateExpiry(HTTPBIN, 4_000_000_000.0)]) as metrics:
        server = TelemetryServer(metrics.render, readiness, metrics_address="127.0.0.1:0",
                                 readiness_address="127.0.0.1:0")
        async with server:
            yield metrics, readiness, server


def connection(direction: str, sent: int, received: int) -> ConnectionResult:
    src = Peer("10.0.1.5:40000", "sleep", "bar", SLEEP, "sleep", "v1")
    dst = Peer("10.0.2.9:8000", "httpbin", "foo", HTTPBIN, "httpbin", "v1",
               "httpbin.foo.svc.cluster.local")
    rec = ConnectionResult(direction, src=src, dst=dst, security="mutual_tls")
    rec.open()
    rec.bytes_sent, rec.bytes_received = sent, received
    rec.close()
    return rec


async def test_n_connections_scraped_exactly(
    stack: tuple[Metrics, Readiness, TelemetryServer],
) -> None:
    _metrics, _, server = stack
    sizes = [(1, 10), (200, 2000), (3_000, 30_000), (40_000, 0), (0, 5)]
    for sent, received in sizes:
        connection("inbound", sent, received)
        connection("outbound", sent, received)
    status, headers, body = await get(server.metrics.port, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    n = len(sizes)
    for reporter in ("source", "destination"):
        def sample(family: str, reporter: str = reporter) -> float:
            (match,) = [s for s in families[family].samples
                        if s.labels["reporter"] == reporter]
            assert match.labels["source_principal"] == SLEEP
            assert match.labels["destination_principal"] == HTTPBIN
            assert match.labels["destination_service"] == "httpbin.foo.svc.cluster.local"
            assert match.labels["source_workload_namespace"] == "bar"
            assert match.labels["destination_workload"] == "httpbin"
            assert match.labels["connection_security_policy"] == "mutual_tls"
            assert match.labels["request_protocol"] == "tcp"
            return match.value

        assert sample("istio_tcp_connections_opened") == n
        assert sample("istio_tcp_connections_closed") == n
        assert sample("istio_tcp_received_bytes") == sum(s for s, _ in sizes)
        assert sample("istio_tcp_sent_bytes") == sum(r for _, r in sizes)
    assert families["ztunnel_config_version_info"].samples[0].labels["version"] == "v3"
    assert families["ztunnel_certificates"].samples[0].value == 1
    status, _, same = await get(server.metrics.port, "/stats/prometheus")
    assert status == 200 and b"istio_tcp_connections_opened_total" in same


async def test_readiness_lists_what_is_missing(
    stack: tuple[Metrics, Readiness, TelemetryServer],
) -> None:
    _, readiness, server = stack
    port = server.ready.port
    status, _, body = await get(port, "/healthz/ready")
    assert status == 503
    assert body == b"not ready: waiting for capture, certificates, config\n"
    readiness.set("config")
    readiness.set("certificates")
    status, _, body = await get(port, "/healthz/ready")
    assert (status, body) == (503, b"not ready: waiting for capture\n")
    readiness.set("capture")
    status, _, body = await get(port, "/healthz/ready")
    assert (status, body) == (200, b"ready\n")
    readiness.set("certificates", False)  # e.g. certificates expired
    status, _, _ = await get(port, "/healthz/ready")
    assert status == 503


async def test_no_conditions_is_not_ready() -> None:
    server = TelemetryServer(lambda: b"", Readiness(), metrics_address="127.0.0.1:0",
                             readiness_address="127.0.0.1:0")
    async with server:
        status, _, body = await get(server.ready.port, "/healthz/ready")
    assert status == 503 and b"no readiness condition" in body


def test_unregistered_condition_is_an_error() -> None:
    with pytest.raises(KeyError, match="never registered"):
        Readiness("config").set("capture")


async def test_bad_requests(stack: tuple[Metrics, Readiness, TelemetryServer]) -> None:
    _, _, server = stack
    port = server.metrics.port
    status, _, body = await get(port, "/nope")
    assert status == 404 and b"/metrics" in body
    status, headers, _ = await get(port, "/metrics", "POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, headers, body = await get(port, "/metrics", "HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    status, _, _ = await request(port, b"garbage\r\n\r\n")
    assert status == 400
    status, _, _ = await request(port, b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n\r\n")
    assert status == 400
    status, _, _ = await get(server.ready.port, "/metrics")
    assert status == 404  # each port serves its own routes


async def test_port_in_use_is_explained() -> None:
    first = HttpEndpoint({}, "metrics")
    await first.start("127.0.0.1", 0)
    try:
        second = HttpEndpoint({}, "metrics")
        with pytest.raises(EndpointError, match="port is taken"):
            await second.start("127.0.0.1", first.port)
    finally:
        await first.close()
