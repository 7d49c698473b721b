"""The waypoint's decision engine, table-driven, on Istio's documented examples.

The world is bookinfo-like and goes through the real translator, so the routing
objects are exactly what the controller would push.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
import yaml

from waypoint import engine
from waypoint.engine import Forward, Outcome, Respond, Target
from waypoint.request import Peer, Request
from waypoint.routes import RouteTable, from_http_route, qualify
from ztunnel_py.controller.translate import KubeObject, translate
from ztunnel_py.state import routing as r
from ztunnel_py.state.snapshot import Snapshot

NS = "bookinfo"
REVIEWS = f"reviews.{NS}.svc.cluster.local"
RATINGS = f"ratings.{NS}.svc.cluster.local"


def _pod(name: str, ip: str, labels: dict[str, str], ns: str = NS) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": "node1", "serviceAccountName": labels.get("app", name)},
        "status": {"podIP": ip},
    }


def _svc(name: str, vip: str, port: int = 9080, ns: str = NS) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": {"app": name}, "clusterIP": vip,
                 "ports": [{"name": "http", "port": port, "targetPort": 8080}]},
    }


BOOKINFO: list[dict[str, Any]] = [
    _pod("reviews-v1", "10.1.0.1", {"app": "reviews", "version": "v1"}),
    _pod("reviews-v2", "10.1.0.2", {"app": "reviews", "version": "v2"}),
    _pod("reviews-v3", "10.1.0.3", {"app": "reviews", "version": "v3"}),
    _pod("ratings-v1", "10.1.0.4", {"app": "ratings", "version": "v1"}),
    _pod("productpage-v1", "10.1.0.5", {"app": "productpage", "version": "v1"}),
    _svc("reviews", "10.96.0.10"),
    _svc("ratings", "10.96.0.11"),
    _svc("productpage", "10.96.0.12"),
]


def world(extra: str = "", base: list[dict[str, Any]] | None = None) -> Snapshot:
    """The bookinfo world plus the routing objects in ``extra`` (YAML documents)."""
    bodies = list(BOOKINFO if base is None else base)
    bodies += [d for d in yaml.safe_load_all(extra) if d]
    objs = [KubeObject(f"w.yaml#{i}", b) for i, b in enumerate(bodies)]
    t = translate(objs, trust_domain="cluster.local", root_namespace="istio-system")
    assert not t.errors, [str(p) for p in t.errors]
    return t.snapshot


def table(extra: str = "") -> RouteTable:
    return RouteTable.build(world(extra), NS, "waypoint")


def req(path: str = "/", *, method: str = "GET", host: str = "reviews:9080",
        headers: dict[str, str] | None = None, port: int = 9080, source: Peer | None = None,
        grpc: bool = False) -> Request:
    return Request(method, path, host, tuple((headers or {}).items()), port,
                   source=source or Peer(), grpc=grpc)


def decide(t: RouteTable, rq: Request, host: str = REVIEWS, seed: int = 1) -> engine.Decision:
    svc = t.service(host)
    assert svc is not None
    return engine.decide(rq, t.routes_for(svc, rq.port), random.Random(seed))


def fwd(d: engine.Decision) -> Forward:
    assert isinstance(d, Forward), d
    return d


# Istio docs, "Request Routing": reviews v2 for end-user jason, v1 for everyone else.
REVIEWS_JASON = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v1}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
"""


DR_SUBSETS = "\n---\n" + REVIEWS_JASON.split("---")[1]


def test_no_route_config_forwards_to_the_service_itself() -> None:
    d = fwd(decide(table(), req("/x")))
    assert d.target == Target(REVIEWS, 9080, None)
    assert d.retry == engine.DEFAULT_RETRY
    assert d.timeout_s is None


@pytest.mark.parametrize(
    ("headers", "subset"),
    [({"end-user": "jason"}, "v2"), ({"end-user": "Jason"}, "v1"), ({}, "v1"),
     ({"end-user": "jasonx"}, "v1")],
)
def test_header_match_end_user_jason(headers: dict[str, str], subset: str) -> None:
    d = fwd(decide(table(REVIEWS_JASON), req(headers=headers)))
    assert d.target == Target(REVIEWS, 9080, subset)


