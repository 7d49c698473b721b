"""Clusters: subsets, traffic-policy merging, load balancers, pool admission, outlier ejection."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from tests.unit.test_waypoint_engine import NS, REVIEWS, REVIEWS_JASON, req, table
from waypoint.cluster import (
    Cluster,
    EndpointRef,
    Gate,
    Limits,
    Overflow,
    UnknownSubset,
    effective_policy,
    endpoints_for,
)
from waypoint.engine import Target
from waypoint.request import Peer
from ztunnel_py.state import routing as r

DR = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool:
      tcp: {maxConnections: 1, connectTimeout: 2s}
      http: {http1MaxPendingRequests: 1, maxRetries: 3}
    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 30s,
                       maxEjectionPercent: 100}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {simple: RANDOM}
  - name: v3
    labels: {version: v3}
    trafficPolicy:
      portLevelSettings:
      - port: {number: 9080}
        connectionPool: {tcp: {maxConnections: 7}}
"""


def _dr() -> r.DestinationRule:
    t = table(DR)
    dr = t.destination_rule(REVIEWS)
    assert dr is not None
    return dr


def test_subsets_select_endpoints_by_labels_and_resolve_target_port() -> None:
    t = table(REVIEWS_JASON)
    svc = t.service(REVIEWS)
    assert svc is not None
    dr = t.destination_rule(REVIEWS)
    all_eps = endpoints_for(Target(REVIEWS, 9080), svc, dr, t.snapshot)
    assert sorted(e.address for e in all_eps) == ["10.1.0.1", "10.1.0.2", "10.1.0.3"]
    assert {e.port for e in all_eps} == {8080}
    v2 = endpoints_for(Target(REVIEWS, 9080, "v2"), svc, dr, t.snapshot)
    assert [e.address for e in v2] == ["10.1.0.2"]
    with pytest.raises(UnknownSubset, match="v9"):
        endpoints_for(Target(REVIEWS, 9080, "v9"), svc, dr, t.snapshot)
    excluded = endpoints_for(Target(REVIEWS, 9080), svc, dr, t.snapshot,
                             exclude=frozenset({f"{NS}/reviews-v1"}))
    assert "10.1.0.1" not in [e.address for e in excluded]


def test_subset_policy_overrides_top_level_field_by_field() -> None:
    dr = _dr()
    top = effective_policy(dr, "v1", 9080)
    assert top.load_balancer is not None and top.load_balancer.simple == "ROUND_ROBIN"
    v2 = effective_policy(dr, "v2", 9080)
    assert v2.load_balancer is not None and v2.load_balancer.simple == "RANDOM"
    assert v2.connection_pool == top.connection_pool  # not overridden: inherited
    assert v2.outlier_detection == top.outlier_detection
    v3 = effective_policy(dr, "v3", 9080)
    assert Limits.of(v3.connection_pool, http2=False).max_active == 7
    assert Limits.of(top.connection_pool, http2=False).max_active == 1
    assert Limits.of(top.connection_pool, http2=False).max_pending == 1
    assert Limits.of(top.connection_pool, http2=False).connect_timeout_s == 2.0


EPS = tuple(EndpointRef(f"10.0.0.{i}", 8080) for i in range(1, 5))


def _cluster(lb: r.LoadBalancerSettings | None = None, od: r.OutlierDetection | None = None,
             now: list[float] | None = None) -> Cluster:
    from waypoint.cluster import ClusterPolicy

    clock = now if now is not None else [0.0]
    return Cluster("c", ClusterPolicy(load_balancer=lb, outlier_detection=od),
                   random.Random(4), lambda: clock[0])


def test_round_robin_cycles() -> None:
    c = _cluster(r.LoadBalancerSettings(simple="ROUND_ROBIN"))
    picks = [c.pick(EPS, req()) for _ in range(8)]
    assert picks == list(EPS) * 2


def test_random_spreads() -> None:
    c = _cluster(r.LoadBalancerSettings(simple="RANDOM"))
    counts = Counter(c.pick(EPS, req()) for _ in range(4000))
    assert all(abs(n / 4000 - 0.25) < 0.04 for n in counts.values())


def test_least_request_prefers_idle_endpoints() -> None:
    c = _cluster()
    for _ in range(10):
        c.begin(EPS[0])
        c.begin(EPS[1])
    picks = Counter(c.pick(EPS, req()) for _ in range(500))
    # Power of two choices: a busy endpoint wins only when both samples are busy.
    assert picks[EPS[0]] + picks[EPS[1]] < 0.25 * 500
    c.end(EPS[0])
    assert c.in_flight[EPS[0].key] == 9


