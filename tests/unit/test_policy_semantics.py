"""Table-driven semantics of the node agent's L4 policy (AuthorizationPolicy, PeerAuthentication).

Each case names the Istio documentation (or Istio source) it follows:

* AP_REF  istio.io/latest/docs/reference/config/security/authorization-policy/
* L4_DOC  istio.io/latest/docs/ambient/usage/l4-policy/ ("Use Layer 4 security policy")
* ISTIOD  istio/istio pilot/pkg/serviceregistry/kube/controller/ambient/authorization.go
          (how istiod converts AuthorizationPolicy for ztunnel: scope, L7 handling, when keys)
* RBAC_RS istio/ztunnel src/rbac.rs (how ztunnel matches: principals without spiffe://,
          any-of within a field, not-fields, plaintext peers have no principal or namespace)
* PA_REF  istio.io/latest/docs/reference/config/security/peer_authentication/
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest

from ztunnel_py import policy
from ztunnel_py.policy import Connection, evaluate, mtls_mode, strict
from ztunnel_py.state.model import (
    Action,
    AuthorizationPolicy,
    Condition,
    FrozenMap,
    MtlsMode,
    Operation,
    PeerAuthentication,
    PolicyTargetRef,
    Rule,
    Source,
    WaypointRef,
    Workload,
)
from ztunnel_py.state.snapshot import Snapshot

AP_REF = "AP_REF"
L4_DOC = "L4_DOC"
ISTIOD = "ISTIOD"
RBAC_RS = "RBAC_RS"
PA_REF = "PA_REF"

ROOT = "istio-system"
SLEEP = "spiffe://cluster.local/ns/bar/sa/sleep"
OTHER = "spiffe://cluster.local/ns/baz/sa/other"
FOO_CLIENT = "spiffe://cluster.local/ns/foo/sa/client"

HTTPBIN = Workload(
    uid="foo/httpbin-1",
    name="httpbin-1",
    namespace="foo",
    service_account="httpbin",
    node="node-a",
    ips=("10.0.2.9",),
    labels=FrozenMap({"app": "httpbin", "version": "v1"}),
    enrolled=True,
)


def ap(
    name: str = "p",
    namespace: str = "foo",
    action: Action = Action.ALLOW,
    rules: tuple[Rule, ...] = (),
    selector: dict[str, str] | None = None,
    target_refs: tuple[PolicyTargetRef, ...] = (),
) -> AuthorizationPolicy:
    return AuthorizationPolicy(
        name=name,
        namespace=namespace,
        action=action,
        selector=None if selector is None else FrozenMap(selector),
        target_refs=target_refs,
        rules=rules,
    )


def rule(
    *sources: Source, to: tuple[Operation, ...] = (), when: tuple[Condition, ...] = ()
) -> Rule:
    return Rule(sources=sources, operations=to, conditions=when)


def pa(
    name: str,
    namespace: str,
    mode: MtlsMode,
    selector: dict[str, str] | None = None,
    ports: dict[int, MtlsMode] | None = None,
) -> PeerAuthentication:
    return PeerAuthentication(
        name=name,
        namespace=namespace,
        selector=None if selector is None else FrozenMap(selector),
        mode=mode,
        port_level=FrozenMap(ports or {}),
    )


ALLOW_ALL = rule()  # "{}": matches every connection


@dataclass(frozen=True)
class Case:
    id: str
    doc: str  # the Istio documentation or source the case follows
    policies: tuple[AuthorizationPolicy, ...] = ()
    identity: str | None = SLEEP
    src_ip: str = "10.0.1.5"
    port: int = 8000
    dst_ip: str = "10.0.2.9"
    allowed: bool = True
    reason_has: tuple[str, ...] = ()
    audit: tuple[str, ...] = ()
    peer_auth: tuple[PeerAuthentication, ...] = field(default=())


CASES = [
    # -- scope --------------------------------------------------------------------------
    Case("no-policy-allows", AP_REF + ": no ALLOW policy for the workload: allow",
         reason_has=("no ALLOW policy applies",)),
    Case("allow-nothing-namespace", AP_REF + ": example allow-nothing (spec {} denies all)",
         policies=(ap("allow-nothing"),), allowed=False,
         reason_has=("foo/allow-nothing has no rules",)),
    Case("allow-nothing-root-is-mesh-wide", AP_REF + ": a policy in the root namespace applies "
         "to all workloads in the mesh", policies=(ap("allow-nothing", ROOT),), allowed=False),
    Case("other-namespace-does-not-apply", AP_REF + ": policy applies to its own namespace only",
         policies=(ap("allow-nothing", "bar"),)),
    Case("selector-allows-principal", L4_DOC + ": allow-curl-to-httpbin (selector app=httpbin)",
         policies=(ap(selector={"app": "httpbin"}, rules=(rule(Source(principals=(
             "cluster.local/ns/bar/sa/sleep",))),)),)),
    Case("selector-denies-other-principal", L4_DOC + ": traffic from all other sources is denied",
         policies=(ap(selector={"app": "httpbin"}, rules=(rule(Source(principals=(
             "cluster.local/ns/bar/sa/sleep",))),)),), identity=OTHER, allowed=False,
         reason_has=("no ALLOW policy matched: foo/p",)),
    Case("selector-not-matching-does-not-apply", AP_REF + ": selector picks the workloads",
         policies=(ap(selector={"app": "productpage"}),)),
    Case("selector-label-value-must-match", AP_REF + ": matchLabels is an exact label match",
         policies=(ap(selector={"app": "httpbin", "version": "v2"}),)),
    Case("root-selector-applies-in-every-namespace",
         ISTIOD + ": selector policies of the root namespace select in all namespaces",
         policies=(ap("root-sel", ROOT, selector={"app": "httpbin"}),), allowed=False),
    Case("empty-selector-selects-all", AP_REF + ": an empty matchLabels selects every workload",
         policies=(ap(selector={}),), allowed=False),
    Case("target-refs-are-for-waypoints", ISTIOD + ": TargetRef is not intended for ztunnel; "
         "L4_DOC: attached policies are enforced by the waypoint",
         policies=(ap(target_refs=(PolicyTargetRef("Service", "httpbin"),)),)),
    # -- actions and their order ---------------------------------------------------------
    Case("deny-all", AP_REF + ": example deny-all (action DENY, rules [{}])",
         policies=(ap("deny-all", action=Action.DENY, rules=(ALLOW_ALL,)),), allowed=False,
         reason_has=("denied by DENY policy foo/deny-all (rule 1)",)),
    Case("deny-without-rules-never-matches", AP_REF + ": rules not set: the match never occurs",
         policies=(ap("d", action=Action.DENY),)),
    Case("allow-all", AP_REF + ": example allow-all (rules [{}])",
         policies=(ap("allow-all", rules=(ALLOW_ALL,)),),
         reason_has=("allowed by ALLOW policy foo/allow-all (rule 1)",)),
    Case("deny-over-allow", AP_REF + ": DENY policies are evaluated first",
         policies=(ap("allow-all", rules=(ALLOW_ALL,)),
                   ap("deny-all", action=Action.DENY, rules=(ALLOW_ALL,))), allowed=False),
    Case("root-deny-over-namespace-allow", AP_REF + ": DENY first, whatever the scope",
         policies=(ap("allow-all", rules=(ALLOW_ALL,)),
                   ap("deny", ROOT, action=Action.DENY,
                      rules=(rule(Source(namespaces=("bar",))),))),
         allowed=False, reason_has=("istio-system/deny",)),
    Case("any-allow-policy-suffices", AP_REF + ": allow if any ALLOW policy matches",
         policies=(ap("a", rules=(rule(Source(namespaces=("nope",))),)),
                   ap("b", rules=(rule(Source(namespaces=("bar",))),))),
         reason_has=("foo/b",)),
    Case("audit-never-denies", AP_REF + ": AUDIT only decides whether to audit",
         policies=(ap("audit-all", action=Action.AUDIT, rules=(ALLOW_ALL,)),),
         audit=("foo/audit-all",)),
    Case("audit-is-reported-beside-a-deny", AP_REF + ": AUDIT is independent of ALLOW/DENY",
         policies=(ap("audit", action=Action.AUDIT, rules=(rule(Source(namespaces=("bar",))),)),
                   ap("allow-nothing")), allowed=False, audit=("foo/audit",)),
    Case("audit-not-matching-is-silent", AP_REF + ": AUDIT rules match like any rule",
         policies=(ap("audit", action=Action.AUDIT, rules=(rule(Source(namespaces=("x",))),)),)),
    Case("custom-is-refused", ISTIOD + ": ztunnel does not support the CUSTOM action",
         policies=(ap("ext", action=Action.CUSTOM, rules=(ALLOW_ALL,)),)),
    # -- from.source ---------------------------------------------------------------------
    Case("principal-prefix", AP_REF + ": principals support prefix match (abc*)",
         policies=(ap(rules=(rule(Source(principals=("cluster.local/ns/bar/*",))),)),)),
    Case("principal-suffix", AP_REF + ": principals support suffix match (*abc)",
         policies=(ap(rules=(rule(Source(principals=("*/sa/sleep",))),)),)),
    Case("principal-presence-requires-mtls", AP_REF + ": principals [\"*\"] requires mTLS; "
         "RBAC_RS: a plaintext peer has no principal",
         policies=(ap(rules=(rule(Source(principals=("*",))),)),), identity=None, allowed=False),
    Case("principal-with-spiffe-scheme-never-matches",
         RBAC_RS + ": principals are matched without spiffe:// (cluster.local/ns/x/sa/y)",
         policies=(ap(rules=(rule(Source(principals=(SLEEP,))),)),), allowed=False),
    Case("not-principals-deny-others", AP_REF + ": notPrincipals is a negative match",
         policies=(ap(action=Action.DENY, rules=(rule(Source(not_principals=(
             "cluster.local/ns/bar/sa/sleep",))),)),), identity=OTHER, allowed=False),
    Case("not-principals-spare-the-listed", AP_REF + ": notPrincipals is a negative match",
         policies=(ap(action=Action.DENY, rules=(rule(Source(not_principals=(
             "cluster.local/ns/bar/sa/sleep",))),)),)),
    Case("namespaces-allow", AP_REF + ": from.source.namespaces (allow one namespace)",
         policies=(ap(rules=(rule(Source(namespaces=("bar",))),)),)),
    Case("namespaces-deny-others", AP_REF + ": from.source.namespaces (allow one namespace)",
         policies=(ap(rules=(rule(Source(namespaces=("bar",))),)),), identity=OTHER,
         allowed=False),
    Case("namespaces-prefix", AP_REF + ": namespaces support prefix match",
         policies=(ap(rules=(rule(Source(namespaces=("ba*",))),)),), identity=OTHER),
    Case("not-namespaces-deny", AP_REF + ": example: deny requests not from namespace foo "
         "(DENY with notNamespaces)", policies=(ap(action=Action.DENY, rules=(rule(Source(
             not_namespaces=("foo",))),)),), allowed=False),
    Case("not-namespaces-spare", AP_REF + ": deny requests not from namespace foo",
         policies=(ap(action=Action.DENY, rules=(rule(Source(not_namespaces=("foo",))),)),),
         identity=FOO_CLIENT),
    Case("not-namespaces-catches-plaintext", RBAC_RS + ": plaintext has no namespace",
         policies=(ap(action=Action.DENY, rules=(rule(Source(not_namespaces=("foo",))),)),),
         identity=None, allowed=False),
    Case("ip-blocks-cidr", AP_REF + ": ipBlocks (CIDR)",
         policies=(ap(rules=(rule(Source(ip_blocks=("10.0.1.0/24",))),)),)),
    Case("ip-blocks-single-ip", AP_REF + ": ipBlocks example 1.2.3.4 (a single IP)",
         policies=(ap(rules=(rule(Source(ip_blocks=("1.2.3.4", "5.6.7.0/24"))),)),),
         src_ip="1.2.3.4"),
    Case("ip-blocks-miss", AP_REF + ": ipBlocks example 1.2.3.4 (a single IP)",
         policies=(ap(rules=(rule(Source(ip_blocks=("1.2.3.4", "5.6.7.0/24"))),)),),
         src_ip="1.2.3.5", allowed=False),
    Case("not-ip-blocks", AP_REF + ": notIpBlocks excludes inside ipBlocks",
         policies=(ap(rules=(rule(Source(ip_blocks=("10.0.0.0/8",),
                                          not_ip_blocks=("10.0.1.0/24",))),)),), allowed=False),
    Case("ipv6-block", AP_REF + ": ipBlocks accept IPv6 CIDRs",
         policies=(ap(rules=(rule(Source(ip_blocks=("fd00::/64",))),)),), src_ip="fd00::7"),
    Case("remote-ip-blocks-are-http", ISTIOD + ": remoteIpBlocks is an HTTP attribute "
         "(X-Forwarded-For); the ALLOW rule is omitted",
         policies=(ap(rules=(rule(Source(remote_ip_blocks=("10.0.1.0/24",))),)),),
         allowed=False, reason_has=("remoteIpBlocks",)),
    Case("source-fields-and", AP_REF + ": all fields of a source must match",
         policies=(ap(rules=(rule(Source(namespaces=("bar",), ip_blocks=("192.168.0.0/16",))),)),),
         allowed=False),
    Case("sources-or", AP_REF + ": any source of a rule may match",
         policies=(ap(rules=(rule(Source(namespaces=("x",)), Source(ip_blocks=("10.0.1.5",))),)),)),
    # -- to.operation --------------------------------------------------------------------
    Case("ports-allow", L4_DOC + ": ports are an L4 attribute",
         policies=(ap(rules=(rule(to=(Operation(ports=("8000",)),)),)),)),
    Case("ports-miss", L4_DOC + ": ports are an L4 attribute",
         policies=(ap(rules=(rule(to=(Operation(ports=("8000",)),)),)),), port=9000,
         allowed=False),
    Case("not-ports-deny", AP_REF + ": notPorts",
         policies=(ap(action=Action.DENY, rules=(rule(to=(Operation(not_ports=("8000",)),)),)),),
         port=9000, allowed=False),
    Case("not-ports-spare", AP_REF + ": notPorts",
         policies=(ap(action=Action.DENY, rules=(rule(to=(Operation(not_ports=("8000",)),)),)),)),
    Case("from-and-to", AP_REF + ": from, to and when must all match",
         policies=(ap(rules=(rule(Source(namespaces=("bar",)),
                                  to=(Operation(ports=("9000",)),)),)),),
         allowed=False),
    # -- when (the L4 keys ztunnel supports) --------------------------------------------
    Case("when-source-ip", ISTIOD + ": l4WhenAttributes source.ip",
         policies=(ap(rules=(rule(when=(Condition("source.ip", ("10.0.1.0/24",)),)),)),)),
    Case("when-destination-port-not-values", ISTIOD + ": destination.port notValues",
         policies=(ap(rules=(rule(when=(Condition("destination.port", not_values=("8000",)),)),)),),
         allowed=False),
    Case("when-source-namespace", ISTIOD + ": l4WhenAttributes source.namespace",
         policies=(ap(rules=(rule(when=(Condition("source.namespace", ("bar",)),)),)),)),
    Case("when-source-principal", ISTIOD + ": l4WhenAttributes source.principal",
         policies=(ap(rules=(rule(when=(Condition("source.principal", ("*/sa/other",)),)),)),),
         allowed=False),
    Case("when-destination-ip", ISTIOD + ": l4WhenAttributes destination.ip",
         policies=(ap(rules=(rule(when=(Condition("destination.ip", ("10.0.2.0/24",)),)),)),)),
    Case("when-http-header-drops-allow-rule", ISTIOD + ": L7 when keys never match for ALLOW",
         policies=(ap(rules=(rule(Source(namespaces=("bar",)), when=(
             Condition("request.headers[x-token]", ("a",)),)),)),), allowed=False,
         reason_has=("when request.headers[x-token]",)),
    Case("when-connection-sni-is-not-l4-for-ztunnel", ISTIOD + ": connection.sni is not in "
         "ztunnel's l4WhenAttributes", policies=(ap(rules=(rule(when=(
             Condition("connection.sni", ("httpbin.foo",)),)),)),), allowed=False),
    # -- HTTP attributes on the node agent ---------------------------------------------
    Case("allow-with-methods-is-omitted", L4_DOC + ": L7 attributes without a waypoint fail "
         "safe; ISTIOD: ALLOW rules with HTTP attributes are omitted",
         policies=(ap(rules=(rule(Source(namespaces=("bar",)),
                                  to=(Operation(methods=("GET",)),)),)),),
         allowed=False, reason_has=("methods", "targetRefs")),
    Case("allow-keeps-its-l4-rules", ISTIOD + ": only the rules with HTTP attributes are omitted",
         policies=(ap(rules=(rule(to=(Operation(paths=("/admin",)),)),
                             rule(Source(namespaces=("bar",))))),),
         reason_has=("(rule 2)",)),
    Case("deny-with-methods-is-broader", ISTIOD + ": DENY policy with HTTP attributes is enforced "
         "without the HTTP rules (more restrictive)",
         policies=(ap("deny-post", action=Action.DENY, rules=(rule(Source(namespaces=("bar",)),
                                                                   to=(Operation(methods=("POST",)),)),)),),
         allowed=False, reason_has=("enforced without methods",)),
    Case("deny-with-paths-keeps-l4-remainder", ISTIOD + ": the L4 part of the DENY rule still "
         "has to match", policies=(ap(action=Action.DENY, rules=(rule(Source(namespaces=("baz",)),
                                                                        to=(Operation(paths=("/x",)),)),)),)),
    Case("deny-with-only-paths-denies-all", L4_DOC + ": ztunnel-enforced L7 policy fails safe "
         "by becoming a DENY", policies=(ap(action=Action.DENY, rules=(rule(to=(
             Operation(paths=("/admin",)),)),)),), allowed=False),
    Case("request-principals-drop-allow-rule", ISTIOD + ": requestPrincipals need HTTP (JWT)",
         policies=(ap(rules=(rule(Source(request_principals=("*",))),)),), allowed=False,
         reason_has=("requestPrincipals",)),
    Case("l7-rule-also-on-workload-with-waypoint", ISTIOD + ": conversion ignores waypoints; "
         "selector policies are always ztunnel's", policies=(ap(rules=(rule(to=(
             Operation(methods=("GET",)),)),)),), allowed=False),
    Case("invalid-port-drops-allow-rule", "fail safe like HTTP attributes (Istio validation "
         "rejects non-numeric ports)",
         policies=(ap(rules=(rule(to=(Operation(ports=("http",)),)),)),),
         allowed=False, reason_has=("ports 'http'",)),
    Case("invalid-port-widens-deny", "fail safe like HTTP attributes",
         policies=(ap(action=Action.DENY, rules=(rule(to=(Operation(ports=("http",)),)),)),),
         port=1234, allowed=False),
    # -- PeerAuthentication in evaluate -----------------------------------------------
    Case("plaintext-permissive-by-default", PA_REF + ": default PERMISSIVE", identity=None),
    Case("plaintext-refused-when-strict", PA_REF + ": STRICT: connection is an mTLS tunnel",
         identity=None, allowed=False, peer_auth=(pa("default", ROOT, MtlsMode.STRICT),),
         reason_has=("STRICT on port 8000", "mesh PeerAuthentication istio-system/default")),
    Case("mtls-accepted-when-strict", PA_REF + ": STRICT accepts mTLS",
         peer_auth=(pa("default", ROOT, MtlsMode.STRICT),)),
]


def _snapshot(case: Case, workload: Workload = HTTPBIN) -> Snapshot:
    return Snapshot(
        version="v1",
        workloads=(workload,),
        authorization_policies=case.policies,
        peer_authentications=case.peer_auth,
        root_namespace=ROOT,
    )


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_policy_case(case: Case) -> None:
    assert case.doc  # every case says which documentation it follows
    conn = Connection(
        src_ip=case.src_ip, dst_ip=case.dst_ip, dst_port=case.port, dst_workload=HTTPBIN,
        src_identity=case.identity, src_port=40000,
    )
    verdict = evaluate(conn, _snapshot(case))
    assert verdict.allowed is case.allowed, verdict.reason
    for text in case.reason_has:
        assert text in verdict.reason, verdict.reason
    assert verdict.audit == case.audit
    assert verdict.reason


def test_l7_case_holds_with_a_waypoint_too() -> None:
    """Istio's conversion does not look at waypoints: the same policy, same verdict."""
    with_waypoint = replace(HTTPBIN, waypoint=WaypointRef("waypoint", "foo"))
    case = next(c for c in CASES if c.id == "l7-rule-also-on-workload-with-waypoint")
    conn = Connection("10.0.1.5", "10.0.2.9", 8000, with_waypoint, SLEEP)
    assert not evaluate(conn, _snapshot(case, with_waypoint)).allowed


