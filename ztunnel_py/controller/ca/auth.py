"""Who is calling: a node agent, authenticated by a per-node credential.

Two authenticators, one interface (``authenticate(metadata) -> node name``),
used by the certificate service and the agents' config stream alike:

* :class:`BootstrapTokens` (directory mode): one random token per node, kept
  under ``<state_dir>/tokens/<node>.token`` (0600, directory 0700); a token
  maps to exactly one node. Delete the file (or call ``revoke``) to revoke.
* :class:`KubernetesAuthenticator`: the agent's service-account token is
  checked with TokenReview for the configured audiences; it must belong to the
  agent's service account and be bound to a pod that runs on the node the
  agent claims (``x-ztunnel-node`` metadata).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc

from ztunnel_py.identity.manager import NODE_METADATA

_NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class AuthError(Exception):
    """The caller is not authenticated (or not allowed); ``code`` is the gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Authenticator(Protocol):
    def authenticate(self, metadata: Mapping[str, str]) -> str:
        """The node the caller speaks for, or raise :class:`AuthError`."""
        ...


def bearer_token(metadata: Mapping[str, str]) -> str:
    value = metadata.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if not value:
        raise AuthError(
            grpc.StatusCode.UNAUTHENTICATED,
            "no credential: send 'authorization: Bearer <token>' (the node's token file)",
        )
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(
            grpc.StatusCode.UNAUTHENTICATED, "malformed authorization metadata: expected Bearer"
        )
    return token.strip()


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class BootstrapTokens:
    """Directory mode: per-node bootstrap tokens persisted in the controller's state dir."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / "tokens"
        self._index: dict[bytes, str] = {}
        self._stamp: int | None = None

    def path_for(self, node: str) -> Path:
        if not _NODE_NAME.match(node):
            raise ValueError(f"node name {node!r} is not a valid Kubernetes node name")
        return self.directory / f"{node}.token"

    def token_for(self, node: str) -> str:
        """The node's token, created (0600) on first use; hand it to that node's agent."""
        path = self.path_for(node)
        self._ensure_dir()
        try:
            token = path.read_text().strip()
        except FileNotFoundError:
            token = ""
        if token:
            return token
        token = secrets.token_urlsafe(32)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (token + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._stamp = None
        return token

    def revoke(self, node: str) -> bool:
        """Forget the node's token; returns whether there was one."""
        try:
            self.path_for(node).unlink()
        except FileNotFoundError:
            return False
        self._stamp = None
        return True

    def nodes(self) -> list[str]:
        return sorted(self._load().values())

    def authenticate(self, metadata: Mapping[str, str]) -> str:
        token = bearer_token(metadata)
        node = self._load().get(_digest(token))
        if node is None:
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED,
                "unknown or revoked bootstrap token: the node's token file is stale "
                "(re-issue it from the controller)",
            )
        claimed = metadata.get(NODE_METADATA)
        if claimed is not None and not hmac.compare_digest(claimed, node):
            raise AuthError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"the token belongs to node {node!r}, but the caller claims {claimed!r}",
            )
        return node

    def _ensure_dir(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if stat.S_IMODE(self.directory.stat().st_mode) != 0o700:
            self.directory.chmod(0o700)

    def _load(self) -> dict[bytes, str]:
        """Token digest → node, re-read when the directory changes (create, delete, rename)."""
        try:
            stamp = self.directory.stat().st_mtime_ns
        except FileNotFoundError:
            self._index, self._stamp = {}, None
            return self._index
        if stamp == self._stamp:
            return self._index
        index: dict[bytes, str] = {}
        for entry in os.scandir(self.directory):
            if not entry.name.endswith(".token") or entry.name.startswith("."):
                continue
            try:
                token = Path(entry.path).read_text().strip()
            except OSError:
                continue
            if token:
                index[_digest(token)] = entry.name[: -len(".token")]
        self._index, self._stamp = index, stamp
        return index


# -- Kubernetes mode -----------------------------------------------------------------


@dataclass(frozen=True)
class TokenReviewResult:
    """What TokenReview says about a token (only the fields we use)."""

    authenticated: bool
    username: str = ""  # system:serviceaccount:<namespace>:<name>
    audiences: tuple[str, ...] = ()
    pod_name: str = ""  # extra authentication.kubernetes.io/pod-name
    pod_namespace: str = ""
    pod_uid: str = ""
    error: str = ""


class TokenReviewer(Protocol):
    def review(self, token: str, audiences: Sequence[str]) -> TokenReviewResult:
        """Ask the API server about ``token`` (raise on transport errors)."""
        ...


PodNodeLookup = Callable[[str, str], "str | None"]  # (namespace, pod name) -> nodeName


class KubernetesAuthenticator:
    """The caller is the agent's service account, from a pod on the node it claims."""

    def __init__(
        self,
        reviewer: TokenReviewer,
        pod_node: PodNodeLookup,
        *,
        service_account: str = "istio-system/ztunnel",
        audiences: Sequence[str] = ("istio-ca",),
    ) -> None:
        namespace, _, name = service_account.partition("/")
        if not namespace or not name:
            raise ValueError(f"service_account={service_account!r}: expected <namespace>/<name>")
        self._reviewer = reviewer
        self._pod_node = pod_node
        self._username = f"system:serviceaccount:{namespace}:{name}"
        self._audiences = tuple(audiences)

    def authenticate(self, metadata: Mapping[str, str]) -> str:
        token = bearer_token(metadata)
        claimed = metadata.get(NODE_METADATA, "")
        if not claimed:
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED,
                f"no node claimed: the agent must send '{NODE_METADATA}: <node name>'",
            )
        try:
            result = self._reviewer.review(token, self._audiences)
        except Exception as exc:  # the API server is away: not the caller's fault
            raise AuthError(
                grpc.StatusCode.UNAVAILABLE, f"cannot review the token (API server): {exc}"
            ) from None
        if not result.authenticated:
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED,
                f"TokenReview rejected the token: {result.error or 'not authenticated'}",
            )
        if self._audiences and not set(result.audiences) & set(self._audiences):
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED,
                f"the token is not for audience {list(self._audiences)} "
                f"(it is for {list(result.audiences)})",
            )
        if result.username != self._username:
            raise AuthError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{result.username or 'the caller'} is not the node agent's service account "
                f"({self._username})",
            )
        namespace = self._username.split(":")[2]
        if not result.pod_name or result.pod_namespace not in ("", namespace):
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED,
                "the token is not bound to an agent pod: use a projected service-account token",
            )
        node = self._pod_node(namespace, result.pod_name)
        if node is None:
            raise AuthError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"the token's pod {namespace}/{result.pod_name} does not exist (any more)",
            )
        if node != claimed:
            raise AuthError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"the token's pod {namespace}/{result.pod_name} runs on node {node!r}, "
                f"not on {claimed!r}",
            )
        return claimed