@pytest.mark.parametrize(
    ("ch", "a", "b", "differ_possible"),
    [
        (r.ConsistentHashLB(http_header_name="x-user"),
         {"headers": {"x-user": "alice"}}, {"headers": {"x-user": "bob"}}, True),
        (r.ConsistentHashLB(http_cookie=r.HTTPCookie(name="sid")),
         {"headers": {"cookie": "a=1; sid=abc"}}, {"headers": {"cookie": "sid=xyz"}}, True),
        (r.ConsistentHashLB(use_source_ip=True),
         {"source": Peer("10.9.0.1")}, {"source": Peer("10.9.0.2")}, True),
        (r.ConsistentHashLB(http_query_parameter_name="u"),
         {"path": "/?u=1"}, {"path": "/?u=2"}, True),
    ],
)
def test_consistent_hash_is_sticky(ch: r.ConsistentHashLB, a: dict[str, object],
                                   b: dict[str, object], differ_possible: bool) -> None:
    c = _cluster(r.LoadBalancerSettings(consistent_hash=ch))
    first = c.pick(EPS, req(**a))  # type: ignore[arg-type]
    assert all(c.pick(EPS, req(**a)) == first for _ in range(50))  # type: ignore[arg-type]
    # Removing another endpoint does not move a key (consistent).
    others = tuple(e for e in EPS if e != first and e != EPS[-1]) + ((first,) if first else ())
    if first != EPS[-1]:
        assert c.pick(others, req(**a)) == first  # type: ignore[arg-type]
    assert c.pick(EPS, req(**b)) in EPS  # type: ignore[arg-type,operator]


def test_outlier_ejection_and_return_after_base_time() -> None:
    now = [0.0]
    c = _cluster(od=r.OutlierDetection(consecutive_5xx_errors=3,
                                       base_ejection_time=r.Duration("10s"),
                                       max_ejection_percent=50), now=now)
    bad = EPS[0]
    c.record(bad, 500, EPS)
    c.record(bad, 500, EPS)
    c.record(bad, 200, EPS)  # a success resets the count
    c.record(bad, 500, EPS)
    c.record(bad, 500, EPS)
    assert not c.is_ejected(bad)
    c.record(bad, 500, EPS)
    assert c.is_ejected(bad)
    assert all(c.pick(EPS, req()) != bad for _ in range(200))
    now[0] = 9.9
    assert c.is_ejected(bad)
    now[0] = 10.1
    assert not c.is_ejected(bad)
    # Ejected again: twice the base time.
    for _ in range(3):
        c.record(bad, 503, EPS)
    now[0] = 10.1 + 19.9
    assert c.is_ejected(bad)
    now[0] = 10.1 + 20.1
    assert not c.is_ejected(bad)


def test_max_ejection_percent_limits_ejections() -> None:
    c = _cluster(od=r.OutlierDetection(consecutive_5xx_errors=1, max_ejection_percent=50))
    for ep in EPS:
        c.record(ep, 500, EPS)
    assert len(c.ejected(EPS)) == 2


def test_gateway_errors_only() -> None:
    c = _cluster(od=r.OutlierDetection(consecutive_5xx_errors=0, consecutive_gateway_errors=2,
                                       max_ejection_percent=100))
    c.record(EPS[0], 500, EPS)
    c.record(EPS[0], 500, EPS)
    assert not c.is_ejected(EPS[0])
    c.record(EPS[0], 502, EPS)
    c.record(EPS[0], None, EPS)  # connect failure counts as a gateway error
    assert c.is_ejected(EPS[0])


def test_no_outlier_detection_never_ejects() -> None:
    c = _cluster()
    for _ in range(100):
        c.record(EPS[0], 500, EPS)
    assert not c.is_ejected(EPS[0])


async def test_gate_admits_queues_and_overflows() -> None:
    gate = Gate()
    limits = Limits(max_active=1, max_pending=1)
    await gate.acquire(limits)  # active
    waiter = asyncio.ensure_future(gate.acquire(limits))  # pending
    await asyncio.sleep(0)
    with pytest.raises(Overflow):
        await gate.acquire(limits)
    assert gate.overflows == 1
    assert not waiter.done()
    gate.release()
    await asyncio.wait_for(waiter, 1)
    assert gate.active == 1
    gate.release()
    assert gate.active == 0


async def test_gate_cancelled_waiter_frees_its_place() -> None:
    gate = Gate()
    limits = Limits(max_active=1, max_pending=1)
    await gate.acquire(limits)
    waiter = asyncio.ensure_future(gate.acquire(limits))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    other = asyncio.ensure_future(gate.acquire(limits))
    await asyncio.sleep(0)
    gate.release()
    await asyncio.wait_for(other, 1)
    gate.release()
    assert gate.active == 0 and not gate.waiting


def test_outlier_settings_follow_a_new_policy() -> None:
    from waypoint.cluster import ClusterPolicy

    c = _cluster()
    for _ in range(5):
        c.record(EPS[0], 500, EPS)
    assert not c.is_ejected(EPS[0])
    c.policy = ClusterPolicy(outlier_detection=r.OutlierDetection(
        consecutive_5xx_errors=1, max_ejection_percent=100))  # a new configuration
    c.record(EPS[1], 500, EPS)
    assert c.is_ejected(EPS[1])
    c.policy = ClusterPolicy()  # and its removal
    c.record(EPS[2], 500, EPS)
    assert not c.is_ejected(EPS[2])
