"""Prometheus metrics with Istio's names and labels, and the agent's own health.

Connection metrics are fed once per connection from ``ConnectionResult``
sinks (STYLE.md §10) and keep Istio's standard TCP metrics so that existing
Grafana and Kiali dashboards work unchanged:

=====================================  =========================================
``istio_tcp_connections_opened_total``  connections opened
``istio_tcp_connections_closed_total``  connections closed
``istio_tcp_received_bytes_total``      bytes received *during request*: from the
                                        source towards the destination
``istio_tcp_sent_bytes_total``          bytes sent *during response*: from the
                                        destination back to the source
=====================================  =========================================

(Istio's definitions, istio.io "Istio Standard Metrics".) ``reporter`` is
``source`` for outbound connections and ``destination`` for inbound ones, as in
Istio's ztunnel. As in ztunnel, a connection that is closed without ever having
been opened (refused by policy, upstream unreachable) is counted as opened too,
so that ``opened - closed`` is the number of live connections.

The counters are exported by a custom collector rather than ``Counter``
objects: that keeps the series Istio exports (``<name>_total``) without the
``<name>_created`` series prometheus-client would add, and keeps everything in
this object's own ``CollectorRegistry`` (never the global one).

Agent health (gauges read at scrape time from callables the agent wires in):

* ``ztunnel_certificates`` and ``ztunnel_certificate_expiry_timestamp_seconds{identity}``
* ``ztunnel_config_version_info{version}`` (always 1)
* ``ztunnel_capture_packets_total{reason}`` and
  ``ztunnel_capture_pod_packets_total{pod_ip,uid,counter}`` (the BPF counters of
  ``Capture.counters()``: captured, passed, drop_no_listener...)
* ``ztunnel_connections_active{direction}``
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import structlog
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ztunnel_py.telemetry.connection import ConnectionResult, Peer, add_sink, remove_sink

UNKNOWN = "unknown"
DEFAULT_CLUSTER = "Kubernetes"  # Istio's default cluster id

TCP_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)

_OPENED, _CLOSED, _RECEIVED, _SENT = range(4)
_TCP_FAMILIES = (
    ("istio_tcp_connections_opened", "Total TCP connections opened", _OPENED),
    ("istio_tcp_connections_closed", "Total TCP connections closed", _CLOSED),
    ("istio_tcp_received_bytes", "Bytes received during request (source to destination)",
     _RECEIVED),
    ("istio_tcp_sent_bytes", "Bytes sent during response (destination to source)", _SENT),
)


def _service_name_namespace(hostname: str) -> tuple[str, str]:
    """``httpbin.foo.svc.cluster.local`` -> (httpbin, foo)."""
    parts = hostname.split(".")
    if len(parts) >= 2:
        return parts[0], parts[1]
    return (hostname or UNKNOWN), UNKNOWN


def tcp_labels(rec: ConnectionResult, cluster: str = DEFAULT_CLUSTER) -> tuple[str, ...]:
    """Istio's label values for ``rec``, in ``TCP_LABELS`` order; an empty value is
    ``unknown``."""
    src: Peer = rec.src
    dst: Peer = rec.dst
    svc_name, svc_ns = _service_name_namespace(dst.service) if dst.service else (UNKNOWN, UNKNOWN)
    src_app, src_version = src.app or UNKNOWN, src.version or UNKNOWN
    dst_app, dst_version = dst.app or UNKNOWN, dst.version or UNKNOWN
    return (
        "source" if rec.direction == "outbound" else "destination",
        src.workload or UNKNOWN,
        src.namespace or UNKNOWN,
        src.principal or UNKNOWN,
        src_app,
        src_version,
        src_app,
        src_version,
        cluster,
        dst.workload or UNKNOWN,
        dst.namespace or UNKNOWN,
        dst.principal or UNKNOWN,
        dst_app,
        dst_version,
        dst.service or UNKNOWN,
        svc_name,
        svc_ns,
        dst_app,
        dst_version,
        cluster,
        rec.protocol or UNKNOWN,
        rec.response_flags or "-",
        rec.security or UNKNOWN,
    )


class TcpCollector(Collector):
    """Istio's four TCP counters, one value per label set."""

    def __init__(self, cluster: str = DEFAULT_CLUSTER) -> None:
        self.cluster = cluster
        self._values: dict[tuple[str, ...], list[int]] = {}
        # open connections: their row and the response flags it was labelled with (the
        # labels are computed once per connection, unless a revocation changes the flags)
        self._live: dict[int, tuple[list[int], str]] = {}

    def _row(self, rec: ConnectionResult) -> list[int]:
        key = tcp_labels(rec, self.cluster)
        row = self._values.get(key)
        if row is None:
            row = self._values[key] = [0, 0, 0, 0]
        return row

    def opened(self, rec: ConnectionResult) -> None:
        row = self._row(rec)
        row[_OPENED] += 1
        self._live[id(rec)] = (row, rec.response_flags)

    def closed(self, rec: ConnectionResult, *, count_open: bool) -> None:
        live = self._live.pop(id(rec), None)
        row = live[0] if live is not None and live[1] == rec.response_flags else self._row(rec)
        if count_open:
            row[_OPENED] += 1
        row[_CLOSED] += 1
        row[_RECEIVED] += rec.bytes_sent  # towards the destination = received during request
        row[_SENT] += rec.bytes_received  # back from the destination = sent during response

    def collect(self) -> Iterator[Metric]:
        for name, doc, idx in _TCP_FAMILIES:
            family = CounterMetricFamily(name, doc, labels=TCP_LABELS)
            for key, row in self._values.items():
                family.add_metric(key, row[idx])
            yield family

    def describe(self) -> Iterator[Metric]:
        for name, doc, _ in _TCP_FAMILIES:
            yield CounterMetricFamily(name, doc, labels=TCP_LABELS)


