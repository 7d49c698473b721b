"""Request telemetry: Istio's HTTP metrics, one access-log line per request, traceparent.

Metrics (in the waypoint's own ``CollectorRegistry``, with Istio's names and
labels so that dashboards work, ``reporter="waypoint"``):

* ``istio_requests_total`` (counter)
* ``istio_request_duration_milliseconds`` (histogram, Istio's buckets)
* ``istio_request_bytes`` / ``istio_response_bytes`` (histograms)

Like the L4 metrics (``ztunnel_py.telemetry.metrics``) they are served by a
custom collector: no ``_created`` series, nothing in the global registry.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from waypoint.request import Peer
from ztunnel_py import log
from ztunnel_py.state.model import Workload
from ztunnel_py.telemetry.accesslog import put_field
from ztunnel_py.telemetry.metrics import (
    DEFAULT_CLUSTER,
    TCP_LABELS,
    UNKNOWN,
    _service_name_namespace,
)

# Istio's request metrics carry the TCP metrics' labels plus the response codes.
HTTP_LABELS = (
    *TCP_LABELS[:-2], "response_code", "grpc_response_status", *TCP_LABELS[-2:],
)

# Istio's default buckets (stats filter).
# (floats: the histograms compare each value with them as C doubles; not Final: mypyc
# 2.4 leaves a Final tuple of floats unset at run time)
DURATION_BUCKETS_MS: tuple[float, ...] = (
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
    30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0)
BYTES_BUCKETS: tuple[float, ...] = (
    1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0, 100000000.0,
    1000000000.0)



@dataclass(init=False)
class RequestRecord:
    """Everything the metrics and the access log need about one finished request."""

    method: str = ""
    path: str = ""
    authority: str = ""
    protocol: str = "http"  # http | grpc
    source: Peer = field(default_factory=Peer)
    destination_service: str = ""
    destination: Workload | None = None
    upstream: str = ""  # ip:port of the endpoint that answered
    route: str = ""
    status: int = 0
    grpc_status: str = ""
    flags: str = "-"
    request_bytes: int = 0
    response_bytes: int = 0
    duration_ms: float = 0.0
    attempts: int = 0
    traceparent: str = ""
    mirrored_to: tuple[str, ...] = ()
    security: str = "mutual_tls"

    # written out, not made by @dataclass: compiled (``ztunnel_py.native``)
    def __init__(self, method: str = "", path: str = "", authority: str = "",
                 protocol: str = "http", source: Peer | None = None,
                 destination_service: str = "", destination: Workload | None = None,
                 upstream: str = "", route: str = "", status: int = 0, grpc_status: str = "",
                 flags: str = "-", request_bytes: int = 0, response_bytes: int = 0,
                 duration_ms: float = 0.0, attempts: int = 0, traceparent: str = "",
                 mirrored_to: tuple[str, ...] = (), security: str = "mutual_tls") -> None:
        self.method = method
        self.path = path
        self.authority = authority
        self.protocol = protocol
        self.source = source if source is not None else Peer()
        self.destination_service = destination_service
        self.destination = destination
        self.upstream = upstream
        self.route = route
        self.status = status
        self.grpc_status = grpc_status
        self.flags = flags
        self.request_bytes = request_bytes
        self.response_bytes = response_bytes
        self.duration_ms = duration_ms
        self.attempts = attempts
        self.traceparent = traceparent
        self.mirrored_to = mirrored_to
        self.security = security


def _v(value: str) -> str:
    return value or UNKNOWN


def labels_of(rec: RequestRecord, cluster: str = DEFAULT_CLUSTER) -> tuple[str, ...]:
    src = rec.source.workload
    dst = rec.destination
    svc_name, svc_ns = (_service_name_namespace(rec.destination_service)
                        if rec.destination_service else (UNKNOWN, UNKNOWN))
    return (
        "waypoint",
        _v(src.name if src else ""),
        _v(src.namespace if src else rec.source.namespace),
        _v(rec.source.principal),
        _v(src.canonical_name if src else ""),
        _v(src.canonical_revision if src else ""),
        _v(src.canonical_name if src else ""),
        _v(src.canonical_revision if src else ""),
        cluster,
        _v(dst.name if dst else ""),
        _v(dst.namespace if dst else ""),
        _v(dst.identity if dst else ""),
        _v(dst.canonical_name if dst else ""),
        _v(dst.canonical_revision if dst else ""),
        _v(rec.destination_service),
        svc_name,
        svc_ns,
        _v(dst.canonical_name if dst else ""),
        _v(dst.canonical_revision if dst else ""),
        cluster,
        rec.protocol,
        str(rec.status),
        rec.grpc_status or "-",
        rec.flags or "-",
        rec.security,
    )


class _Hist:
    __slots__ = ("bounds", "buckets", "count", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        # Kept here, not read from the module constant per request: compiled, a ``Final``
        # tuple is rebuilt (its elements boxed) at every use.
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        i = 0  # bisect_left by hand: compiled, a few float compares beat a generic call
        for bound in self.bounds:
            if value <= bound:
                break
            i += 1
        self.buckets[i] += 1
        self.count += 1
        self.sum += value

    def family_buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        acc = 0
        for bound, n in zip((*self.bounds, float("inf")), self.buckets, strict=True):
            acc += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), acc))
        return out


class _Series:
    """One label set's counter and histograms."""

    __slots__ = ("count", "duration", "key", "req_bytes", "resp_bytes")

    def __init__(self, key: tuple[str, ...]) -> None:
        self.key = key  # its labels
        self.count = 0
        self.duration = _Hist(DURATION_BUCKETS_MS)
        self.req_bytes = _Hist(BYTES_BUCKETS)
        self.resp_bytes = _Hist(BYTES_BUCKETS)