def test_case_count_meets_acceptance() -> None:
    assert len(CASES) + len(PA_CASES) >= 40


# -- PeerAuthentication resolution -------------------------------------------------------

STRICT, PERMISSIVE, UNSET, DISABLE = (
    MtlsMode.STRICT, MtlsMode.PERMISSIVE, MtlsMode.UNSET, MtlsMode.DISABLE
)
SEL = {"app": "httpbin"}


@dataclass(frozen=True)
class PaCase:
    id: str
    doc: str
    policies: tuple[PeerAuthentication, ...]
    port: int
    expected: MtlsMode


PA_CASES = [
    PaCase("none", PA_REF + ": no policy: PERMISSIVE", (), 8000, PERMISSIVE),
    PaCase("mesh-strict", PA_REF + ": mesh-wide policy in the root namespace",
           (pa("default", ROOT, STRICT),), 8000, STRICT),
    PaCase("namespace-overrides-mesh", PA_REF + ": namespace policy overrides the mesh",
           (pa("default", ROOT, STRICT), pa("ns", "foo", PERMISSIVE)), 8000, PERMISSIVE),
    PaCase("namespace-strict", PA_REF + ": example: namespace foo STRICT",
           (pa("default", ROOT, PERMISSIVE), pa("ns", "foo", STRICT)), 8000, STRICT),
    PaCase("workload-overrides-namespace", PA_REF + ": example: workload PERMISSIVE in a STRICT "
           "namespace", (pa("ns", "foo", STRICT), pa("wl", "foo", PERMISSIVE, SEL)), 8000,
           PERMISSIVE),
    PaCase("workload-selector-must-match", PA_REF + ": selector picks the workloads",
           (pa("ns", "foo", STRICT), pa("wl", "foo", PERMISSIVE, {"app": "other"})), 8000,
           STRICT),
    PaCase("namespace-unset-inherits-mesh", PA_REF + ": UNSET inherits from the parent",
           (pa("default", ROOT, STRICT), pa("ns", "foo", UNSET)), 8000, STRICT),
    PaCase("workload-unset-inherits-namespace", PA_REF + ": UNSET inherits from the parent",
           (pa("ns", "foo", STRICT), pa("wl", "foo", UNSET, SEL)), 8000, STRICT),
    PaCase("disable-is-permissive", "DISABLE is treated as PERMISSIVE by the node agent",
           (pa("ns", "foo", DISABLE),), 8000, PERMISSIVE),
    PaCase("port-level-permissive", PA_REF + ": example: STRICT with portLevelMtls 8080 DISABLE",
           (pa("wl", "foo", STRICT, SEL, {8080: DISABLE}),), 8080, PERMISSIVE),
    PaCase("port-level-other-port", PA_REF + ": other ports keep the workload mode",
           (pa("wl", "foo", STRICT, SEL, {8080: DISABLE}),), 9000, STRICT),
    PaCase("port-level-strict-in-permissive", ISTIOD + ": PERMISSIVE workload, STRICT port",
           (pa("wl", "foo", PERMISSIVE, SEL, {9000: STRICT}),), 9000, STRICT),
    PaCase("port-level-needs-selector", PA_REF + ": portLevelMtls only applies with a selector",
           (pa("ns", "foo", STRICT, None, {8000: PERMISSIVE}),), 8000, STRICT),
    PaCase("port-unset-inherits", ISTIOD + ": an UNSET port keeps the effective mode",
           (pa("default", ROOT, STRICT), pa("wl", "foo", UNSET, SEL, {8000: UNSET})), 8000,
           STRICT),
    PaCase("root-selector-ignored", ISTIOD + ": selector policies in the root namespace are "
           "ignored in ambient", (pa("sel", ROOT, STRICT, SEL),), 8000, PERMISSIVE),
    PaCase("other-namespace-ignored", PA_REF + ": a namespace policy applies to its namespace",
           (pa("ns", "bar", STRICT),), 8000, PERMISSIVE),
]