def _vs(http: str, hosts: str = "[reviews]") -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: vs, namespace: bookinfo}}
spec:
  hosts: {hosts}
  http:
{http}
"""


MATCH_CASES: list[tuple[str, str, dict[str, Any], bool]] = [
    # (description, match YAML (flow), request kwargs, matches?)
    ("uri exact", "{uri: {exact: /a}}", {"path": "/a"}, True),
    ("uri exact ignores query", "{uri: {exact: /a}}", {"path": "/a?x=1"}, True),
    ("uri exact miss", "{uri: {exact: /a}}", {"path": "/ab"}, False),
    ("uri prefix", "{uri: {prefix: /api}}", {"path": "/api/v1"}, True),
    ("uri prefix miss", "{uri: {prefix: /api}}", {"path": "/ap"}, False),
    ("uri regex full match", "{uri: {regex: '/item/[0-9]+'}}", {"path": "/item/42"}, True),
    ("uri regex not partial", "{uri: {regex: '/item/[0-9]+'}}", {"path": "/item/42/x"}, False),
    ("ignoreUriCase", "{uri: {prefix: /API}, ignoreUriCase: true}", {"path": "/api/x"}, True),
    ("case matters by default", "{uri: {prefix: /API}}", {"path": "/api/x"}, False),
    ("method", "{method: {exact: POST}}", {"method": "POST"}, True),
    ("method miss", "{method: {exact: POST}}", {"method": "GET"}, False),
    ("authority", "{authority: {prefix: reviews}}", {"host": "reviews:9080"}, True),
    ("authority miss", "{authority: {exact: ratings}}", {"host": "reviews"}, False),
    ("header prefix", "{headers: {x-a: {prefix: ab}}}", {"headers": {"x-a": "abc"}}, True),
    ("header regex", "{headers: {x-a: {regex: 'a.c'}}}", {"headers": {"x-a": "abc"}}, True),
    ("header presence", "{headers: {x-a: {}}}", {"headers": {"x-a": ""}}, True),
    ("header absent", "{headers: {x-a: {}}}", {}, False),
    ("withoutHeaders absent", "{withoutHeaders: {x-a: {}}}", {}, True),
    ("withoutHeaders present", "{withoutHeaders: {x-a: {}}}", {"headers": {"x-a": "1"}},
     False),
    ("withoutHeaders other value", "{withoutHeaders: {x-a: {exact: b}}}",
     {"headers": {"x-a": "c"}}, True),
    ("queryParams exact", "{queryParams: {u: {exact: x}}}", {"path": "/p?a=1&u=x"}, True),
    ("queryParams miss", "{queryParams: {u: {exact: x}}}", {"path": "/p?u=y"}, False),
    ("queryParams regex", "{queryParams: {u: {regex: 'x+'}}}", {"path": "/p?u=xxx"}, True),
    ("port", "{port: 9080}", {"port": 9080}, True),
    ("port miss", "{port: 9090}", {"port": 9080}, False),
    ("sourceNamespace", "{sourceNamespace: front}",
     {"source": Peer(principal="spiffe://cluster.local/ns/front/sa/web")}, True),
    ("sourceNamespace miss", "{sourceNamespace: front}",
     {"source": Peer(principal="spiffe://cluster.local/ns/other/sa/web")}, False),
    ("all conditions of one match", "{uri: {prefix: /a}, method: {exact: GET}}",
     {"path": "/a", "method": "PUT"}, False),
]


@pytest.mark.parametrize(("what", "match", "kwargs", "hit"), MATCH_CASES,
                         ids=[c[0] for c in MATCH_CASES])
def test_match_conditions(what: str, match: str, kwargs: dict[str, Any], hit: bool) -> None:
    http = f"""  - match: [{match}]
    route: [{{destination: {{host: reviews, subset: v2}}}}]
  - route: [{{destination: {{host: reviews, subset: v1}}}}]"""
    d = fwd(decide(table(_vs(http) + DR_SUBSETS), req(**kwargs)))
    assert d.target.subset == ("v2" if hit else "v1")


def test_source_labels_match() -> None:
    snap = world(_vs("""  - match: [{sourceLabels: {app: productpage}}]
    route: [{destination: {host: ratings}}]
  - route: [{destination: {host: reviews}}]"""))
    t = RouteTable.build(snap, NS, "waypoint")
    pp = snap.by_ip["10.1.0.5"]
    other = snap.by_ip["10.1.0.4"]
    assert fwd(decide(t, req(source=Peer("10.1.0.5", "", pp)))).target.host == RATINGS
    assert fwd(decide(t, req(source=Peer("10.1.0.4", "", other)))).target.host == REVIEWS


def test_any_of_several_matches_and_first_route_wins() -> None:
    http = """  - match: [{uri: {exact: /a}}, {uri: {exact: /b}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - match: [{uri: {prefix: /}}]
    route: [{destination: {host: reviews, subset: v3}}]
  - route: [{destination: {host: reviews, subset: v1}}]"""
    t = table(_vs(http) + DR_SUBSETS)
    assert fwd(decide(t, req("/a"))).target.subset == "v2"
    assert fwd(decide(t, req("/b"))).target.subset == "v2"
    assert fwd(decide(t, req("/c"))).target.subset == "v3"


def test_no_matching_route_is_404_nr() -> None:
    t = table(_vs("""  - match: [{uri: {exact: /only}}]
    route: [{destination: {host: reviews}}]"""))
    d = decide(t, req("/other"))
    assert isinstance(d, Respond) and d.status == 404 and d.flags == "NR"


# Istio docs, "Traffic Shifting": 90/10 (there 50/50; same mechanics).
def test_weighted_split_is_close_to_the_weights() -> None:
    t = table(_vs("""  - route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v3}, weight: 10}""") + DR_SUBSETS)
    svc = t.service(REVIEWS)
    assert svc is not None
    rng = random.Random(7)
    counts = Counter(
        fwd(engine.decide(req(), t.routes_for(svc, 9080), rng)).target.subset
        for _ in range(2000)
    )
    assert set(counts) == {"v1", "v3"}
    assert abs(counts["v1"] / 2000 - 0.9) < 0.03


def test_zero_weight_never_chosen() -> None:
    dests = (r.HTTPRouteDestination(r.Destination("a"), 100),
             r.HTTPRouteDestination(r.Destination("b"), 0))
    rng = random.Random(3)
    assert {engine.choose_destination(dests, rng).destination.host  # type: ignore[union-attr]
            for _ in range(200)} == {"a"}


@pytest.mark.parametrize("weights", [(90, 10), (100, 0), (0, 0), (None, None), (1,), ()])
def test_a_forward_only_route_picks_as_choose_destination_does(
        weights: tuple[int | None, ...]) -> None:
    dests = tuple(r.HTTPRouteDestination(r.Destination(f"d{i}"), w)
                  for i, w in enumerate(weights))
    plan = engine.RoutePlan(r.HTTPRoute(name="split", route=dests))
    assert plan.forward_only and plan.name == "split"
    slow, fast = random.Random(5), random.Random(5)
    for _ in range(300):
        chosen = engine.choose_destination(dests, slow)
        i = plan.pick(fast)
        assert (dests[i] if i >= 0 else None) is chosen
    assert slow.random() == fast.random()  # the same draws: seeded tests see the same picks


def test_a_route_that_does_more_than_forward_is_not_forward_only() -> None:
    dest = (r.HTTPRouteDestination(r.Destination("a")),)
    ops = r.Headers(request=r.HeaderOperations(remove=("x-a",)))
    for route in (r.HTTPRoute(route=dest, headers=ops),
                  r.HTTPRoute(route=(r.HTTPRouteDestination(r.Destination("a"), 100, ops),)),
                  r.HTTPRoute(route=dest, mirror=r.Destination("b")),
                  r.HTTPRoute(route=dest, rewrite=r.HTTPRewrite(uri="/x")),
                  r.HTTPRoute(route=dest, fault=r.HTTPFaultInjection(
                      abort=r.FaultAbort(http_status=500)))):
        assert not engine.RoutePlan(route).forward_only
    assert engine.route_plan(route) is engine.route_plan(route)  # once per route object


def test_destination_port_selector() -> None:
    t = table(_vs("""  - route: [{destination: {host: ratings, port: {number: 9080}}}]"""))
    assert fwd(decide(t, req(port=9080))).target == Target(RATINGS, 9080)


REWRITE_CASES = [
    ("prefix rewrite", "{uri: {prefix: /old}}", "{uri: /new}", "/old/x?q=1", "/new/x?q=1",
     "reviews:9080"),
    ("exact rewrite replaces path", "{uri: {exact: /a}}", "{uri: /b}", "/a", "/b",
     "reviews:9080"),
    ("authority", "{uri: {prefix: /}}", "{authority: ratings}", "/x", "/x", "ratings"),
    ("regex rewrite", "{uri: {prefix: /}}",
     "{uriRegexRewrite: {match: '^/service/([^/]+)(/.*)$', rewrite: '\\2/instance/\\1'}}",
     "/service/foo/v1/api", "/v1/api/instance/foo", "reviews:9080"),
]


@pytest.mark.parametrize(("what", "match", "rewrite", "path", "want_path", "want_authority"),
                         REWRITE_CASES, ids=[c[0] for c in REWRITE_CASES])
def test_rewrite(what: str, match: str, rewrite: str, path: str, want_path: str,
                 want_authority: str) -> None:
    t = table(_vs(f"""  - match: [{match}]
    rewrite: {rewrite}
    route: [{{destination: {{host: reviews}}}}]"""))
    d = fwd(decide(t, req(path)))
    assert d.request.path == want_path
    assert d.request.authority == want_authority


def test_redirect_and_direct_response() -> None:
    t = table(_vs("""  - match: [{uri: {exact: /v1/getProductRatings}}]
    redirect: {uri: /v1/bookRatings, authority: newratings.default.svc.cluster.local}
  - match: [{uri: {exact: /teapot}}]
    directResponse: {status: 418, body: {string: "I'm a teapot"}}
  - match: [{uri: {exact: /moved}}]
    redirect: {uri: /new, redirectCode: 308, port: 8443, scheme: https}"""))
    d = decide(t, req("/v1/getProductRatings"))
    assert isinstance(d, Respond) and d.status == 301
    assert dict(d.headers)["location"] == \
        "http://newratings.default.svc.cluster.local/v1/bookRatings"
    d = decide(t, req("/teapot"))
    assert isinstance(d, Respond) and (d.status, d.body) == (418, b"I'm a teapot")
    d = decide(t, req("/moved"))
    assert isinstance(d, Respond) and d.status == 308
    assert dict(d.headers)["location"] == "https://reviews:8443/new"


def test_header_operations_route_and_destination_level() -> None:
    t = table(_vs("""  - headers:
      request:
        set: {x-set: route}
        add: {x-add: one}
        remove: [x-gone]
      response:
        set: {x-resp: route}
    route:
    - destination: {host: reviews}
      headers:
        request: {set: {x-dest: d}}
        response: {add: {x-dest-resp: d}, remove: [server]}"""))
    d = fwd(decide(t, req(headers={"x-set": "old", "x-gone": "1", "x-add": "zero"})))
    h = d.request.headers
    assert ("x-set", "route") in h and ("x-set", "old") not in h
    assert [v for k, v in h if k == "x-add"] == ["zero", "one"]
    assert not any(k == "x-gone" for k, _ in h)
    assert ("x-dest", "d") in h
    resp = engine.apply_header_ops((("server", "s"),), d.response_ops[0])
    resp = engine.apply_header_ops(resp, d.response_ops[1])
    assert resp == (("x-dest-resp", "d"), ("x-resp", "route"))


# Istio docs, "Fault Injection": 7 s delay for jason on ratings; abort 500 for jason.
RATINGS_DELAY = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: bookinfo}
spec:
  hosts: [ratings]
  http:
  - match:
    - headers: {end-user: {exact: jason}}
    fault:
      delay:
        percentage: {value: 100.0}
        fixedDelay: 7s
    timeout: 3s
    route: [{destination: {host: ratings}}]
  - match: [{uri: {prefix: /abort}}]
    fault:
      abort:
        percentage: {value: 100.0}
        httpStatus: 500
    route: [{destination: {host: ratings}}]
  - match: [{uri: {prefix: /grpc-abort}}]
    fault:
      abort: {grpcStatus: UNAVAILABLE}
    route: [{destination: {host: ratings}}]
  - route: [{destination: {host: ratings}}]
"""


