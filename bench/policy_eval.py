"""Cost of ``policy.evaluate`` per connection, by number of policies in scope.

    .venv/bin/python -m bench.policy_eval [--seconds 1.0]

Prints evaluations per second and the per-connection cost relative to the
baseline in the same run (no AuthorizationPolicy at all), plus the one-off cost
of building a snapshot's policy index.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

from ztunnel_py.policy import Connection, evaluate
from ztunnel_py.policy.authz import compile_policy, index_for
from ztunnel_py.state.model import (
    Action,
    AuthorizationPolicy,
    FrozenMap,
    Operation,
    Rule,
    Source,
    Workload,
)
from ztunnel_py.state.snapshot import Snapshot

WL = Workload("foo/httpbin", "httpbin", "foo", "httpbin", "n1", ("10.0.2.9",),
              labels=FrozenMap({"app": "httpbin"}))
CONN = Connection("10.0.1.5", "10.0.2.9", 8000, WL, "spiffe://cluster.local/ns/bar/sa/sleep")


def policies(n: int) -> tuple[AuthorizationPolicy, ...]:
    """n ALLOW policies that do not match (every one is evaluated), then one that does."""
    out = [
        AuthorizationPolicy(
            f"p{i}", "foo", Action.ALLOW, selector=FrozenMap({"app": "httpbin"}),
            rules=(Rule(sources=(Source(principals=(f"cluster.local/ns/x{i}/sa/*",),
                                        ip_blocks=("192.168.0.0/16",)),),
                        operations=(Operation(ports=("8000", "9000")),)),),
        )
        for i in range(n)
    ]
    out.append(AuthorizationPolicy("zz-allow-bar", "foo", Action.ALLOW,
                                   rules=(Rule(sources=(Source(namespaces=("bar",)),)),)))
    return tuple(out)


def rate(fn: Callable[[], object], seconds: float) -> float:
    calls, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(200):
            fn()
        calls += 200
        now = time.perf_counter()
        if now >= deadline:
            return calls / (now - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per row (default 1.0)")
    args = parser.parse_args(argv)

    rows: list[tuple[str, float, float]] = []
    baseline_snap = Snapshot(workloads=(WL,))
    base = rate(lambda: evaluate(CONN, baseline_snap), args.seconds)
    rows.append(("no policy (baseline)", base, 0.0))
    for n in (0, 10, 100, 1000):
        snap = Snapshot(workloads=(WL,), authorization_policies=policies(n))
        compile_policy.cache_clear()
        start = time.perf_counter()
        index_for(snap)  # once per snapshot version: compiles every policy
        build_ms = (time.perf_counter() - start) * 1000
        assert evaluate(CONN, snap).allowed
        rows.append((f"{n} non-matching + 1 matching ALLOW",
                     rate(functools.partial(evaluate, CONN, snap), args.seconds), build_ms))

    print(f"{'case':<38} {'evals/s':>12} {'us/eval':>9} {'x baseline':>11} {'index ms':>9}")
    for name, per_s, build in rows:
        print(f"{name:<38} {per_s:>12,.0f} {1e6 / per_s:>9.2f} {base / per_s:>11.2f} "
              f"{build:>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
