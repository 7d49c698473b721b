"""L4 security policy: pure decisions over the frozen snapshot (STYLE.md §3).

``evaluate(conn, snapshot) -> Verdict`` is what the inbound path calls for every
connection; ``strict(workload, port, snapshot)`` tells the plaintext listener
whether to refuse outright; ``problems(snapshot)`` lists what the node agent
enforces differently from how a policy is written (log it once per version).
"""

from __future__ import annotations

from dataclasses import dataclass

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