def test_fault_delay_and_timeout() -> None:
    t = table(RATINGS_DELAY)
    d = fwd(decide(t, req(headers={"end-user": "jason"}, host="ratings"), RATINGS))
    assert (d.delay_s, d.timeout_s, d.flags) == (7.0, 3.0, "DI")
    d = fwd(decide(t, req(host="ratings"), RATINGS))
    assert (d.delay_s, d.timeout_s) == (0.0, None)


def test_fault_abort_http_and_grpc() -> None:
    t = table(RATINGS_DELAY)
    d = decide(t, req("/abort", host="ratings"), RATINGS)
    assert isinstance(d, Respond) and (d.status, d.flags) == (500, "FI")
    d = decide(t, req("/grpc-abort", host="ratings", grpc=True), RATINGS)
    assert isinstance(d, Respond) and (d.status, d.grpc_status, d.flags) == (200, "14", "FI")


def test_fault_percentages_are_honoured() -> None:
    t = table(_vs("""  - fault: {abort: {percentage: {value: 25}, httpStatus: 503}}
    route: [{destination: {host: reviews}}]"""))
    svc = t.service(REVIEWS)
    assert svc is not None
    rng = random.Random(11)
    aborted = sum(isinstance(engine.decide(req(), t.routes_for(svc, 9080), rng), Respond)
                  for _ in range(4000))
    assert abs(aborted / 4000 - 0.25) < 0.03