# Label sets remembered by what they are made of (bounded: cleared when full).
LABEL_CACHE_SIZE: Final = 4096


class HttpCollector(Collector):
    def __init__(self, cluster: str = DEFAULT_CLUSTER) -> None:
        self.cluster = cluster
        self.series: dict[tuple[str, ...], _Series] = {}
        # (id(source workload), id(destination workload), the record's own label fields)
        # -> (its series, source workload, destination workload): the workloads are kept
        # so that an id is never reused while its entry lives.
        self._labels: dict[tuple[object, ...], tuple[_Series, object, object]] = {}

    def series_of(self, rec: RequestRecord) -> _Series:
        """The series for ``labels_of(rec)``, remembered by what the labels are made of:
        building the 25 labels (canonical names and revisions looked up in the workloads'
        label maps), or even hashing them, costs more than the rest of ``record``."""
        src, dst = rec.source.workload, rec.destination
        ck = (id(src), id(dst), rec.source.principal, rec.destination_service, rec.protocol,
              rec.status, rec.grpc_status, rec.flags, rec.security)
        hit = self._labels.get(ck)
        if hit is not None and hit[1] is src and hit[2] is dst:
            return hit[0]
        key = labels_of(rec, self.cluster)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = _Series(key)
        if len(self._labels) >= LABEL_CACHE_SIZE:
            self._labels.clear()
        self._labels[ck] = (series, src, dst)
        return series

    @property
    def requests(self) -> dict[tuple[str, ...], int]:
        return {k: s.count for k, s in self.series.items()}

    def record(self, rec: RequestRecord) -> None:
        series = self.series_of(rec)
        series.count += 1
        series.duration.observe(rec.duration_ms)
        series.req_bytes.observe(rec.request_bytes)
        series.resp_bytes.observe(rec.response_bytes)

    def collect(self) -> Iterator[Metric]:
        c = CounterMetricFamily("istio_requests", "Total requests", labels=HTTP_LABELS)
        for key, series in self.series.items():
            c.add_metric(key, series.count)
        yield c
        for name, doc, attr in (
            ("istio_request_duration_milliseconds", "Request duration", "duration"),
            ("istio_request_bytes", "Request body sizes", "req_bytes"),
            ("istio_response_bytes", "Response body sizes", "resp_bytes"),
        ):
            h = HistogramMetricFamily(name, doc, labels=HTTP_LABELS)
            for key, series in self.series.items():
                hist: _Hist = getattr(series, attr)
                h.add_metric(list(key), hist.family_buckets(), hist.sum)
            yield h

    def describe(self) -> Iterator[Metric]:
        return iter(())


