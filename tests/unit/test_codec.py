"""The wire codec: every model kind round-trips; anything off is refused with its path."""

from __future__ import annotations

import json

import pytest

from tests.unit.test_translate import DR, VS, ns, pod, svc, waypoint_gw
from ztunnel_py.controller.translate import KubeObject, translate
from ztunnel_py.state import codec
from ztunnel_py.state.model import Endpoint, FrozenMap, Service, ServicePort, Workload


def full_snapshot():  # type: ignore[no-untyped-def]
    bodies = [
        ns(**{"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "wp"}),
        waypoint_gw("wp"),
        pod("a", ["10.0.0.1", "fd00::1"], labels={"app": "web"}),
        svc(vip=["10.96.0.1", "fd00:96::1"]),
        VS, DR,
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
         "metadata": {"name": "ap", "namespace": "demo"},
         "spec": {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["x"]}}]}]}},
        {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
         "metadata": {"name": "pa", "namespace": "demo"},
         "spec": {"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "STRICT"},
                  "portLevelMtls": {"8080": {"mode": "DISABLE"}}}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
         "metadata": {"name": "r", "namespace": "demo"},
         "spec": {"parentRefs": [{"name": "web", "kind": "Service"}],
                  "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}},
        {"apiVersion": "networking.istio.io/v1", "kind": "Gateway",
         "metadata": {"name": "in", "namespace": "demo"},
         "spec": {"servers": [{"port": {"number": 80, "protocol": "HTTP"}, "hosts": ["*"]}]}},
    ]
    t = translate([KubeObject(f"f#{i}", b) for i, b in enumerate(bodies)],
                  trust_domain="cluster.local", root_namespace="istio-system")
    assert not [p for p in t.problems if p.severity == "error"], t.problems
    return t.snapshot


def test_every_kind_round_trips() -> None:
    snap = full_snapshot()
    objs = codec.resources(snap)
    assert {k for k, _ in objs} == set(codec.KINDS)
    for (kind, key), obj in objs.items():
        body = codec.encode_resource(obj)
        assert codec.decode_resource(kind, key, body) == obj
    again = codec.snapshot_from(
        [codec.decode_resource(k, key, codec.encode_resource(o)) for (k, key), o in objs.items()],
        root_namespace=snap.root_namespace)
    assert codec.snapshot_to_json(again) == codec.snapshot_to_json(snap)


def test_defaults_are_omitted_and_int_keys_survive() -> None:
    s = Service("web", "demo", "web.demo.svc.cluster.local", ("10.96.0.1",),
                (ServicePort(80, "http"),),
                (Endpoint("demo/a", "10.0.0.1", FrozenMap({80: 8080})),))
    raw = json.loads(codec.encode_resource(s))
    assert "waypoint" not in raw and "labels" not in raw
    assert raw["endpoints"][0] == {"workload_uid": "demo/a", "address": "10.0.0.1",
                                   "ports": {"80": 8080}}
    back = codec.decode_resource("service", "demo/web", codec.encode_resource(s))
    assert back == s and back.ports[0].target_port == "http"
    assert back.endpoints[0].ports[80] == 8080


W = Workload("demo/a", "a", "demo", "sa", "n1", ("10.0.0.1",))


@pytest.mark.parametrize(
    ("kind", "key", "body", "fragment"),
    [
        ("workload", "demo/a", b"{not json", "not JSON"),
        ("gizmo", "demo/a", b"{}", "unknown resource kind 'gizmo'"),
        ("workload", "demo/b", codec.encode_resource(W), "carries key 'demo/a'"),
        ("workload", "demo/a", json.dumps({**json.loads(codec.encode_resource(W)),
                                           "colour": "red"}).encode(), "colour"),
        ("workload", "demo/a", json.dumps({**json.loads(codec.encode_resource(W)),
                                           "ips": "10.0.0.1"}).encode(), "ips: expected a list"),
        ("workload", "demo/a", json.dumps({**json.loads(codec.encode_resource(W)),
                                           "enrolled": 1}).encode(), "enrolled"),
        ("workload", "demo/a", json.dumps({"uid": "demo/a"}).encode(), "missing required"),
        ("peer_authentication", "d/p", json.dumps({"name": "p", "namespace": "d",
                                                   "mode": "SORTA"}).encode(), "mode"),
    ],
)
def test_decode_is_strict(kind: str, key: str, body: bytes, fragment: str) -> None:
    with pytest.raises(codec.CodecError, match=fragment):
        codec.decode_resource(kind, key, body)


def test_yaml_schema_collects_every_issue_with_paths() -> None:
    from ztunnel_py.state.routing import VirtualService

    schema = codec.Schema(camel_case=True)
    _value, issues = schema.decode(
        VirtualService,
        {"name": "v", "namespace": "d", "hosts": [1], "http": [{"timeout": "x", "bogus": 1}]},
    )
    assert [i.path for i in issues] == ["hosts[0]", "http[0].timeout", "http[0].bogus"]


def _workload_body(**change: object) -> bytes:
    raw = json.loads(codec.encode_resource(
        Workload("demo/a", "a", "demo", "sa", "n1", ("10.0.0.1",),
                 labels=FrozenMap({"app": "web"}), named_ports=FrozenMap({"http": 8080}))))
    raw.update(change)
    return json.dumps(raw).encode()


@pytest.mark.parametrize(
    ("kind", "key", "body", "fragment"),
    [
        # each shape the generated fast path accepts in place, broken one way
        ("workload", "demo/a", _workload_body(ips=["10.0.0.1", 7]), "ips[1]: expected a string"),
        ("workload", "demo/a", _workload_body(labels={"app": 1}), "labels.app: expected a string"),
        ("workload", "demo/a", _workload_body(labels=["app"]), "labels: expected a mapping"),
        ("workload", "demo/a", _workload_body(named_ports={"http": True}),
         "named_ports.http: expected an integer"),
        ("workload", "demo/a", _workload_body(named_ports={"http": "8080"}),
         "named_ports.http: expected an integer"),
        ("workload", "demo/a", _workload_body(name=None), "name: expected a string"),
        ("workload", "demo/a", _workload_body(healthy="yes"), "healthy: expected true or false"),
        ("workload", "demo/a", _workload_body(waypoint={"name": "wp"}),
         "waypoint.namespace: missing required"),
        ("workload", "demo/a", b"[]", "expected a mapping"),
        ("workload", "demo/a", b'{"uid": NaN}', "not JSON"),
        ("workload", "demo/a", b'{"uid": "\xff"}', "not JSON"),
        ("service", "d/s", json.dumps({
            "name": "s", "namespace": "d", "hostname": "s.d", "vips": [], "ports": [],
            "endpoints": [{"workload_uid": "d/a", "address": "10.0.0.1",
                           "ports": {"\u00b2": 80}}]}).encode(), "bad key"),
        ("service", "d/s", json.dumps({
            "name": "s", "namespace": "d", "hostname": "s.d", "vips": [], "ports": [],
            "endpoints": [{"workload_uid": "d/a", "address": "10.0.0.1",
                           "ports": {"80": 8080}, "weight": 1}]}).encode(),
         "unknown field 'weight' in Endpoint"),
    ],
)
def test_fast_path_hands_every_problem_to_the_careful_path(
    kind: str, key: str, body: bytes, fragment: str
) -> None:
    with pytest.raises(codec.CodecError) as info:
        codec.decode_resource(kind, key, body)
    assert fragment in str(info.value)


def test_decoded_maps_are_private_frozen_and_hashable() -> None:
    body = _workload_body(labels={"app": "web", "version": "v1"})
    a = codec.decode_resource("workload", "demo/a", body)
    b = codec.decode_resource("workload", "demo/a", body)
    assert a == b and hash(a) == hash(b) and a.labels is not b.labels
    assert dict(a.labels) == {"app": "web", "version": "v1"} and a.named_ports["http"] == 8080
    s = Service("web", "demo", "web.demo.svc.cluster.local", ("10.96.0.1",),
                (ServicePort(80, 8080),),
                (Endpoint("demo/a", "10.0.0.1", FrozenMap({80: 8080, 443: 8443})),))
    back = codec.decode_resource("service", "demo/web", codec.encode_resource(s))
    assert back == s and set(back.endpoints[0].ports) == {80, 443}


def test_yaml_schema_copies_the_callers_mappings() -> None:
    from ztunnel_py.state.model import PeerAuthentication

    schema = codec.Schema(camel_case=True)
    selector = {"app": "web"}
    value, issues = schema.decode(PeerAuthentication,
                                  {"name": "p", "namespace": "d", "selector": selector})
    assert not issues
    selector["app"] = "changed"
    assert value.selector == {"app": "web"}
