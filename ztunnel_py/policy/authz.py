"""AuthorizationPolicy for the node agent: compile once, match per connection.

Semantics follow Istio ambient's ztunnel, which only sees L4:

* **Scope** — a policy in the root namespace without a selector applies to the
  whole mesh; a policy in any other namespace without a selector applies to
  that namespace; a ``selector.matchLabels`` narrows either to the workloads
  whose labels contain it (a root-namespace selector matches in every
  namespace). A policy with ``targetRefs`` is attached to a waypoint and is
  never enforced here.
* **Actions** — any matching DENY denies; otherwise, if ALLOW policies apply to
  the workload, one of them must match; otherwise the connection is allowed.
  AUDIT policies are evaluated and reported in the verdict, never enforced.
  CUSTOM is not supported by the node agent: the policy is refused (not
  applied) and :func:`problems` says so.
* **Rules** — a policy matches when any rule matches; a rule matches when all
  its clauses match: its ``from`` list (any source), its ``to`` list (any
  operation) and each ``when`` condition. Within a source or operation every
  set field must match (any value of the list), and no value of a ``not*``
  field may match. An ALLOW policy without rules matches nothing (so it denies
  every connection to the workloads it selects); a rule ``{}`` matches all.
* **HTTP attributes** — ztunnel cannot see paths, methods, hosts, request
  principals, remote IP blocks (they come from HTTP headers) or ``when`` keys
  other than source.ip / source.namespace / source.principal / destination.ip /
  destination.port. istiod converts such policies for ztunnel as follows
  (pilot/pkg/serviceregistry/kube/controller/ambient/authorization.go): "Within
  an ALLOW policy, rules matching HTTP attributes are omitted" and "DENY policy
  with HTTP attributes is enforced without the HTTP rules. This will be more
  restrictive than requested." The Istio ambient docs say the same: a policy
  with L7 attributes enforced by ztunnel "will fail safe by becoming a DENY
  policy". We do exactly that, and the verdict's reason names the attributes.
  Values Istio would reject (a port ``http``, a CIDR ``10.0.0/8``) fail safe the
  same way: the ALLOW rule is dropped, the DENY field is widened.

  One deliberate difference from ztunnel's matcher: when stripping the HTTP
  fields leaves a source or operation with no field at all (a DENY rule with
  only ``methods``), ztunnel's ``rbac.rs`` skips that empty match so the DENY
  rule stops matching anything, the opposite of what the documentation
  promises. We keep the documented behaviour: the empty remainder matches every
  connection, so the DENY is broader, never narrower.
* **Not here** — ``remoteIpBlocks`` are HTTP attributes for istiod (they come
  from X-Forwarded-For), so they are not treated like ``ipBlocks``; and
  AUDIT, which ztunnel refuses, is evaluated here for the access log only.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from ztunnel_py.policy.match import (
    IPAddress,
    IPNetwork,
    StringMatch,
    addr_in,
    parse_ip,
    parse_ip_block,
    parse_port,
    principal_of,
)
from ztunnel_py.policy.types import Connection, Verdict
from ztunnel_py.state.model import (
    Action,
    AuthorizationPolicy,
    Condition,
    Operation,
    Rule,
    Source,
    Workload,
)
from ztunnel_py.state.snapshot import Snapshot

T = TypeVar("T")

# ztunnel's l4WhenAttributes (istiod ambient/authorization.go).
L4_CONDITION_KEYS = frozenset(
    {"source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"}
)


@dataclass(frozen=True)
class Peer:
    """What a rule can see of one connection, parsed once per evaluation."""

    principal: str  # SPIFFE id without spiffe://, "" for plaintext
    namespace: str  # from the SPIFFE id, "" for plaintext
    src: IPAddress | None
    dst: IPAddress | None
    port: int

    @staticmethod
    def of(conn: Connection) -> Peer:
        return Peer(
            principal_of(conn.src_identity),
            conn.src_namespace or "",
            parse_ip(conn.src_ip),
            parse_ip(conn.dst_ip),
            conn.dst_port,
        )


def _any_string(patterns: tuple[StringMatch, ...], value: str) -> bool:
    return any(p.matches(value) for p in patterns)


@dataclass(frozen=True)
class Match:
    """One source, operation or condition: every set field must match (any of its
    values), and no value of a ``not*`` field may match."""

    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    source_ips: tuple[IPNetwork, ...] = ()
    not_source_ips: tuple[IPNetwork, ...] = ()
    destination_ips: tuple[IPNetwork, ...] = ()
    not_destination_ips: tuple[IPNetwork, ...] = ()
    ports: frozenset[int] = frozenset()
    not_ports: frozenset[int] = frozenset()

    def matches(self, peer: Peer) -> bool:
        # Cheapest checks first; every clause is a plain early return.
        if self.ports and peer.port not in self.ports:
            return False
        if peer.port in self.not_ports:
            return False
        if self.namespaces and not _any_string(self.namespaces, peer.namespace):
            return False
        if self.not_namespaces and _any_string(self.not_namespaces, peer.namespace):
            return False
        if self.principals and not _any_string(self.principals, peer.principal):
            return False
        if self.not_principals and _any_string(self.not_principals, peer.principal):
            return False
        if self.source_ips and not addr_in(peer.src, self.source_ips):
            return False
        if self.not_source_ips and addr_in(peer.src, self.not_source_ips):
            return False
        if self.destination_ips and not addr_in(peer.dst, self.destination_ips):
            return False
        return not (self.not_destination_ips and addr_in(peer.dst, self.not_destination_ips))


Clause = tuple[Match, ...]  # any of them


@dataclass(frozen=True)
class CompiledRule:
    index: int  # 1-based position in spec.rules, for messages
    clauses: tuple[Clause, ...]  # all of them
    # Attributes the node agent could not enforce and left out (DENY/AUDIT only).
    ignored: tuple[str, ...] = ()

    def matches(self, peer: Peer) -> bool:
        for clause in self.clauses:
            for m in clause:
                if m.matches(peer):
                    break
            else:
                return False
        return True


@dataclass(frozen=True)
class CompiledPolicy:
    key: str
    namespace: str
    action: Action
    selector: Mapping[str, str] | None
    rules: tuple[CompiledRule, ...]
    declared_rules: int  # len(spec.rules)
    # ALLOW rules left out because they need attributes the node agent cannot see:
    # (rule index, attributes).
    dropped: tuple[tuple[int, tuple[str, ...]], ...] = ()
    problems: tuple[str, ...] = field(default=(), compare=False)

    def selects(self, workload: Workload) -> bool:
        if self.selector is None:
            return True
        return all(workload.labels.get(k) == v for k, v in self.selector.items())

    def first_match(self, peer: Peer) -> CompiledRule | None:
        for rule in self.rules:
            if rule.matches(peer):
                return rule
        return None


# -- compiling -------------------------------------------------------------------------


def _unsupported_source(src: Source) -> list[str]:
    names = (
        ("requestPrincipals", src.request_principals),
        ("notRequestPrincipals", src.not_request_principals),
        ("remoteIpBlocks", src.remote_ip_blocks),
        ("notRemoteIpBlocks", src.not_remote_ip_blocks),
    )
    return [name for name, values in names if values]


def _unsupported_operation(op: Operation) -> list[str]:
    names = (
        ("hosts", op.hosts),
        ("notHosts", op.not_hosts),
        ("methods", op.methods),
        ("notMethods", op.not_methods),
        ("paths", op.paths),
        ("notPaths", op.not_paths),
    )
    return [name for name, values in names if values]


class _Builder:
    """Parses the values of one rule, remembering what it could not use."""

    def __init__(self) -> None:
        self.invalid: list[str] = []

    def _values(
        self, what: str, values: tuple[str, ...], parse: Callable[[str], T | None], positive: bool
    ) -> tuple[T, ...]:
        parsed: list[T] = []
        bad = False
        for v in values:
            p = parse(v)
            if p is None:
                self.invalid.append(f"{what} {v!r}")
                bad = True
            else:
                parsed.append(p)
        if bad and positive:
            # DENY/AUDIT: we cannot tell what the bad value meant, so the field is widened
            # to match anything (more restrictive). ALLOW drops the whole rule.
            return ()
        return tuple(parsed)

    def strings(self, values: tuple[str, ...]) -> tuple[StringMatch, ...]:
        return tuple(StringMatch.parse(v) for v in values)

    def ips(self, what: str, values: tuple[str, ...], positive: bool) -> tuple[IPNetwork, ...]:
        return self._values(what, values, parse_ip_block, positive)

    def ports(self, what: str, values: tuple[str, ...], positive: bool) -> frozenset[int]:
        return frozenset(self._values(what, values, parse_port, positive))

    def source(self, src: Source) -> Match:
        return Match(
            principals=self.strings(src.principals),
            not_principals=self.strings(src.not_principals),
            namespaces=self.strings(src.namespaces),
            not_namespaces=self.strings(src.not_namespaces),
            source_ips=self.ips("ipBlocks", src.ip_blocks, True),
            not_source_ips=self.ips("notIpBlocks", src.not_ip_blocks, False),
        )

    def operation(self, op: Operation) -> Match:
        return Match(
            ports=self.ports("ports", op.ports, True),
            not_ports=self.ports("notPorts", op.not_ports, False),
        )

    def condition(self, cond: Condition) -> Match:
        key, pos, neg = cond.key, cond.values, cond.not_values
        if key == "source.ip":
            return Match(
                source_ips=self.ips(key, pos, True), not_source_ips=self.ips(key, neg, False)
            )
        if key == "destination.ip":
            return Match(
                destination_ips=self.ips(key, pos, True),
                not_destination_ips=self.ips(key, neg, False),
            )
        if key == "destination.port":
            return Match(ports=self.ports(key, pos, True), not_ports=self.ports(key, neg, False))
        if key == "source.namespace":
            return Match(namespaces=self.strings(pos), not_namespaces=self.strings(neg))
        # source.principal
        return Match(principals=self.strings(pos), not_principals=self.strings(neg))


def _compile_rule(index: int, rule: Rule) -> tuple[CompiledRule, list[str], list[str]]:
    """The rule as the node agent can enforce it, the HTTP attributes and bad values left out."""
    b = _Builder()
    unsupported: list[str] = []
    clauses: list[Clause] = []
    if rule.sources:
        for src in rule.sources:
            unsupported += _unsupported_source(src)
        clauses.append(tuple(b.source(s) for s in rule.sources))
    if rule.operations:
        for op in rule.operations:
            unsupported += _unsupported_operation(op)
        clauses.append(tuple(b.operation(o) for o in rule.operations))
    for cond in rule.conditions:
        if cond.key in L4_CONDITION_KEYS:
            clauses.append((b.condition(cond),))
        else:
            unsupported.append(f"when {cond.key}")
    unsupported = list(dict.fromkeys(unsupported))
    compiled = CompiledRule(index, tuple(clauses), tuple(unsupported + b.invalid))
    return compiled, unsupported, b.invalid


_L7_HINT = "attach L7 policies to a waypoint with targetRefs"


@functools.lru_cache(maxsize=4096)
def compile_policy(policy: AuthorizationPolicy) -> CompiledPolicy | None:
    """The node agent's form of ``policy``, or None when the node agent does not enforce it
    (attached to a waypoint with targetRefs, or a CUSTOM action); see :func:`problems`."""
    if policy.target_refs or policy.action is Action.CUSTOM:
        return None
    rules: list[CompiledRule] = []
    dropped: list[tuple[int, tuple[str, ...]]] = []
    notes: list[str] = []
    for i, rule in enumerate(policy.rules, start=1):
        compiled, unsupported, invalid = _compile_rule(i, rule)
        if unsupported:
            notes.append(
                f"rule {i} uses HTTP attributes ({', '.join(unsupported)}) the node agent cannot "
                "see; "
                + (
                    "the rule is omitted (more restrictive than requested)"
                    if policy.action is Action.ALLOW
                    else "it is enforced without them (more restrictive than requested)"
                )
                + f"; {_L7_HINT}"
            )
        if invalid:
            notes.append(
                f"rule {i} has invalid values ({', '.join(invalid)}); "
                + (
                    "the rule is omitted"
                    if policy.action is Action.ALLOW
                    else "the fields holding them match anything"
                )
            )
        if policy.action is Action.ALLOW and (unsupported or invalid):
            dropped.append((i, tuple(unsupported + invalid)))
            continue
        rules.append(compiled)
    return CompiledPolicy(
        key=policy.key,
        namespace=policy.namespace,
        action=policy.action,
        selector=policy.selector,
        rules=tuple(rules),
        declared_rules=len(policy.rules),
        dropped=tuple(dropped),
        problems=tuple(notes),
    )


def policy_problems(policy: AuthorizationPolicy) -> list[str]:
    """Why the node agent enforces ``policy`` differently from how it is written ([] if not)."""
    if policy.target_refs:
        return []  # a waypoint's business
    if policy.action is Action.CUSTOM:
        provider = f" (provider {policy.provider!r})" if policy.provider else ""
        return [
            f"action CUSTOM{provider} is not supported by the node agent: the policy is not "
            "applied; use a waypoint (targetRefs) for external authorization"
        ]
    compiled = compile_policy(policy)
    assert compiled is not None
    out = list(compiled.problems)
    if policy.action is Action.ALLOW and policy.rules and not compiled.rules:
        out.append(
            "no rule is left for the node agent: the policy allows nothing, so every "
            "connection to the workloads it selects is denied"
        )
    return out


# -- the per-snapshot index -------------------------------------------------------------


@dataclass(frozen=True)
class Applicable:
    """The policies that apply to one workload, split by action (in name order)."""

    deny: tuple[CompiledPolicy, ...]
    allow: tuple[CompiledPolicy, ...]
    audit: tuple[CompiledPolicy, ...]


@dataclass(frozen=True)
class PolicyIndex:
    root_namespace: str
    by_namespace: Mapping[str, tuple[CompiledPolicy, ...]]
    # Memo of for_workload(); the index itself never changes.
    _memo: dict[tuple[str, str, Mapping[str, str]], Applicable] = field(
        default_factory=dict, compare=False, repr=False
    )

    @staticmethod
    def build(snapshot: Snapshot) -> PolicyIndex:
        groups: dict[str, list[CompiledPolicy]] = {}
        for pol in sorted(snapshot.authorization_policies, key=lambda p: (p.namespace, p.name)):
            compiled = compile_policy(pol)
            if compiled is not None:
                groups.setdefault(pol.namespace, []).append(compiled)
        return PolicyIndex(snapshot.root_namespace, {k: tuple(v) for k, v in groups.items()})

    def applicable(self, workload: Workload) -> list[CompiledPolicy]:
        """Policies of the root namespace and of the workload's namespace that select it."""
        namespaces = [self.root_namespace]
        if workload.namespace != self.root_namespace:
            namespaces.append(workload.namespace)
        return [
            p for ns in namespaces for p in self.by_namespace.get(ns, ()) if p.selects(workload)
        ]

    def for_workload(self, workload: Workload) -> Applicable:
        key = (workload.uid, workload.namespace, workload.labels)
        hit = self._memo.get(key)
        if hit is None:
            policies = self.applicable(workload)
            hit = Applicable(
                deny=tuple(p for p in policies if p.action is Action.DENY),
                allow=tuple(p for p in policies if p.action is Action.ALLOW),
                audit=tuple(p for p in policies if p.action is Action.AUDIT),
            )
            if len(self._memo) < _MEMO_SIZE:
                self._memo[key] = hit
        return hit


