"""L7 AuthorizationPolicy at the waypoint, table-driven with Istio's documented examples."""

from __future__ import annotations

import pytest

from tests.unit.test_waypoint_engine import REVIEWS, req, table
from waypoint import authz
from waypoint.request import Peer

SLEEP = Peer("10.2.0.1", "spiffe://cluster.local/ns/front/sa/sleep")
OTHER = Peer("10.3.0.1", "spiffe://cluster.local/ns/other/sa/curl")


def _policy(action: str, rules: str, target: str = "{kind: Gateway, group: "
            "gateway.networking.k8s.io, name: waypoint}") -> str:
    return f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: p-{action.lower()}, namespace: bookinfo}}
spec:
  targetRefs: [{target}]
  action: {action}
  rules:
{rules}
"""


# Istio docs (waypoint L7 policy): deny DELETE on /admin*.
DENY_ADMIN = _policy("DENY", """  - to:
    - operation: {methods: [DELETE], paths: ["/admin*"]}""")

CASES = [
    ("deny DELETE /admin", DENY_ADMIN, {"method": "DELETE", "path": "/admin/users"}, False),
    ("deny ignores query", DENY_ADMIN, {"method": "DELETE", "path": "/admin?x=1"}, False),
    ("GET /admin passes", DENY_ADMIN, {"method": "GET", "path": "/admin"}, True),
    ("DELETE elsewhere passes", DENY_ADMIN, {"method": "DELETE", "path": "/data"}, True),
    ("suffix path", _policy("DENY", "  - to: [{operation: {paths: ['*.php']}}]"),
     {"path": "/x/index.php"}, False),
    ("notPaths", _policy("ALLOW", "  - to: [{operation: {notPaths: ['/private*']}}]"),
     {"path": "/private/x"}, False),
    ("notPaths other", _policy("ALLOW", "  - to: [{operation: {notPaths: ['/private*']}}]"),
     {"path": "/public"}, True),
    ("notMethods", _policy("ALLOW", "  - to: [{operation: {notMethods: [POST]}}]"),
     {"method": "POST"}, False),
    ("hosts", _policy("ALLOW", "  - to: [{operation: {hosts: ['reviews*']}}]"),
     {"host": "reviews:9080"}, True),
    ("hosts case-insensitive", _policy("ALLOW", "  - to: [{operation: {hosts: [REVIEWS]}}]"),
     {"host": "reviews"}, True),
    ("notHosts", _policy("ALLOW", "  - to: [{operation: {notHosts: [reviews]}}]"),
     {"host": "reviews"}, False),
    ("ports", _policy("ALLOW", "  - to: [{operation: {ports: ['9080']}}]"), {"port": 9080}, True),
    ("notPorts", _policy("ALLOW", "  - to: [{operation: {notPorts: ['9080']}}]"),
     {"port": 9080}, False),
    ("allow GET from front", _policy("ALLOW", """  - from: [{source: {namespaces: [front]}}]
    to: [{operation: {methods: [GET]}}]"""), {"source": SLEEP}, True),
    ("allow GET from front, other ns", _policy("ALLOW", """  - from:
    - source: {namespaces: [front]}
    to: [{operation: {methods: [GET]}}]"""), {"source": OTHER}, False),
    ("principals", _policy("ALLOW", """  - from:
    - source: {principals: [cluster.local/ns/front/sa/sleep]}"""), {"source": SLEEP}, True),
    ("principals, unauthenticated", _policy("ALLOW", """  - from:
    - source: {principals: ["*"]}"""), {}, False),
    ("notPrincipals", _policy("DENY", """  - from:
    - source: {notPrincipals: [cluster.local/ns/front/sa/sleep]}"""), {"source": OTHER}, False),
    ("when header", _policy("ALLOW", """  - when:
    - {key: "request.headers[version]", values: [v1, v2]}"""), {"headers": {"version": "v2"}},
     True),
    ("when header miss", _policy("ALLOW", """  - when:
    - {key: "request.headers[version]", values: [v1, v2]}"""), {"headers": {"version": "v3"}},
     False),
    ("when header notValues", _policy("DENY", """  - when:
    - {key: "request.headers[x-user]", notValues: [admin]}"""), {"headers": {"x-user": "bob"}},
     False),
    ("when source.namespace", _policy("ALLOW", """  - when:
    - {key: source.namespace, values: [front]}"""), {"source": SLEEP}, True),
    ("when source.principal", _policy("ALLOW", """  - when:
    - {key: source.principal, values: ["cluster.local/ns/other/*"]}"""), {"source": OTHER},
     True),
    ("unknown when key fails closed in ALLOW", _policy("ALLOW", """  - when:
    - {key: "request.auth.claims[iss]", values: [x]}"""), {}, False),
    ("unknown when key fails closed in DENY", _policy("DENY", """  - when:
    - {key: "request.auth.claims[iss]", values: [x]}"""), {}, False),
    ("ALLOW with no matching rule denies", _policy("ALLOW", """  - to:
    - operation: {methods: [GET]}"""), {"method": "PUT"}, False),
    ("policy on the service", _policy("DENY", "  - to: [{operation: {methods: [GET]}}]",
                                      "{kind: Service, group: '', name: reviews}"), {}, False),
    ("policy on another service", _policy("DENY", "  - to: [{operation: {methods: [GET]}}]",
                                          "{kind: Service, group: '', name: ratings}"), {}, True),
    ("policy on another waypoint", _policy("DENY", "  - to: [{operation: {methods: [GET]}}]",
                                           "{kind: Gateway, name: other-wp}"), {}, True),
]


@pytest.mark.parametrize(("what", "policy", "kwargs", "allowed"), CASES,
                         ids=[c[0] for c in CASES])
def test_l7_policy(what: str, policy: str, kwargs: dict[str, object], allowed: bool) -> None:
    t = table(policy)
    svc = t.service(REVIEWS)
    verdict = authz.evaluate(t.policies_for(svc), req(**kwargs))  # type: ignore[arg-type]
    assert verdict.allowed is allowed, verdict


def test_deny_wins_over_allow() -> None:
    t = table(DENY_ADMIN + "---" + _policy("ALLOW", "  - {}"))
    v = authz.evaluate(t.policies_for(t.service(REVIEWS)), req("/admin", method="DELETE"))
    assert not v.allowed and v.policy == "bookinfo/p-deny"
    v = authz.evaluate(t.policies_for(t.service(REVIEWS)), req("/x"))
    assert v.allowed and v.policy == "bookinfo/p-allow"


def test_no_policy_allows() -> None:
    t = table()
    assert authz.evaluate(t.policies_for(t.service(REVIEWS)), req()).allowed