@pytest.mark.parametrize("case", PA_CASES, ids=[c.id for c in PA_CASES])
def test_peer_authentication_case(case: PaCase) -> None:
    snap = Snapshot(workloads=(HTTPBIN,), peer_authentications=case.policies, root_namespace=ROOT)
    assert mtls_mode(HTTPBIN, case.port, snap) is case.expected
    assert strict(HTTPBIN, case.port, snap) is (case.expected is STRICT)
    plaintext = Connection("10.0.1.5", "10.0.2.9", case.port, HTTPBIN, None)
    assert evaluate(plaintext, snap).allowed is (case.expected is PERMISSIVE)


def test_problems_explain_what_the_agent_does_differently() -> None:
    snap = Snapshot(
        authorization_policies=(
            AuthorizationPolicy("ext", "foo", Action.CUSTOM, provider="opa", rules=(ALLOW_ALL,)),
            ap("get-only", rules=(rule(to=(Operation(methods=("GET",)),)),)),
            ap("fine", rules=(rule(Source(namespaces=("bar",))),)),
            ap("waypoint", rules=(rule(to=(Operation(methods=("GET",)),)),),
               target_refs=(PolicyTargetRef("Service", "httpbin"),)),
        ),
        peer_authentications=(
            pa("ns", "foo", DISABLE), pa("mesh", ROOT, STRICT, None, {80: STRICT})
        ),
        root_namespace=ROOT,
    )
    found = {(p.key, p.message) for p in policy.problems(snap)}
    keys = [k for k, _ in found]
    assert "foo/fine" not in keys and "foo/waypoint" not in keys
    msgs = {k: [m for kk, m in found if kk == k] for k in keys}
    assert any("CUSTOM (provider 'opa') is not supported" in m for m in msgs["foo/ext"])
    assert any("methods" in m and "omitted" in m for m in msgs["foo/get-only"])
    assert any("allows nothing" in m for m in msgs["foo/get-only"])
    assert any("DISABLE is treated as PERMISSIVE" in m for m in msgs["foo/ns"])
    assert any("portLevelMtls is ignored" in m for m in msgs["istio-system/mesh"])
