"""PeerAuthentication: is plaintext accepted on a workload's port?

As istiod resolves it for ztunnel (``convertedSelectorPeerAuthentications`` in
pilot/pkg/serviceregistry/kube/controller/ambient/authorization.go):

* the mesh policy is a PeerAuthentication in the root namespace without a
  selector; the namespace policy one in the workload's namespace without a
  selector; the workload policy one in the workload's namespace whose
  ``selector.matchLabels`` is non-empty and contained in the workload's labels
  (selector policies in the root namespace are ignored, as in Istio);
* mode resolution goes mesh → namespace → workload, the most specific set mode
  winning; ``UNSET`` inherits; with no policy at all the mode is PERMISSIVE;
* ``DISABLE`` is treated as PERMISSIVE: the node agent never sends plaintext
  between meshed pods, it only decides whether to accept it (a warning says so);
* ``portLevelMtls`` only counts on a workload policy (Istio: "These only apply
  when a workload selector is specified"); a port's mode overrides the
  workload's, and ``UNSET`` on a port inherits.

When several policies compete for one level, Istio keeps the oldest; the model
carries no creation time, so we keep the first by name, deterministically.
"""

from __future__ import annotations

from dataclasses import dataclass

from ztunnel_py.state.model import MtlsMode, PeerAuthentication, Workload
from ztunnel_py.state.snapshot import Snapshot


@dataclass(frozen=True)
class MtlsDecision:
    mode: MtlsMode  # STRICT or PERMISSIVE
    reason: str  # which level decided: "namespace PeerAuthentication prod/strict"
    policy: str = ""  # "<namespace>/<name>" of the deciding PeerAuthentication, "" by default


def _first(policies: list[PeerAuthentication]) -> PeerAuthentication | None:
    return min(policies, key=lambda p: p.name) if policies else None


def _has_selector(pa: PeerAuthentication) -> bool:
    return bool(pa.selector)  # None and {} both mean namespace- or mesh-wide


def effective_policies(
    workload: Workload, snapshot: Snapshot
) -> tuple[PeerAuthentication | None, PeerAuthentication | None, PeerAuthentication | None]:
    """(mesh, namespace, workload) PeerAuthentication that apply to ``workload``."""
    root = snapshot.root_namespace
    mesh: list[PeerAuthentication] = []
    namespace: list[PeerAuthentication] = []
    selected: list[PeerAuthentication] = []
    for pa in snapshot.peer_authentications:
        if not _has_selector(pa):
            if pa.namespace == root:
                mesh.append(pa)
            elif pa.namespace == workload.namespace:
                namespace.append(pa)
        elif pa.namespace == workload.namespace and pa.namespace != root:
            assert pa.selector is not None
            if all(workload.labels.get(k) == v for k, v in pa.selector.items()):
                selected.append(pa)
    return _first(mesh), _first(namespace), _first(selected)


def _strict(mode: MtlsMode) -> bool | None:
    """True/False for a set mode, None for UNSET (inherit)."""
    if mode is MtlsMode.UNSET:
        return None
    return mode is MtlsMode.STRICT


def explain_mtls(workload: Workload, port: int, snapshot: Snapshot) -> MtlsDecision:
    """The effective mode on ``port`` of ``workload`` and which policy decided it."""
    mesh, ns, wl = effective_policies(workload, snapshot)
    strict, reason, key = False, "default (no PeerAuthentication)", ""
    for pa, level in ((mesh, "mesh"), (ns, "namespace")):
        if pa is not None and _strict(pa.mode) is not None:
            strict, reason, key = (
                pa.mode is MtlsMode.STRICT, f"{level} PeerAuthentication {pa.key}", pa.key
            )
    if wl is not None:
        decided = _strict(wl.mode)
        if decided is not None:
            strict, reason, key = decided, f"workload PeerAuthentication {wl.key}", wl.key
        decided = _strict(wl.port_level.get(port, MtlsMode.UNSET))
        if decided is not None:
            strict, reason, key = (
                decided, f"portLevelMtls {port} of PeerAuthentication {wl.key}", wl.key
            )
    return MtlsDecision(MtlsMode.STRICT if strict else MtlsMode.PERMISSIVE, reason, key)


def mtls_mode(workload: Workload, port: int, snapshot: Snapshot) -> MtlsMode:
    """STRICT or PERMISSIVE (never UNSET or DISABLE) for plaintext arriving on ``port``."""
    return explain_mtls(workload, port, snapshot).mode


def strict(workload: Workload, port: int, snapshot: Snapshot) -> bool:
    """True when plaintext to ``workload`` on ``port`` must be refused."""
    return mtls_mode(workload, port, snapshot) is MtlsMode.STRICT


def peer_authentication_problems(pa: PeerAuthentication, root_namespace: str) -> list[str]:
    out: list[str] = []
    modes = [("mode", pa.mode)] + [(f"port {p}", m) for p, m in pa.port_level.items()]
    for where, mode in modes:
        if mode is MtlsMode.DISABLE:
            out.append(
                f"{where}: DISABLE is treated as PERMISSIVE (the node agent accepts plaintext "
                "but still uses mTLS between meshed workloads)"
            )
    if pa.port_level and not _has_selector(pa):
        out.append(
            "portLevelMtls is ignored: it only applies with a workload selector (as in Istio)"
        )
    if _has_selector(pa) and pa.namespace == root_namespace:
        out.append(
            "a PeerAuthentication with a selector in the root namespace is ignored in ambient "
            "mode (as in Istio); put it in the workload's namespace"
        )
    return out
