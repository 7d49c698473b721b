"""L7 AuthorizationPolicy at the waypoint: pure evaluation per request.

The policies are those attached to the waypoint (``targetRefs`` naming its
Gateway) or to the destination service (``targetRefs`` kind Service). Istio's
semantics: any matching DENY denies; otherwise, if ALLOW policies apply, one
must match; otherwise the request is allowed. A policy matches when one of its
rules does; a rule when its ``from`` (any source), ``to`` (any operation) and
every ``when`` condition match. Strings use Istio's ``*`` forms (exact,
``prefix*``, ``*suffix``, ``*`` = present). Paths are compared without the
query string, hosts case-insensitively. A ``when`` key the waypoint cannot
evaluate never matches in an ALLOW rule and always matches in a DENY rule
(fail closed). Denials answer 403 ``RBAC: access denied``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from waypoint.request import Request
from ztunnel_py.policy.match import StringMatch, ip_in, parse_ip_block, parse_port, principal_of
from ztunnel_py.state.model import Action, AuthorizationPolicy, Condition, Operation, Rule, Source

DENIED_BODY = b"RBAC: access denied"

# (the field's values, the test, whether the test must hold (False: a not* field))
Check = tuple[tuple[str, ...], Callable[[], bool], bool]


@dataclass(frozen=True)
class L7Verdict:
    allowed: bool
    policy: str = ""
    reason: str = ""


def _any(patterns: tuple[str, ...], value: str, *, fold: bool = False) -> bool:
    if fold:
        value = value.lower()
    return any(StringMatch.parse(p.lower() if fold else p).matches(value) for p in patterns)


def _ips(blocks: tuple[str, ...], ip: str) -> bool:
    nets = tuple(n for b in blocks if (n := parse_ip_block(b)) is not None)
    return ip_in(ip, nets)


def _source(src: Source, req: Request) -> bool:
    principal = principal_of(req.source.principal)
    ns = req.source.namespace
    checks: tuple[Check, ...] = (
        (src.principals, lambda: _any(src.principals, principal) if principal else False, True),
        (src.not_principals, lambda: _any(src.not_principals, principal), False),
        (src.namespaces, lambda: _any(src.namespaces, ns) if ns else False, True),
        (src.not_namespaces, lambda: _any(src.not_namespaces, ns), False),
        (src.ip_blocks, lambda: _ips(src.ip_blocks, req.source.ip), True),
        (src.not_ip_blocks, lambda: _ips(src.not_ip_blocks, req.source.ip), False),
        (src.remote_ip_blocks, lambda: _ips(src.remote_ip_blocks, req.source.ip), True),
        (src.not_remote_ip_blocks, lambda: _ips(src.not_remote_ip_blocks, req.source.ip), False),
        # No JWT at the waypoint: a request principal is never present.
        (src.request_principals, lambda: False, True),
        (src.not_request_principals, lambda: False, False),
    )
    return all(not (values and test() != positive) for values, test, positive in checks)


def _ports(values: tuple[str, ...], port: int) -> bool:
    return any(parse_port(v) == port for v in values)


def _operation(op: Operation, req: Request) -> bool:
    path = req.path_only
    checks: tuple[Check, ...] = (
        (op.paths, lambda: _any(op.paths, path), True),
        (op.not_paths, lambda: _any(op.not_paths, path), False),
        (op.methods, lambda: _any(op.methods, req.method), True),
        (op.not_methods, lambda: _any(op.not_methods, req.method), False),
        (op.hosts, lambda: _any(op.hosts, req.authority, fold=True)
         or _any(op.hosts, req.host, fold=True), True),
        (op.not_hosts, lambda: _any(op.not_hosts, req.authority, fold=True)
         or _any(op.not_hosts, req.host, fold=True), False),
        (op.ports, lambda: _ports(op.ports, req.port), True),
        (op.not_ports, lambda: _ports(op.not_ports, req.port), False),
    )
    return all(not (values and test() != positive) for values, test, positive in checks)


def _attribute(key: str, req: Request) -> str | None:
    """The value of a ``when`` key, or None if the waypoint cannot evaluate it."""
    if key.startswith("request.headers[") and key.endswith("]"):
        return req.header(key[len("request.headers["):-1].lower()) or ""
    return {
        "source.namespace": req.source.namespace,
        "source.principal": principal_of(req.source.principal),
        "source.ip": req.source.ip,
        "remote.ip": req.source.ip,
        "destination.port": str(req.port),
    }.get(key)


def _condition(cond: Condition, req: Request, action: Action) -> bool:
    value = _attribute(cond.key, req)
    if value is None:
        return action is not Action.ALLOW  # fail closed
    if cond.key in ("source.ip", "remote.ip"):
        if cond.values and not _ips(cond.values, value):
            return False
        return not (cond.not_values and _ips(cond.not_values, value))
    if cond.values and not (value and _any(cond.values, value)):
        return False
    return not (cond.not_values and value and _any(cond.not_values, value))


def rule_matches(rule: Rule, req: Request, action: Action) -> bool:
    if rule.sources and not any(_source(s, req) for s in rule.sources):
        return False
    if rule.operations and not any(_operation(o, req) for o in rule.operations):
        return False
    return all(_condition(c, req, action) for c in rule.conditions)


def policy_matches(p: AuthorizationPolicy, req: Request) -> bool:
    return any(rule_matches(rule, req, p.action) for rule in p.rules)


def evaluate(policies: tuple[AuthorizationPolicy, ...], req: Request) -> L7Verdict:
    allows = [p for p in policies if p.action is Action.ALLOW]
    for p in policies:
        if p.action is Action.DENY and policy_matches(p, req):
            return L7Verdict(False, p.key, f"denied by DENY policy {p.key}")
    if not allows:
        return L7Verdict(True, "", "no ALLOW policy applies")
    for p in allows:
        if policy_matches(p, req):
            return L7Verdict(True, p.key, f"allowed by {p.key}")
    return L7Verdict(False, "", "no ALLOW policy matched")