def test_mirror_and_mirrors_with_percentages() -> None:
    t = table(_vs("""  - route: [{destination: {host: reviews, subset: v1}, weight: 100}]
    mirror: {host: reviews, subset: v2}
    mirrorPercentage: {value: 100.0}
    mirrors:
    - destination: {host: ratings}
      percentage: {value: 0}""") + DR_SUBSETS)
    d = fwd(decide(t, req()))
    assert d.mirrors == (Target(REVIEWS, 9080, "v2"),)
    assert engine.shadow_authority("reviews:9080") == "reviews-shadow:9080"
    assert engine.shadow_authority("reviews.bookinfo") == "reviews.bookinfo-shadow"


def test_mirror_percentage_statistics() -> None:
    t = table(_vs("""  - route: [{destination: {host: reviews}}]
    mirror: {host: ratings}
    mirrorPercentage: {value: 30}"""))
    svc = t.service(REVIEWS)
    assert svc is not None
    rng = random.Random(5)
    n = sum(bool(fwd(engine.decide(req(), t.routes_for(svc, 9080), rng)).mirrors)
            for _ in range(4000))
    assert abs(n / 4000 - 0.30) < 0.03


RETRY_CASES: list[tuple[str, str | None, Outcome, bool]] = [
    ("5xx on 500", "5xx", Outcome(500), True),
    ("5xx on connect failure", "5xx", Outcome(error="connect-failure"), True),
    ("5xx not 404", "5xx", Outcome(404), False),
    ("gateway-error 502", "gateway-error", Outcome(502), True),
    ("gateway-error not 500", "gateway-error", Outcome(500), False),
    ("connect-failure", "connect-failure", Outcome(error="connect-failure"), True),
    ("connect-failure not 503", "connect-failure", Outcome(503), False),
    ("reset", "reset", Outcome(error="reset"), True),
    ("retriable-4xx 409", "retriable-4xx", Outcome(409), True),
    ("retriable-4xx not 404", "retriable-4xx", Outcome(404), False),
    ("refused-stream", "refused-stream", Outcome(error="refused-stream"), True),
    ("numeric code", "503,504", Outcome(504), True),
    ("grpc unavailable", "unavailable", Outcome(200, "14"), True),
    ("grpc cancelled", "cancelled", Outcome(200, "1"), True),
    ("grpc deadline-exceeded", "deadline-exceeded", Outcome(200, "4"), True),
    ("grpc internal", "internal", Outcome(200, "13"), True),
    ("grpc resource-exhausted", "resource-exhausted", Outcome(200, "8"), True),
    ("grpc other code", "unavailable", Outcome(200, "13"), False),
    ("success never", "5xx,gateway-error", Outcome(200), False),
    ("Istio default retries 503", None, Outcome(503), True),
    ("Istio default not 500", None, Outcome(500), False),
]