class WaypointMetrics:
    """The waypoint's registry; ``record`` once per finished request."""

    def __init__(self, cluster: str = DEFAULT_CLUSTER) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.http = HttpCollector(cluster)
        self.registry.register(self.http)

    def record(self, rec: RequestRecord) -> None:
        self.http.record(rec)
        access_log(rec)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def count(self, **labels: str) -> int:
        """Requests whose labels include ``labels`` (tests, the admin page)."""
        idx = {name: i for i, name in enumerate(HTTP_LABELS)}
        return sum(n for key, n in self.http.requests.items()
                   if all(key[idx[k]] == v for k, v in labels.items()))


_ACCESS: Final = log.emitter("waypoint.access")
_INFO: Final = logging.INFO


def access_log(rec: RequestRecord) -> None:
    if log.level > _INFO:  # (one attribute read)
        return  # skip building the line when it would be dropped
    # Empty fields ("" or 0) are left out: put only what is there (building them all and
    # filtering cost more than the rest of the waypoint's work on a request).
    src, dst = rec.source, rec.destination
    fields: dict[str, object] = {}
    put_field(fields, "src.addr", src.ip)
    put_field(fields, "src.workload", src.workload.name if src.workload else "")
    put_field(fields, "src.identity", src.principal)
    put_field(fields, "method", rec.method)
    put_field(fields, "path", rec.path)
    put_field(fields, "authority", rec.authority)
    put_field(fields, "protocol", rec.protocol)
    put_field(fields, "dst.service", rec.destination_service)
    put_field(fields, "dst.addr", rec.upstream)
    put_field(fields, "dst.workload", dst.name if dst else "")
    put_field(fields, "route", rec.route)
    put_field(fields, "response_code", rec.status)
    put_field(fields, "grpc_status", rec.grpc_status)
    put_field(fields, "response_flags", rec.flags)
    put_field(fields, "bytes_recv", rec.request_bytes)
    put_field(fields, "bytes_sent", rec.response_bytes)
    put_field(fields, "duration_ms", round(rec.duration_ms, 3))
    put_field(fields, "attempts", rec.attempts)
    put_field(fields, "traceparent", rec.traceparent)
    if rec.mirrored_to:
        fields["mirrored_to"] = ",".join(rec.mirrored_to)
    # Through log's emitter: under the JSON set-up the same line as structlog's chain
    # writes, at a fraction of its cost (one line per request); structlog otherwise.
    _ACCESS.info("request complete", fields)


# -- W3C trace context --------------------------------------------------------------------

_TRACEPARENT: Final = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


_ZERO_SPAN: Final = "0" * 16
_ZERO_TRACE: Final = "0" * 32


IDS_PER_DRAW: Final = 16


class RandomIds:
    """A request's ids as 80 random hex digits: a span id ``[0:16]``, a trace id
    ``[16:48]`` and a request id ``[48:80]``, drawn ``IDS_PER_DRAW`` requests at a time
    from ``draw`` (``os.urandom``; tests pass a seeded one): per request one slice of the
    digits. (A Mersenne Twister draw made as large costs more than the kernel's: its
    conversion to bytes dominates.)"""

    def __init__(self, draw: Callable[[int], bytes] = os.urandom) -> None:
        self.draw = draw
        self.digits = ""
        self.at = 0

    def next(self) -> str:
        at = self.at
        if at >= len(self.digits):
            self.digits = self.draw(40 * IDS_PER_DRAW).hex()
            at = 0
        self.at = at + 80
        return self.digits[at:at + 80]


def request_id(ids: str) -> str:
    """``RandomIds``'s request id digits as a UUID's text (what ``str(uuid.UUID(int=...))``
    gives)."""
    return f"{ids[48:56]}-{ids[56:60]}-{ids[60:64]}-{ids[64:68]}-{ids[68:80]}"


def next_traceparent(incoming: str | None, ids: str) -> str:
    """The ``traceparent`` for the next hop: the caller's trace id and flags with a new
    span id (this hop), or a new sampled trace when the caller sent none (or a bad one).
    ``ids`` is ``RandomIds.next``'s."""
    span = ids[:16]
    if span == _ZERO_SPAN:
        span = "0" * 15 + "1"
    m = _TRACEPARENT.match(incoming.strip().lower()) if incoming else None
    if m and m.group(1) != "ff" and m.group(2) != _ZERO_TRACE and m.group(3) != _ZERO_SPAN:
        return f"00-{m.group(2)}-{span}-{m.group(4)}"
    trace = ids[16:48]
    if trace == _ZERO_TRACE:
        trace = "0" * 31 + "1"
    return f"00-{trace}-{span}-01"
