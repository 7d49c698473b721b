"""Table-driven tests of the translator: enrollment, waypoints, endpoints, multi-IP, rejections."""

from __future__ import annotations

from typing import Any

import pytest

from ztunnel_py.controller.translate import (
    KubeObject,
    Problem,
    Translation,
    translate,
    translate_keeping_last_good,
)
from ztunnel_py.state.model import Action, MtlsMode, WaypointRef

TD = "example.org"


def run(*bodies: dict[str, Any]) -> Translation:
    objs = [KubeObject(f"t.yaml#doc{i}", b) for i, b in enumerate(bodies, 1)]
    return translate(objs, trust_domain=TD, root_namespace="istio-system")


def ns(name: str = "demo", **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def pod(name: str, ip: str | list[str] = "10.0.0.1", *, namespace: str = "demo",
        node: str = "n1", labels: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    ips = [ip] if isinstance(ip, str) else ip
    body: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {"nodeName": node, "serviceAccountName": "sa",
                 "containers": [{"name": "c", "ports": [{"name": "http",
                                                         "containerPort": 8080}]}]},
        "status": {"podIP": ips[0], "podIPs": [{"ip": i} for i in ips]},
    }
    for k, v in extra.items():
        body[k] = v
    return body


def svc(name: str = "web", vip: str | list[str] = "10.96.0.1", *, namespace: str = "demo",
        selector: dict[str, str] | None = None, labels: dict[str, str] | None = None,
        target: Any = "http", port_name: str = "http") -> dict[str, Any]:
    vips = [vip] if isinstance(vip, str) else vip
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {"selector": selector if selector is not None else {"app": "web"},
                 "clusterIP": vips[0], "clusterIPs": vips,
                 "ports": [{"name": port_name, "port": 80, "targetPort": target}]},
    }


def waypoint_gw(name: str = "wp", namespace: str = "demo") -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"gatewayClassName": "istio-waypoint",
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    }


def errors(t: Translation) -> list[Problem]:
    return [p for p in t.problems if p.severity == "error"]


# -- enrollment ---------------------------------------------------------------------

ENROLL = "istio.io/dataplane-mode"


@pytest.mark.parametrize(
    ("ns_label", "pod_label", "host_network", "enrolled"),
    [
        ("ambient", None, False, True),
        ("ambient", "none", False, False),  # the pod opts out
        (None, "ambient", False, True),  # the pod opts in alone
        ("none", "ambient", False, True),  # the pod wins
        (None, None, False, False),
        ("ambient", None, True, False),  # host-network pods are never captured
        ("ambient", "sidecar", False, True),  # unknown pod value: ignored (warning)
    ],
)
def test_enrollment_precedence(ns_label: str | None, pod_label: str | None, host_network: bool,
                               enrolled: bool) -> None:
    p = pod("a", labels={ENROLL: pod_label} if pod_label else {})
    p["spec"]["hostNetwork"] = host_network
    t = run(ns(**({ENROLL: ns_label} if ns_label else {})), p)
    assert t.snapshot.workloads[0].enrolled is enrolled
    assert not errors(t)
    assert any("sidecar" in p.message for p in t.problems) is (pod_label == "sidecar")


# -- waypoints ------------------------------------------------------------------------

USE = "istio.io/use-waypoint"


@pytest.mark.parametrize(
    ("ns_label", "own_label", "expected"),
    [
        ("wp", None, "wp"),  # namespace default
        ("wp", "wp2", "wp2"),  # the pod/service wins
        ("wp", "none", None),  # opt out
        (None, "wp2", "wp2"),
        (None, None, None),
    ],
)
def test_waypoint_label_precedence(ns_label: str | None, own_label: str | None,
                                   expected: str | None) -> None:
    own = {"app": "web", **({USE: own_label} if own_label else {})}
    t = run(ns(**({USE: ns_label} if ns_label else {})), waypoint_gw("wp"), waypoint_gw("wp2"),
            pod("a", labels=own), svc(labels=own))
    want = WaypointRef(expected, "demo") if expected else None
    assert t.snapshot.workloads[0].waypoint == want
    assert t.snapshot.services[0].waypoint == want
    assert not errors(t)