@pytest.mark.parametrize(("what", "retry_on", "outcome", "want"), RETRY_CASES,
                         ids=[c[0] for c in RETRY_CASES])
def test_retry_on(what: str, retry_on: str | None, outcome: Outcome, want: bool) -> None:
    policy = engine.retry_policy(r.HTTPRetry(attempts=3, retry_on=retry_on)) \
        if retry_on is not None else engine.DEFAULT_RETRY
    assert policy is not None
    assert engine.should_retry(policy, outcome) is want


def test_retries_from_route_and_disabled() -> None:
    t = table(_vs("""  - match: [{uri: {prefix: /r}}]
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: gateway-error}
    route: [{destination: {host: reviews}}]
  - retries: {attempts: 0}
    route: [{destination: {host: reviews}}]"""))
    d = fwd(decide(t, req("/r")))
    assert d.retry is not None
    assert (d.retry.attempts, d.retry.per_try_timeout_s) == (3, 2.0)
    assert fwd(decide(t, req("/x"))).retry is None


def test_backoff_is_jittered_exponential_and_capped() -> None:
    p = engine.DEFAULT_RETRY
    rng = random.Random(1)
    for n in range(1, 10):
        b = p.backoff(n, rng)
        assert 0 <= b <= min(0.25, 0.025 * 2 ** (n - 1))