_MEMO_SIZE = 65536


_INDEXES: OrderedDict[int, tuple[Snapshot, PolicyIndex]] = OrderedDict()
_INDEX_CACHE_SIZE = 4


def index_for(snapshot: Snapshot) -> PolicyIndex:
    """The snapshot's policy index, built once (a snapshot never changes)."""
    hit = _INDEXES.get(id(snapshot))
    if hit is not None and hit[0] is snapshot:
        _INDEXES.move_to_end(id(snapshot))
        return hit[1]
    index = PolicyIndex.build(snapshot)
    _INDEXES[id(snapshot)] = (snapshot, index)  # holds the snapshot so its id stays unique
    while len(_INDEXES) > _INDEX_CACHE_SIZE:
        _INDEXES.popitem(last=False)
    return index


# -- evaluation ------------------------------------------------------------------------


def _ignored_note(rule: CompiledRule) -> str:
    if not rule.ignored:
        return ""
    return (
        f"; enforced without {', '.join(rule.ignored)} which the node agent cannot evaluate "
        f"(more restrictive than requested; {_L7_HINT})"
    )


def authorize(conn: Connection, index: PolicyIndex) -> Verdict:
    """Evaluate AuthorizationPolicies for ``conn`` against a prebuilt index."""
    peer = Peer.of(conn)
    policies = index.for_workload(conn.dst_workload)
    audit = tuple(p.key for p in policies.audit if p.first_match(peer))
    for pol in policies.deny:
        rule = pol.first_match(peer)
        if rule is not None:
            return Verdict(
                False,
                f"denied by DENY policy {pol.key} (rule {rule.index}){_ignored_note(rule)}",
                pol.key,
                audit,
            )
    allows = policies.allow
    if not allows:
        return Verdict(True, "no ALLOW policy applies to the workload", "", audit)
    for pol in allows:
        rule = pol.first_match(peer)
        if rule is not None:
            reason = f"allowed by ALLOW policy {pol.key} (rule {rule.index})"
            return Verdict(True, reason, pol.key, audit)
    decider = allows[0].key if len(allows) == 1 else ""
    return Verdict(False, _no_allow_reason(allows), decider, audit)


def _no_allow_reason(allows: tuple[CompiledPolicy, ...]) -> str:
    parts = []
    for pol in allows:
        if pol.declared_rules == 0:
            parts.append(f"{pol.key} has no rules (allows nothing)")
        elif pol.dropped:
            dropped = "; ".join(f"rule {i}: {', '.join(attrs)}" for i, attrs in pol.dropped)
            parts.append(
                f"{pol.key} (rules needing attributes the node agent cannot evaluate were "
                f"omitted: {dropped}; {_L7_HINT})"
            )
        else:
            parts.append(pol.key)
    return "no ALLOW policy matched: " + ", ".join(parts)