def test_waypoint_in_another_namespace_and_waypoint_pods_marked() -> None:
    t = run(
        ns("demo", **{USE: "shared", "istio.io/use-waypoint-namespace": "infra"}),
        waypoint_gw("shared", "infra"),
        pod("a"),
        pod("shared-xyz", "10.0.0.9", namespace="infra",
            labels={"gateway.networking.k8s.io/gateway-name": "shared"}),
    )
    by_name = {w.name: w for w in t.snapshot.workloads}
    assert by_name["a"].waypoint == WaypointRef("shared", "infra")
    assert by_name["shared-xyz"].is_waypoint and by_name["shared-xyz"].waypoint is None
    assert not by_name["a"].is_waypoint


def test_use_waypoint_naming_no_waypoint_is_an_error_and_dropped() -> None:
    t = run(ns(), pod("a", labels={USE: "ghost"}), svc(labels={USE: "ghost"}))
    assert t.snapshot.workloads[0].waypoint is None
    assert t.snapshot.services[0].waypoint is None
    msgs = [p for p in errors(t) if "ghost" in p.message]
    assert {p.kind for p in msgs} == {"Pod", "Service"}
    assert all("gatewayClassName: istio-waypoint" in p.hint for p in msgs)


def test_a_non_waypoint_gateway_is_not_a_waypoint() -> None:
    gw = waypoint_gw("wp")
    gw["spec"]["gatewayClassName"] = "istio"
    t = run(ns(**{USE: "wp"}), gw, pod("a"))
    assert t.snapshot.workloads[0].waypoint is None
    assert errors(t)


# -- service endpoints -------------------------------------------------------------------


def slice_(service: str, *endpoints: dict[str, Any], port_name: str = "http",
           port: int = 9090) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{service}-abc", "namespace": "demo",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": port_name, "port": port}],
        "endpoints": list(endpoints),
    }


def test_selector_endpoints_resolve_named_target_port() -> None:
    t = run(ns(), pod("a", labels={"app": "web"}), pod("b", "10.0.0.2", labels={"app": "db"}),
            svc())
    (s,) = t.snapshot.services
    assert [(e.workload_uid, e.address, dict(e.ports)) for e in s.endpoints] == [
        ("demo/a", "10.0.0.1", {80: 8080})]
    assert s.hostname == "web.demo.svc.cluster.local"


def test_selector_endpoint_without_the_named_port_has_no_port_mapping() -> None:
    t = run(ns(), pod("a", labels={"app": "web"}), svc(target="grpc"))
    assert dict(t.snapshot.services[0].endpoints[0].ports) == {}


def test_numeric_target_port_and_empty_selector() -> None:
    t = run(ns(), pod("a", labels={"app": "web"}), svc(target=9000),
            svc("noselector", "10.96.0.2", selector={}))
    by_name = {s.name: s for s in t.snapshot.services}
    assert dict(by_name["web"].endpoints[0].ports) == {80: 9000}
    assert by_name["noselector"].endpoints == ()


def test_endpoint_slices_win_over_the_selector() -> None:
    t = run(
        ns(),
        pod("a", labels={"app": "web"}),
        pod("b", "10.0.0.2", labels={"app": "web"}),
        pod("c", "10.0.0.3", labels={"app": "other"}),
        svc(),
        slice_("web",
               {"addresses": ["10.0.0.2"], "targetRef": {"kind": "Pod", "name": "b"}},
               {"addresses": ["10.0.0.3"], "conditions": {"ready": False}},
               {"addresses": ["10.9.9.9"]}),
    )
    (s,) = t.snapshot.services
    got = [(e.workload_uid, e.address, dict(e.ports), e.ready) for e in s.endpoints]
    assert got == [("demo/b", "10.0.0.2", {80: 9090}, True),
                   ("demo/c", "10.0.0.3", {80: 9090}, False)]
    (warn,) = [p for p in t.problems if "10.9.9.9" in p.message]
    assert warn.severity == "warning" and warn.kind == "EndpointSlice"