def test_qualify_host_names() -> None:
    assert qualify("reviews", "ns") == "reviews.ns.svc.cluster.local"
    assert qualify("reviews.other", "ns") == "reviews.other.svc.cluster.local"
    assert qualify("a.b.svc.cluster.local", "ns") == "a.b.svc.cluster.local"
    assert qualify("*.ns.svc.cluster.local", "x") == "*.ns.svc.cluster.local"


# -- Gateway API HTTPRoute --------------------------------------------------------------

HTTPROUTE = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: bookinfo}
spec:
  parentRefs:
  - {group: "", kind: Service, name: reviews, port: 9080}
  rules:
  - matches:
    - path: {type: PathPrefix, value: /api}
      headers: [{name: x-canary, value: "yes"}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-via, value: gw}], remove: [x-drop]}
    backendRefs:
    - {name: ratings, port: 9080}
  - matches:
    - path: {type: Exact, value: /api/exact}
    backendRefs:
    - {name: productpage, port: 9080}
  - backendRefs:
    - {name: reviews, port: 9080, weight: 90}
    - {name: ratings, port: 9080, weight: 10}
"""


def test_http_route_translates_matches_filters_and_weights() -> None:
    t = table(HTTPROUTE)
    d = fwd(decide(t, req("/api/x", headers={"x-canary": "yes", "x-drop": "1"})))
    assert d.target.host == RATINGS
    assert ("x-via", "gw") in d.request.headers
    assert not any(k == "x-drop" for k, _ in d.request.headers)
    # PathPrefix is element-wise: /apix is not under /api.
    d2 = fwd(decide(t, req("/apix", headers={"x-canary": "yes"}), seed=3))
    assert d2.target.host in (REVIEWS, RATINGS)
    # Exact beats the longer-declared prefix by Gateway API precedence.
    d3 = fwd(decide(t, req("/api/exact", headers={"x-canary": "yes"})))
    assert d3.target.host == f"productpage.{NS}.svc.cluster.local"
    svc = t.service(REVIEWS)
    assert svc is not None
    rng = random.Random(9)
    hosts = Counter(fwd(engine.decide(req("/"), t.routes_for(svc, 9080), rng)).target.host
                    for _ in range(2000))
    assert abs(hosts[REVIEWS] / 2000 - 0.9) < 0.03


def test_http_route_filters_rewrite_redirect_mirror() -> None:
    snap = world("""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: bookinfo}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
    - type: RequestMirror
      requestMirror: {backendRef: {name: ratings, port: 9080}}
    backendRefs: [{name: reviews, port: 9080}]
  - matches: [{path: {type: Exact, value: /go}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {hostname: example.com, statusCode: 301}
""")
    routes = next(from_http_route(o) for o in snap.routing
                  if isinstance(o, r.KubernetesHTTPRoute))
    assert len(routes) == 2
    t = RouteTable.build(snap, NS, "waypoint")
    d = fwd(decide(t, req("/old/a")))
    assert d.request.path == "/new/a"
    assert d.mirrors == (Target(RATINGS, 9080),)
    red = decide(t, req("/go"))
    assert isinstance(red, Respond) and red.status == 301
    assert dict(red.headers)["location"] == "http://example.com/go"


def test_virtual_service_wins_over_http_route() -> None:
    t = table(REVIEWS_JASON + "---" + HTTPROUTE)
    assert fwd(decide(t, req("/api/x", headers={"x-canary": "yes"}))).target.host == REVIEWS
    assert any("HTTPRoute" in p for p in t.problems)


def test_http_route_timeouts_and_retry() -> None:
    t = table("""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: bookinfo}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /slow}}]
    timeouts: {request: 10s, backendRequest: 2s}
    backendRefs: [{name: reviews, port: 9080}]
  - retry: {attempts: 4, codes: [503, 504]}
    backendRefs: [{name: reviews, port: 9080}]
