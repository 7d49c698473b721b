"""Matchers and the per-snapshot policy index."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from ztunnel_py.policy import Connection, evaluate, recheck, security_changed
from ztunnel_py.policy.authz import compile_policy, index_for
from ztunnel_py.policy.match import (
    Kind,
    StringMatch,
    ip_in,
    parse_ip_block,
    parse_port,
    principal_of,
)
from ztunnel_py.state.model import Action, AuthorizationPolicy, FrozenMap, Rule, Source, Workload
from ztunnel_py.state.snapshot import Snapshot


# ztunnel src/rbac.rs string_match table
@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("foo", "foo", True),
        ("foo", "not", False),
        ("foo", "", False),
        ("foo*", "foobar", True),
        ("foo*", "notfoo", False),
        ("foo*", "", False),
        ("*foo", "barfoo", True),
        ("*foo", "foonot", False),
        ("*foo", "", False),
        ("*", "foo", True),
        ("*", "", False),
    ],
)
def test_string_match(pattern: str, value: str, expected: bool) -> None:
    assert StringMatch.parse(pattern).matches(value) is expected


def test_pattern_kinds() -> None:
    assert StringMatch.parse("*").kind is Kind.PRESENCE
    assert StringMatch.parse("a*") == StringMatch(Kind.PREFIX, "a")
    assert StringMatch.parse("*a") == StringMatch(Kind.SUFFIX, "a")


def test_principal_strips_scheme_and_needs_it() -> None:
    assert principal_of("spiffe://cluster.local/ns/a/sa/b") == "cluster.local/ns/a/sa/b"
    assert principal_of("cluster.local/ns/a/sa/b") == ""
    assert principal_of(None) == ""


def test_ip_blocks_and_ports() -> None:
    assert parse_ip_block("10.1.2.3") == ipaddress.ip_network("10.1.2.3/32")
    assert parse_ip_block("10.1.2.0/24") is not None
    assert parse_ip_block("10.1.2.7/24") == ipaddress.ip_network("10.1.2.0/24")
    assert parse_ip_block("10.0.0/8") is None
    assert parse_ip_block("fd00::1") == ipaddress.ip_network("fd00::1/128")
    nets = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
    assert ip_in("10.9.9.9", nets)
    assert ip_in("fd12::1", nets)
    assert not ip_in("11.0.0.1", nets)
    assert not ip_in("not-an-ip", nets)
    assert parse_port("8080") == 8080
    assert parse_port("http") is None
    assert parse_port("0") is None
    assert parse_port("65536") is None


WL = Workload("foo/a", "a", "foo", "a", "n", ("10.0.0.2",), labels=FrozenMap({"app": "a"}))


def _snap(*policies: AuthorizationPolicy) -> Snapshot:
    return Snapshot(workloads=(WL,), authorization_policies=policies)


def test_index_is_built_once_per_snapshot_and_not_shared() -> None:
    allow_bar = AuthorizationPolicy(
        "p", "foo", rules=(Rule(sources=(Source(namespaces=("bar",)),)),)
    )
    s1 = _snap(allow_bar)
    s2 = _snap()
    assert index_for(s1) is index_for(s1)
    assert index_for(s1) is not index_for(s2)
    conn = Connection("10.0.0.9", "10.0.0.2", 80, WL, "spiffe://cluster.local/ns/baz/sa/x")
    assert not evaluate(conn, s1).allowed
    assert evaluate(conn, s2).allowed  # a new snapshot is a new decision, at once


def test_evaluate_is_pure() -> None:
    pol = AuthorizationPolicy("p", "foo", Action.DENY, rules=(Rule(),))
    snap = _snap(pol)
    conn = Connection("10.0.0.9", "10.0.0.2", 80, WL, None)
    first = evaluate(conn, snap)
    assert evaluate(conn, snap) == first
    assert snap.authorization_policies == (pol,)


def test_compile_is_cached_per_policy_value() -> None:
    a = AuthorizationPolicy("p", "foo", rules=(Rule(),))
    b = AuthorizationPolicy("p", "foo", rules=(Rule(),))
    assert compile_policy(a) is compile_policy(b)


def test_recheck_finds_connections_a_new_policy_denies() -> None:
    old = _snap()
    from_bar = Connection("10.0.0.9", "10.0.0.2", 80, WL, "spiffe://cluster.local/ns/bar/sa/x")
    from_baz = Connection("10.0.0.8", "10.0.0.2", 80, WL, "spiffe://cluster.local/ns/baz/sa/y")
    allow_bar = AuthorizationPolicy(
        "p", "foo", rules=(Rule(sources=(Source(namespaces=("bar",)),)),)
    )
    new = _snap(allow_bar)
    assert security_changed(old, new)
    assert not security_changed(new, _snap(allow_bar))
    assert recheck([from_bar, from_baz], old) == []
    denied = recheck([from_bar, from_baz], new)
    assert [c for c, _ in denied] == [from_baz]
    assert "no ALLOW policy matched: foo/p" in denied[0][1].reason
    # A relabelled workload is judged with its new labels.
    selected = AuthorizationPolicy("sel", "foo", selector=FrozenMap({"tier": "db"}))
    relabelled = replace(WL, labels=FrozenMap({"app": "a", "tier": "db"}))
    after = Snapshot(workloads=(relabelled,), authorization_policies=(selected,))
    assert [c for c, _ in recheck([from_bar], after)] == [from_bar]
    # A workload gone from the snapshot is not judged here.
    assert recheck([from_bar], Snapshot(authorization_policies=(selected,))) == []