def test_unready_pod_gives_unready_endpoint() -> None:
    p = pod("a", labels={"app": "web"})
    p["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    t = run(ns(), p, svc())
    assert t.snapshot.workloads[0].healthy is False
    assert t.snapshot.services[0].endpoints[0].ready is False


# -- multi-IP pods -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vips", "addresses"),
    [
        (["10.96.0.1"], ["10.0.0.1"]),
        (["fd00:96::1"], ["fd00::1"]),
        (["10.96.0.1", "fd00:96::1"], ["10.0.0.1", "fd00::1"]),
    ],
)
def test_multi_ip_pod(vips: list[str], addresses: list[str]) -> None:
    t = run(ns(), pod("a", ["10.0.0.1", "fd00::1"], labels={"app": "web"}), svc(vip=vips))
    (w,) = t.snapshot.workloads
    assert w.ips == ("10.0.0.1", "fd00::1")
    assert t.snapshot.by_ip["fd00::1"] is t.snapshot.by_ip["10.0.0.1"]
    assert [e.address for e in t.snapshot.services[0].endpoints] == addresses
    assert t.snapshot.services[0].vips == tuple(vips)


def test_workload_identity_and_uid() -> None:
    p = pod("a")
    p["metadata"]["uid"] = "1234-abcd"
    t = run(ns(), p, pod("b", "10.0.0.2"))
    by_name = {w.name: w for w in t.snapshot.workloads}
    assert by_name["a"].uid == "1234-abcd"
    assert by_name["b"].uid == "demo/b"
    assert by_name["a"].identity == "spiffe://example.org/ns/demo/sa/sa"
    assert by_name["a"].node == "n1"


# -- security and routing resources ---------------------------------------------------------


def test_authorization_policy_fields_map_to_the_model() -> None:
    t = run({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "ap", "namespace": "demo"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "action": "DENY",
            "rules": [{
                "from": [{"source": {"principals": ["cluster.local/ns/a/sa/b"],
                                     "notNamespaces": ["x"], "ipBlocks": ["10.0.0.0/8"]}}],
                "to": [{"operation": {"ports": ["8080"], "notPaths": ["/admin"]}}],
                "when": [{"key": "source.ip", "values": ["10.0.0.1"]}],
            }],
        },
    })
    (ap,) = t.snapshot.authorization_policies
    assert ap.action is Action.DENY and dict(ap.selector or {}) == {"app": "web"}
    (rule,) = ap.rules
    assert rule.sources[0].principals == ("cluster.local/ns/a/sa/b",)
    assert rule.sources[0].not_namespaces == ("x",)
    assert rule.sources[0].ip_blocks == ("10.0.0.0/8",)
    assert rule.operations[0].ports == ("8080",) and rule.operations[0].not_paths == ("/admin",)
    assert rule.conditions[0].key == "source.ip"


def test_authorization_policy_target_refs_and_defaults() -> None:
    t = run({
        "apiVersion": "security.istio.io/v1beta1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "ap", "namespace": "demo"},
        "spec": {"targetRefs": [{"kind": "Service", "group": "", "name": "web"}]},
    })
    (ap,) = t.snapshot.authorization_policies
    assert ap.action is Action.ALLOW and ap.selector is None and ap.rules == ()
    assert ap.target_refs[0].kind == "Service" and ap.target_refs[0].name == "web"


def test_peer_authentication() -> None:
    t = run({
        "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "pa", "namespace": "demo"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "STRICT"},
                 "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}},
    })
    (pa,) = t.snapshot.peer_authentications
    assert pa.mode is MtlsMode.STRICT and dict(pa.port_level) == {8080: MtlsMode.PERMISSIVE}


VS = {
    "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
    "metadata": {"name": "reviews", "namespace": "demo"},
    "spec": {
        "hosts": ["reviews"],
        "http": [{
            "name": "v2-for-jason",
            "match": [{"headers": {"end-user": {"exact": "jason"}}, "uri": {"prefix": "/api"},
                       "ignoreUriCase": True}],
            "route": [{"destination": {"host": "reviews", "subset": "v2",
                                       "port": {"number": 9080}}, "weight": 90},
                      {"destination": {"host": "reviews", "subset": "v1"}, "weight": 10,
                       "headers": {"request": {"set": {"x-a": "b"}, "remove": ["x-c"]}}}],
            "timeout": "1.5s",
            "retries": {"attempts": 3, "perTryTimeout": "500ms", "retryOn": "5xx"},
            "fault": {"delay": {"fixedDelay": "2s", "percentage": {"value": 10.0}},
                      "abort": {"httpStatus": 503, "percentage": {"value": 1}}},
            "mirror": {"host": "reviews", "subset": "v1"},
            "mirrorPercentage": {"value": 5.5},
            "rewrite": {"uri": "/", "authority": "x"},
        }, {
            "redirect": {"uri": "/new", "redirectCode": 301},
        }, {
            "directResponse": {"status": 418, "body": {"string": "teapot"}},
        }],
        "tcp": [{"match": [{"port": 9000}], "route": [{"destination": {"host": "db"}}]}],
    },
}