class ConnectionTracker:
    """The connections open right now (for the active gauge and the admin /connections)."""

    def __init__(self) -> None:
        self._open: dict[int, ConnectionResult] = {}

    def opened(self, rec: ConnectionResult) -> None:
        self._open[id(rec)] = rec

    def closed(self, rec: ConnectionResult) -> None:
        self._open.pop(id(rec), None)

    def __len__(self) -> int:
        return len(self._open)

    def snapshot(self) -> list[ConnectionResult]:
        return list(self._open.values())

    def count_by_direction(self) -> dict[str, int]:
        out: dict[str, int] = {"inbound": 0, "outbound": 0}
        for rec in self._open.values():
            out[rec.direction] = out.get(rec.direction, 0) + 1
        return out


class CertificateExpiry(NamedTuple):
    identity: str  # SPIFFE id
    not_after: float  # Unix time


CertificateSource = Callable[[], Iterable[CertificateExpiry]]
VersionSource = Callable[[], str]
# Capture.counters(): {"reasons": {reason: packets}, "pods": {ip: {"uid", counters...}}}
CounterSource = Callable[[], Mapping[str, Any]]


class HealthCollector(Collector):
    """The agent's own gauges, read from callables at scrape time.

    A failing callable never breaks a scrape: its metrics are left out and the
    failure is logged.
    """

    def __init__(self, connections: ConnectionTracker) -> None:
        self.connections = connections
        self.certificates: CertificateSource | None = None
        self.config_version: VersionSource | None = None
        self.capture_counters: CounterSource | None = None
        self._log = structlog.get_logger().bind(component="metrics")

    def _read(self, what: str, fn: Callable[[], object]) -> object | None:
        try:
            return fn()
        except Exception as exc:  # a scrape must not fail because one source did
            self._log.warning("metrics source failed", source=what, error=repr(exc))
            return None

    def collect(self) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "ztunnel_connections_active", "Proxied connections open now", labels=("direction",)
        )
        for direction, n in sorted(self.connections.count_by_direction().items()):
            active.add_metric((direction,), n)
        yield active
        cert_source = self.certificates
        if cert_source is not None:
            certs = self._read("certificates", lambda: list(cert_source()))
            if isinstance(certs, list):
                yield GaugeMetricFamily(
                    "ztunnel_certificates", "Workload certificates held", value=len(certs)
                )
                expiry = GaugeMetricFamily(
                    "ztunnel_certificate_expiry_timestamp_seconds",
                    "Unix time at which a held certificate expires",
                    labels=("identity",),
                )
                for cert in certs:
                    expiry.add_metric((cert.identity,), cert.not_after)
                yield expiry
        if self.config_version is not None:
            version = self._read("config_version", self.config_version)
            if isinstance(version, str):
                info = GaugeMetricFamily(
                    "ztunnel_config_version_info",
                    "Version of the configuration snapshot in use (always 1)",
                    labels=("version",),
                )
                info.add_metric((version or UNKNOWN,), 1)
                yield info
        if self.capture_counters is not None:
            counters = self._read("capture_counters", self.capture_counters)
            if isinstance(counters, Mapping):
                yield from _capture_families(counters)