""")
    d = fwd(decide(t, req("/slow/x")))
    assert d.timeout_s == 10.0
    assert d.retry is not None and (d.retry.attempts, d.retry.per_try_timeout_s) == (2, 2.0)
    d = fwd(decide(t, req("/other")))
    assert d.retry is not None and d.retry.attempts == 4
    assert d.retry.status_codes == frozenset({503, 504})
    assert engine.should_retry(d.retry, Outcome(504)) and not engine.should_retry(
        d.retry, Outcome(500))


def test_targets_are_handed_out_once_and_hash_like_their_fields() -> None:
    from waypoint import engine as eng

    a = eng.target("reviews.bookinfo.svc.cluster.local", 9080, "v1")
    assert eng.target("reviews.bookinfo.svc.cluster.local", 9080, "v1") is a
    fresh = eng.Target("reviews.bookinfo.svc.cluster.local", 9080, "v1")
    assert fresh == a and hash(fresh) == hash(a) and {a: 1}[fresh] == 1
    assert eng.target("reviews.bookinfo.svc.cluster.local", 9080) != a
    assert eng.target("reviews.bookinfo.svc.cluster.local", 9081, "v1") != a


def test_route_timeout_and_retries_are_parsed_once_per_route_object() -> None:
    t = table(_vs("""  - timeout: 1500ms
    retries: {attempts: 2, perTryTimeout: 500ms, retryOn: "5xx,409"}
    route: [{destination: {host: reviews}}]"""))
    first, again = fwd(decide(t, req("/a"))), fwd(decide(t, req("/b")))
    assert first.timeout_s == 1.5 and first.retry is not None
    assert (first.retry.attempts, first.retry.per_try_timeout_s) == (2, 0.5)
    assert first.retry.retry_on == frozenset({"5xx"}) and first.retry.status_codes == {409}
    assert again.retry is first.retry  # remembered
    # A new configuration (new route objects) is parsed afresh.
    t2 = table(_vs("""  - timeout: 2s
    route: [{destination: {host: reviews}}]"""))
    d2 = fwd(decide(t2, req("/a")))
    assert d2.timeout_s == 2.0 and d2.retry is engine.DEFAULT_RETRY