DR = {
    "apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule",
    "metadata": {"name": "reviews", "namespace": "demo"},
    "spec": {
        "host": "reviews.demo.svc.cluster.local",
        "trafficPolicy": {
            "loadBalancer": {"consistentHash": {"httpHeaderName": "x-user",
                                                "ringHash": {"minimumRingSize": 1024}}},
            "connectionPool": {"tcp": {"maxConnections": 100, "connectTimeout": "1s"},
                               "http": {"http1MaxPendingRequests": 10,
                                        "maxRequestsPerConnection": 1}},
            "outlierDetection": {"consecutive5xxErrors": 5, "interval": "10s",
                                 "baseEjectionTime": "30s", "maxEjectionPercent": 50},
        },
        "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                    {"name": "v2", "labels": {"version": "v2"},
                     "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}}}],
    },
}


def test_virtual_service_and_destination_rule_parse_completely() -> None:
    from ztunnel_py.state import routing

    t = run(VS, DR)
    assert not t.problems, t.problems
    vs = next(o for o in t.snapshot.routing if isinstance(o, routing.VirtualService))
    http = vs.http[0]
    assert http.match[0].headers["end-user"].exact == "jason"
    assert http.match[0].uri == routing.StringMatch(prefix="/api")
    assert http.match[0].ignore_uri_case is True
    assert [r.weight for r in http.route] == [90, 10]
    assert http.route[0].destination.port == routing.PortSelector(9080)
    assert http.route[1].headers is not None and http.route[1].headers.request is not None
    assert http.route[1].headers.request.remove == ("x-c",)
    assert routing.parse_duration(http.timeout or "") == 1.5
    assert http.retries == routing.HTTPRetry(3, "500ms", "5xx")  # type: ignore[arg-type]
    assert http.fault is not None and http.fault.abort is not None
    assert http.fault.abort.http_status == 503
    assert http.mirror_percentage == routing.Percent(5.5)
    assert vs.http[1].redirect == routing.HTTPRedirect(uri="/new", redirect_code=301)
    assert vs.http[2].direct_response is not None
    assert vs.http[2].direct_response.body == routing.HTTPBody(string="teapot")
    assert vs.tcp[0].match[0].port == 9000
    dr = next(o for o in t.snapshot.routing if isinstance(o, routing.DestinationRule))
    tp = dr.traffic_policy
    assert tp is not None and tp.load_balancer is not None
    assert tp.load_balancer.consistent_hash is not None
    assert tp.load_balancer.consistent_hash.ring_hash == routing.RingHash(1024)
    assert tp.outlier_detection is not None and tp.outlier_detection.consecutive_5xx_errors == 5
    assert tp.connection_pool is not None and tp.connection_pool.http is not None
    assert tp.connection_pool.http.http1_max_pending_requests == 10
    v2 = dr.subset("v2")
    assert v2 is not None and v2.traffic_policy is not None
    assert v2.traffic_policy.load_balancer == routing.LoadBalancerSettings(simple="ROUND_ROBIN")


