"""What the data path hands to policy, and what it gets back.

The proxy builds a ``Connection`` for every inbound connection and calls the
pure ``ztunnel_py.policy.evaluate(conn, snapshot) -> Verdict``. Fields hold
only what the node agent knows at L4 (no HTTP attributes).
"""

from __future__ import annotations

from dataclasses import dataclass

from ztunnel_py.state.model import Workload


@dataclass(frozen=True)
class Connection:
    src_ip: str
    dst_ip: str
    dst_port: int
    dst_workload: Workload
    # The verified SPIFFE id of the peer (HBONE), or None for plaintext.
    src_identity: str | None = None
    src_port: int = 0

    @property
    def src_namespace(self) -> str | None:
        """Namespace from the peer's SPIFFE id (spiffe://td/ns/<ns>/sa/<sa>)."""
        if not self.src_identity:
            return None
        parts = self.src_identity.split("/")
        try:
            return parts[parts.index("ns") + 1]
        except (ValueError, IndexError):
            return None


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str = ""  # human-readable: which policy decided, and why
    policy: str = ""  # "<namespace>/<name>" of the deciding policy, "" for the default
    # AUDIT policies that matched ("<namespace>/<name>"): logged, never enforced.
    audit: tuple[str, ...] = ()

    @staticmethod
    def allow(reason: str = "no policy applies", policy: str = "") -> Verdict:
        return Verdict(True, reason, policy)

    @staticmethod
    def deny(reason: str, policy: str = "") -> Verdict:
        return Verdict(False, reason, policy)
