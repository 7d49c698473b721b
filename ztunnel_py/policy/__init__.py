"""L4 security policy: pure decisions over the frozen snapshot (STYLE.md §3).

``evaluate(conn, snapshot) -> Verdict`` is what the inbound path calls for every
connection; ``strict(workload, port, snapshot)`` tells the plaintext listener
whether to refuse outright; ``problems(snapshot)`` lists what the node agent
enforces differently from how a policy is written (log it once per version).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from ztunnel_py.policy.authz import (
    L4_CONDITION_KEYS,
    CompiledPolicy,
    PolicyIndex,
    authorize,
    compile_policy,
    index_for,
    policy_problems,
)
from ztunnel_py.policy.peerauth import (
    MtlsDecision,
    explain_mtls,
    mtls_mode,
    peer_authentication_problems,
    strict,
)
from ztunnel_py.policy.types import Connection, Verdict
from ztunnel_py.state.model import MtlsMode
from ztunnel_py.state.snapshot import Snapshot

__all__ = [
    "L4_CONDITION_KEYS",
    "CompiledPolicy",
    "Connection",
    "MtlsDecision",
    "PolicyIndex",
    "Problem",
    "Verdict",
    "compile_policy",
    "evaluate",
    "explain_mtls",
    "mtls_mode",
    "problems",
    "recheck",
    "security_changed",
    "strict",
]


def evaluate(conn: Connection, snapshot: Snapshot) -> Verdict:
    """Decide whether ``conn`` may reach ``conn.dst_workload``.

    A plaintext connection (no verified peer identity) to a port whose
    PeerAuthentication is STRICT is denied first, as ztunnel does with its
    STRICT policy; then AuthorizationPolicies decide (see ``policy.authz``).
    """
    if conn.src_identity is None:
        mtls = explain_mtls(conn.dst_workload, conn.dst_port, snapshot)
        if mtls.mode is MtlsMode.STRICT:
            return Verdict.deny(
                f"plaintext connection refused: mTLS is STRICT on port {conn.dst_port} "
                f"({mtls.reason})",
                mtls.policy,
            )
    return authorize(conn, index_for(snapshot))


@dataclass(frozen=True)
class Problem:
    kind: str  # "AuthorizationPolicy" | "PeerAuthentication"
    key: str  # "<namespace>/<name>"
    message: str

    def __str__(self) -> str:
        return f"{self.kind} {self.key}: {self.message}"


def problems(snapshot: Snapshot) -> tuple[Problem, ...]:
    """Everything the node agent enforces differently from how it is written."""
    out: list[Problem] = []
    for pol in snapshot.authorization_policies:
        out += [Problem("AuthorizationPolicy", pol.key, m) for m in policy_problems(pol)]
    for pa in snapshot.peer_authentications:
        out += [
            Problem("PeerAuthentication", pa.key, m)
            for m in peer_authentication_problems(pa, snapshot.root_namespace)
        ]
    return tuple(out)


def security_changed(old: Snapshot, new: Snapshot) -> bool:
    """Whether verdicts may differ between ``old`` and ``new`` (policies, peer
    authentication, root namespace, or the workloads whose labels select them)."""
    return (
        old.authorization_policies != new.authorization_policies
        or old.peer_authentications != new.peer_authentications
        or old.root_namespace != new.root_namespace
        or old.workloads != new.workloads
    )


def recheck(conns: Iterable[Connection], snapshot: Snapshot) -> list[tuple[Connection, Verdict]]:
    """The open connections that ``snapshot`` denies, with the verdict to log.

    Called after a snapshot swap (when :func:`security_changed`): the caller
    closes these, so that "a policy change applies to existing connections".
    A connection's destination workload is looked up again in the new snapshot
    (its labels may have changed); a workload gone from it is left to the
    data path, which closes connections to removed workloads anyway.
    """
    denied: list[tuple[Connection, Verdict]] = []
    for conn in conns:
        current = snapshot.by_uid.get(conn.dst_workload.uid)
        if current is None:
            continue
        fresh = conn if current == conn.dst_workload else replace(conn, dst_workload=current)
        verdict = evaluate(fresh, snapshot)
        if not verdict.allowed:
            denied.append((conn, verdict))  # the caller's own object, to find and close
    return denied