def test_gateway_api_http_route_and_istio_gateway() -> None:
    from ztunnel_py.state import routing

    t = run(
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
         "metadata": {"name": "r", "namespace": "demo"},
         "spec": {"parentRefs": [{"name": "web", "kind": "Service", "group": "", "port": 80}],
                  "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/a"}}],
                             "filters": [{"type": "RequestHeaderModifier",
                                          "requestHeaderModifier": {
                                              "set": [{"name": "x", "value": "y"}]}}],
                             "backendRefs": [{"name": "web-v1", "port": 80, "weight": 80},
                                             {"name": "web-v2", "port": 80, "weight": 20}]}]}},
        {"apiVersion": "networking.istio.io/v1", "kind": "Gateway",
         "metadata": {"name": "ingress", "namespace": "demo"},
         "spec": {"selector": {"istio": "ingressgateway"},
                  "servers": [{"port": {"number": 443, "name": "https", "protocol": "HTTPS"},
                               "hosts": ["*"], "tls": {"mode": "SIMPLE",
                                                       "credentialName": "cert"}}]}},
    )
    assert not t.problems, t.problems
    route = next(o for o in t.snapshot.routing if isinstance(o, routing.KubernetesHTTPRoute))
    assert route.parent_refs[0].port == 80
    assert [b.weight for b in route.rules[0].backend_refs] == [80, 20]
    f = route.rules[0].filters[0]
    assert f.request_header_modifier is not None
    assert f.request_header_modifier.set == (routing.HTTPHeader("x", "y"),)
    gw = next(o for o in t.snapshot.routing if isinstance(o, routing.Gateway))
    assert gw.servers[0].tls is not None and gw.servers[0].tls.credential_name == "cert"


# -- rejections --------------------------------------------------------------------------


def _meta(kind: str, api: str = "v1", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": api, "kind": kind, "metadata": {"name": "x", "namespace": "demo"},
            "spec": spec}


VS_API = "networking.istio.io/v1"
AP_API = "security.istio.io/v1"