def _capture_families(counters: Mapping[str, Any]) -> Iterator[Metric]:
    """The BPF counters: ``Capture.counters()`` ({"reasons": {...}, "pods": {ip: {...}}})
    or a flat {reason: packets}."""
    reasons = counters.get("reasons") if "reasons" in counters else counters
    family = CounterMetricFamily(
        "ztunnel_capture_packets",
        "Packets seen by the eBPF capture programs, by verdict (captured, passed, drop_*)",
        labels=("reason",),
    )
    if isinstance(reasons, Mapping):
        for reason, n in sorted(reasons.items()):
            if isinstance(n, int):
                family.add_metric((str(reason),), n)
    yield family
    pods = counters.get("pods")
    if isinstance(pods, Mapping):
        per_pod = CounterMetricFamily(
            "ztunnel_capture_pod_packets",
            "Packets the eBPF programs handled for each enrolled pod",
            labels=("pod_ip", "uid", "counter"),
        )
        for ip, stats in sorted(pods.items()):
            if not isinstance(stats, Mapping):
                continue
            uid = str(stats.get("uid", "")) or UNKNOWN
            for name, n in sorted(stats.items()):
                if name != "uid" and isinstance(n, int):
                    per_pod.add_metric((str(ip), uid, str(name)), n)
        yield per_pod


class Metrics:
    """One registry with Istio's TCP metrics and the agent's health; a ConnectionResult sink."""

    def __init__(
        self,
        *,
        cluster: str = DEFAULT_CLUSTER,
        certificates: CertificateSource | None = None,
        config_version: VersionSource | None = None,
        capture_counters: CounterSource | None = None,
        process: bool = False,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.tcp = TcpCollector(cluster)
        self.connections = ConnectionTracker()
        self.health = HealthCollector(self.connections)
        self.health.certificates = certificates
        self.health.config_version = config_version
        self.health.capture_counters = capture_counters
        self.registry.register(self.tcp)
        self.registry.register(self.health)
        if process:
            ProcessCollector(namespace="ztunnel", registry=self.registry)
        self._attached = False

    # -- ConnectionResult sinks -------------------------------------------------------

    def on_open(self, rec: ConnectionResult) -> None:
        self.tcp.opened(rec)
        self.connections.opened(rec)

    def on_close(self, rec: ConnectionResult) -> None:
        self.tcp.closed(rec, count_open=not rec.opened)
        self.connections.closed(rec)

    def attach(self) -> None:
        """Receive every ConnectionResult of this process."""
        add_sink(self.on_close, self.on_open)
        self._attached = True

    def detach(self) -> None:
        if self._attached:
            remove_sink(self.on_close, self.on_open)
            self._attached = False

    # -- health sources ---------------------------------------------------------------

    def set_certificate_source(self, fn: CertificateSource | None) -> None:
        self.health.certificates = fn

    def set_config_version_source(self, fn: VersionSource | None) -> None:
        self.health.config_version = fn

    def set_capture_counter_source(self, fn: CounterSource | None) -> None:
        self.health.capture_counters = fn

    # -- exposition -------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text format (0.0.4) of everything in this registry."""
        return generate_latest(self.registry)

    def __enter__(self) -> Metrics:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

