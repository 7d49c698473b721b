"""Caller authentication: per-node bootstrap tokens and the Kubernetes TokenReview check."""

from __future__ import annotations

import stat
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest

from ztunnel_py.controller.ca.auth import (
    AuthError,
    BootstrapTokens,
    KubernetesAuthenticator,
    TokenReviewResult,
)
from ztunnel_py.controller.ca.service import authorize, check_request
from ztunnel_py.state.model import Workload
from ztunnel_py.state.snapshot import Snapshot


def bearer(token: str, **extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", **extra}


def code_of(fn: object, *args: object) -> grpc.StatusCode:
    with pytest.raises(AuthError) as err:
        fn(*args)  # type: ignore[operator]
    assert err.value.message
    return err.value.code


# -- directory mode -------------------------------------------------------------------


def test_one_persistent_private_token_per_node(tmp_path: Path) -> None:
    tokens = BootstrapTokens(tmp_path)
    t1, t2 = tokens.token_for("node-1"), tokens.token_for("node-2")
    assert t1 != t2 and len(t1) >= 40
    assert tokens.token_for("node-1") == t1
    path = tmp_path / "tokens" / "node-1.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert tokens.authenticate(bearer(t1)) == "node-1"
    assert tokens.authenticate(bearer(t2)) == "node-2"
    # a restarted controller reads the same tokens
    assert BootstrapTokens(tmp_path).authenticate(bearer(t2)) == "node-2"
    assert tokens.nodes() == ["node-1", "node-2"]


def test_revoked_unknown_and_malformed_tokens(tmp_path: Path) -> None:
    tokens = BootstrapTokens(tmp_path)
    t1 = tokens.token_for("node-1")
    assert tokens.revoke("node-1") is True
    assert tokens.revoke("node-1") is False
    assert code_of(tokens.authenticate, bearer(t1)) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(tokens.authenticate, bearer("x" * 43)) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(tokens.authenticate, {}) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(tokens.authenticate, {"authorization": t1}) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(tokens.authenticate, {"authorization": "Bearer "}) == (
        grpc.StatusCode.UNAUTHENTICATED
    )


def test_deleting_the_file_revokes_for_a_running_controller(tmp_path: Path) -> None:
    tokens = BootstrapTokens(tmp_path)
    t1 = tokens.token_for("node-1")
    tokens.token_for("node-2")
    assert tokens.authenticate(bearer(t1)) == "node-1"
    (tmp_path / "tokens" / "node-1.token").unlink()
    assert code_of(tokens.authenticate, bearer(t1)) == grpc.StatusCode.UNAUTHENTICATED


def test_claiming_another_node_with_a_token_is_denied(tmp_path: Path) -> None:
    tokens = BootstrapTokens(tmp_path)
    t1 = tokens.token_for("node-1")
    assert tokens.authenticate(bearer(t1, **{"x-ztunnel-node": "node-1"})) == "node-1"
    md = bearer(t1, **{"x-ztunnel-node": "node-2"})
    assert code_of(tokens.authenticate, md) == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("bad", ["../etc", "Node", "", "a/b", "-x"])
def test_node_names_are_validated(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="not a valid Kubernetes node name"):
        BootstrapTokens(tmp_path).token_for(bad)


# -- Kubernetes mode -----------------------------------------------------------------

AGENT = "system:serviceaccount:istio-system:ztunnel"


class FakeReviewer:
    def __init__(self, results: dict[str, TokenReviewResult]) -> None:
        self.results = results
        self.asked: list[tuple[str, tuple[str, ...]]] = []

    def review(self, token: str, audiences: Sequence[str]) -> TokenReviewResult:
        self.asked.append((token, tuple(audiences)))
        if token == "explode":
            raise ConnectionError("api server unreachable")
        return self.results.get(token, TokenReviewResult(False, error="token not found"))


PODS = {("istio-system", "ztunnel-a"): "node-1", ("istio-system", "ztunnel-b"): "node-2"}


def kube(results: dict[str, TokenReviewResult]) -> tuple[KubernetesAuthenticator, FakeReviewer]:
    reviewer = FakeReviewer(results)
    auth = KubernetesAuthenticator(
        reviewer, lambda ns, name: PODS.get((ns, name)), audiences=("istio-ca",)
    )
    return auth, reviewer


def good(pod: str = "ztunnel-a", **kw: object) -> TokenReviewResult:
    fields: dict[str, object] = {
        "authenticated": True, "username": AGENT, "audiences": ("istio-ca",),
        "pod_name": pod, "pod_namespace": "istio-system",
    }
    fields.update(kw)
    return TokenReviewResult(**fields)  # type: ignore[arg-type]


def test_kubernetes_agent_on_its_own_node_is_accepted() -> None:
    auth, reviewer = kube({"t": good()})
    assert auth.authenticate(bearer("t", **{"x-ztunnel-node": "node-1"})) == "node-1"
    assert reviewer.asked == [("t", ("istio-ca",))]


@pytest.mark.parametrize(
    ("result", "node", "code"),
    [
        (good(), "node-2", grpc.StatusCode.PERMISSION_DENIED),  # pod runs elsewhere
        (good(pod="ztunnel-gone"), "node-1", grpc.StatusCode.PERMISSION_DENIED),
        (good(username="system:serviceaccount:default:app"), "node-1",
         grpc.StatusCode.PERMISSION_DENIED),
        (good(audiences=("kubernetes",)), "node-1", grpc.StatusCode.UNAUTHENTICATED),
        (good(pod_name=""), "node-1", grpc.StatusCode.UNAUTHENTICATED),  # not pod-bound
        (TokenReviewResult(False, error="expired"), "node-1", grpc.StatusCode.UNAUTHENTICATED),
        (good(), "", grpc.StatusCode.UNAUTHENTICATED),  # no node claimed
    ],
)
def test_kubernetes_refusals(result: TokenReviewResult, node: str, code: grpc.StatusCode) -> None:
    auth, _ = kube({"t": result})
    md = bearer("t", **({"x-ztunnel-node": node} if node else {}))
    assert code_of(auth.authenticate, md) == code


def test_kubernetes_api_down_is_unavailable_not_a_crash() -> None:
    auth, _ = kube({})
    md = bearer("explode", **{"x-ztunnel-node": "node-1"})
    assert code_of(auth.authenticate, md) == grpc.StatusCode.UNAVAILABLE


# -- authorization (pure) --------------------------------------------------------------


def wl(name: str, node: str, *, enrolled: bool = True, waypoint: bool = False) -> Workload:
    return Workload(
        uid=f"ns/{name}", name=name, namespace="ns", service_account="sa", node=node, ips=(),
        enrolled=enrolled, is_waypoint=waypoint,
    )


ID = "spiffe://cluster.local/ns/ns/sa/sa"


def test_authorize_only_enrolled_workloads_on_the_callers_node() -> None:
    assert authorize("n1", ID, Snapshot(workloads=(wl("a", "n1"),))) is None
    # the same service account on two nodes: each node may hold it
    both = Snapshot(workloads=(wl("a", "n1"), wl("b", "n2")))
    assert authorize("n1", ID, both) is None and authorize("n2", ID, both) is None
    elsewhere = authorize("n1", ID, Snapshot(workloads=(wl("b", "n2"),)))
    assert elsewhere is not None and elsewhere.code == grpc.StatusCode.PERMISSION_DENIED
    assert "n2" not in elsewhere.message, "do not tell a node where identities live"
    unenrolled = authorize("n1", ID, Snapshot(workloads=(wl("a", "n1", enrolled=False),)))
    assert unenrolled is not None and "not enrolled" in unenrolled.message
    wp = Snapshot(workloads=(wl("w", "n1", enrolled=False, waypoint=True),))
    assert authorize("n1", ID, wp) is None
    assert authorize("n2", ID, wp) is not None
    assert authorize("n1", ID, Snapshot()) is not None


def test_check_request_shapes() -> None:
    assert check_request(ID, "csr", 60, "cluster.local") is None
    for identity, csr, ttl in (("", "c", 1), ("x", "c", 1), (ID, "", 1), (ID, "c", -1),
                               (ID, "c" * 20000, 1)):
        refusal = check_request(identity, csr, ttl, "cluster.local")
        assert refusal is not None and refusal.code == grpc.StatusCode.INVALID_ARGUMENT
    other = check_request("spiffe://x.y/ns/a/sa/b", "c", 1, "cluster.local")
    assert other is not None and "trust domain" in other.message