REJECTIONS: list[tuple[str, Any, str, str, str]] = [
    # (id, body, field, message fragment, hint fragment)
    ("not-a-mapping", ["a", "list"], "", "expected a Kubernetes object", "one object"),
    ("missing-kind", {"apiVersion": "v1", "metadata": {"name": "x"}}, "kind", "missing kind",
     "apiVersion and kind"),
    ("unknown-kind", _meta("VirtualServce", VS_API), "kind", "unknown kind", "VirtualService"),
    ("bad-api-version", _meta("VirtualService", "networking.istio.io/v2"), "apiVersion",
     "unsupported apiVersion", "networking.istio.io/v1"),
    ("missing-metadata", {"apiVersion": "v1", "kind": "Pod"}, "metadata", "missing metadata",
     "metadata.name"),
    ("missing-name", {"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "d"}},
     "metadata.name", "metadata.name", ""),
    ("spec-not-mapping", {**_meta("Service"), "spec": [1]}, "spec", "expected a mapping", ""),
    ("label-not-string", {**pod("a"), "metadata": {"name": "a", "namespace": "demo",
                                                   "labels": {"version": 2}}},
     "metadata.labels.version", "must be strings", "quote it"),
    ("bad-pod-ip", pod("a", "10.0.0.300"), "status.podIP", "not an IP address", "IPv4"),
    ("node-not-string", {**pod("a"), "spec": {"nodeName": ["n1"]}}, "spec.nodeName",
     "expected a string", ""),
    ("bad-container-port", {**pod("a"), "spec": {"containers": [{"ports": [
        {"containerPort": 70000}]}]}}, "spec.containers[0].ports[0].containerPort",
     "port number", ""),
    ("bad-service-port", svc(target=0), "spec.ports[0].targetPort", "port number", ""),
    ("bad-cluster-ip", svc(vip="banana"), "spec.clusterIPs[0]", "not an IP address", ""),
    ("vs-unknown-field", _meta("VirtualService", VS_API, hosts=["a"], htp=[]), "spec.htp",
     "unknown field 'htp'", "did you mean 'http'"),
    ("vs-wrong-type", _meta("VirtualService", VS_API, hosts="a"), "spec.hosts",
     "expected a list", "YAML list"),
    ("vs-nested-wrong-type", _meta("VirtualService", VS_API, http=[{"route": [
        {"destination": {"host": "a"}, "weight": "50"}]}]), "spec.http[0].route[0].weight",
     "expected an integer", "remove the quotes"),
    ("vs-bad-duration", _meta("VirtualService", VS_API, http=[{"timeout": "5"}]),
     "spec.http[0].timeout", "duration", "unit"),
    ("dr-unknown-field", _meta("DestinationRule", VS_API, host="a", trafficPolicy={
        "loadBalancer": {"simpel": "RANDOM"}}), "spec.trafficPolicy.loadBalancer.simpel",
     "unknown field", "did you mean 'simple'"),
    ("ap-bad-action", _meta("AuthorizationPolicy", AP_API, action="ALOW"), "spec.action",
     "one of", "did you mean 'ALLOW'"),
    ("ap-custom-without-provider", _meta("AuthorizationPolicy", AP_API, action="CUSTOM"),
     "spec.provider", "needs a provider", "provider.name"),
    ("ap-selector-and-target-ref", _meta("AuthorizationPolicy", AP_API,
                                         selector={"matchLabels": {"a": "b"}},
                                         targetRef={"kind": "Service", "name": "s"}),
     "spec.targetRefs", "cannot be used together", ""),
    ("ap-unknown-source-field", _meta("AuthorizationPolicy", AP_API, rules=[
        {"from": [{"source": {"principal": ["x"]}}]}]), "spec.rules[0].from[0].source.principal",
     "unknown field", "did you mean 'principals'"),
    ("pa-port-level-without-selector", _meta("PeerAuthentication", AP_API,
                                             portLevelMtls={"80": {"mode": "DISABLE"}}),
     "spec.portLevelMtls", "needs a workload selector", "matchLabels"),
    ("pa-bad-mode", _meta("PeerAuthentication", AP_API, mtls={"mode": "strict"}),
     "spec.mtls.mode", "one of", "STRICT"),
    ("namespace-not-string", {"apiVersion": "v1", "kind": "Pod",
                              "metadata": {"name": "a", "namespace": 7}},
     "metadata.namespace", "expected a string", ""),
    ("container-not-mapping", {**pod("a"), "spec": {"containers": ["c"]}}, "spec.containers[0]",
     "expected a mapping", ""),
    ("empty-target-port", svc(target=""), "spec.ports[0].targetPort",
     "port number or a port name", ""),
    ("slice-bad-port", {**slice_("web"), "ports": [{"name": "http", "port": "80"}]},
     "ports[0].port", "port number", ""),
    ("slice-bad-address", slice_("web", {"addresses": ["not-an-ip"]}),
     "endpoints[0].addresses[0]", "not an IP address", ""),
    ("service-account-bad-label", {"apiVersion": "v1", "kind": "ServiceAccount",
                                   "metadata": {"name": "sa", "namespace": "demo",
                                                "labels": {"a": True}}},
     "metadata.labels.a", "must be strings", "quote it"),
    ("httproute-port-not-integer", _meta("HTTPRoute", "gateway.networking.k8s.io/v1",
                                           parentRefs=[{"port": "80"}]),
     "spec.parentRefs[0].port", "expected an integer", ""),
]


@pytest.mark.parametrize(("body", "field", "message", "hint"),
                         [r[1:] for r in REJECTIONS], ids=[r[0] for r in REJECTIONS])
def test_rejections(body: Any, field: str, message: str, hint: str) -> None:
    t = translate([KubeObject("bad.yaml#doc2", body)], trust_domain=TD,
                  root_namespace="istio-system")
    errs = errors(t)
    assert errs, t.problems
    matching = [p for p in errs if p.field == field and message in p.message and hint in p.hint]
    assert matching, [str(p) for p in errs]
    assert all(p.origin == "bad.yaml#doc2" for p in errs)
    assert "bad.yaml#doc2" in str(matching[0])
    # a rejected object contributes nothing
    snap = t.snapshot
    assert not (snap.workloads or snap.services or snap.routing
                or snap.authorization_policies or snap.peer_authentications)


def test_bad_object_dropped_rest_applies() -> None:
    t = run(ns(), pod("a"), {**pod("b", "10.0.0.2"), "spec": {"nodeName": 3}}, pod("c", "10.0.0.3"))
    assert [w.name for w in t.snapshot.workloads] == ["a", "c"]
    assert len(errors(t)) == 1


def test_unsupported_istio_kind_is_a_warning() -> None:
    t = run({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
             "metadata": {"name": "ext", "namespace": "demo"}})
    assert [(p.severity, p.kind, p.name) for p in t.problems] == [
        ("warning", "ServiceEntry", "demo/ext")]


def test_ordinary_kubernetes_kinds_are_ignored_silently() -> None:
    t = run({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}},
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}})
    assert t.problems == [] and t.snapshot == run().snapshot


def test_duplicate_object_is_rejected() -> None:
    t = run(pod("a"), pod("a", "10.0.0.2"))
    assert [w.ips for w in t.snapshot.workloads] == [("10.0.0.1",)]
    (e,) = errors(t)
    assert "duplicate Pod demo/a" in e.message and "t.yaml#doc1" in e.message


def test_duplicate_pod_ip_is_rejected() -> None:
    t = run(pod("a"), pod("b"))
    assert [w.name for w in t.snapshot.workloads] == ["a"]
    (e,) = errors(t)
    assert e.name == "demo/b" and "10.0.0.1" in e.message and "Pod demo/a" in e.message


def test_duplicate_service_vip_is_rejected() -> None:
    t = run(svc("a"), svc("b"), pod("p", "10.96.0.9"), svc("c", "10.96.0.9"))
    assert [s.name for s in t.snapshot.services] == ["a"]
    assert {e.name for e in errors(t)} == {"demo/b", "demo/c"}


def test_virtual_service_subset_without_destination_rule() -> None:
    dr = {**DR, "spec": {**DR["spec"], "subsets": [{"name": "v1"}]}}
    t = run(VS, dr)
    errs = errors(t)
    assert [(e.kind, e.field) for e in errs] == [
        ("VirtualService", "spec.http[0].route[0].destination.subset")]
    assert "'v2'" in errs[0].message and "DestinationRule" in errs[0].hint
    # the VirtualService still applies (as in Istio): only the reference is reported
    assert any(type(o).__name__ == "VirtualService" for o in t.snapshot.routing)


def test_list_items_must_be_a_list() -> None:
    t = run({"apiVersion": "v1", "kind": "List", "items": {"a": 1}})
    assert [(p.kind, p.field) for p in errors(t)] == [("List", "items")]


def test_duplicate_uid_is_rejected() -> None:
    a, b = pod("a"), pod("b", "10.0.0.2")
    a["metadata"]["uid"] = b["metadata"]["uid"] = "same"
    t = run(a, b)
    assert [w.name for w in t.snapshot.workloads] == ["a"]
    (e,) = errors(t)
    assert e.field == "metadata.uid" and e.name == "demo/b"


def test_endpoint_slice_without_service() -> None:
    t = run(slice_("ghost"))
    assert [p.severity for p in t.problems] == ["warning"]
    assert "ghost" in t.problems[0].message


def test_list_kind_is_expanded() -> None:
    t = run({"apiVersion": "v1", "kind": "List", "items": [pod("a"), pod("b", "10.0.0.2")]})
    assert [w.name for w in t.snapshot.workloads] == ["a", "b"]


def test_translation_is_deterministic() -> None:
    bodies = [ns(), pod("b", "10.0.0.2", labels={"app": "web"}),
              pod("a", labels={"app": "web"}), svc(), VS, DR]
    one = run(*bodies)
    two = translate(reversed([KubeObject(f"t.yaml#doc{i}", b) for i, b in enumerate(bodies, 1)]),
                    trust_domain=TD, root_namespace="istio-system")
    assert one.snapshot == two.snapshot and one.problems == two.problems


def test_keeping_last_good_version_of_a_broken_object() -> None:
    good = translate([KubeObject("a.yaml#doc1", pod("a")), KubeObject("b.yaml#doc1", pod(
        "b", "10.0.0.2"))], trust_domain=TD, root_namespace="istio-system")
    broken = {**pod("a", "10.0.0.7"), "spec": {"nodeName": ["oops"]}}
    t = translate_keeping_last_good(
        [KubeObject("a.yaml#doc1", broken), KubeObject("b.yaml#doc1", pod("b", "10.0.0.3"))],
        good.accepted, trust_domain=TD, root_namespace="istio-system")
    by_name = {w.name: w for w in t.snapshot.workloads}
    assert by_name["a"].ips == ("10.0.0.1",)  # kept
    assert by_name["b"].ips == ("10.0.0.3",)  # the good edit applies
    assert any(p.field == "spec.nodeName" for p in errors(t))
    assert any("keeping the last good version" in p.message for p in t.problems)
    # a deleted object is not revived
    t2 = translate_keeping_last_good([KubeObject("b.yaml#doc1", pod("b"))], good.accepted,
                                     trust_domain=TD, root_namespace="istio-system")
    assert [w.name for w in t2.snapshot.workloads] == ["b"]
