"""Identity in Kubernetes: TokenReview, the pod → node lookup, the CA key in a Secret.

Adapters from the identity helpers' seams (``ca.auth.TokenReviewer``,
``ca.auth.PodNodeLookup``, ``ca.authority.CertificateAuthority``) to the API
server:

* :class:`KubeTokenReviewer` posts an ``authentication.k8s.io/v1`` TokenReview
  for the agent's projected service-account token (audience ``istio-ca`` by
  default) and reads the pod the token is bound to from ``status.user.extra``.
  Answers are cached for a few seconds (by a hash of the token), so that an
  agent's burst of CSRs costs one review.
* :func:`pod_node_lookup` answers "which node runs this pod" from the
  informer cache, falling back to a GET for a pod too new to be cached.
* :class:`SecretCaStore` keeps the CA in the controller's namespace: the
  operator's Istio-style ``cacerts`` Secret if present, else ``ztunnel-py-ca``,
  created on first start (a second replica racing us loses the create with a
  409 and adopts the winner's key). The Secret is materialised into the
  state directory (0700 / 0600) and handed to
  :meth:`CertificateAuthority.load_or_create`; key bytes are never logged.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztunnel_py import log
from ztunnel_py.config import ControllerConfig
from ztunnel_py.controller.ca.auth import KubernetesAuthenticator, PodNodeLookup, TokenReviewResult
from ztunnel_py.controller.ca.authority import CertificateAuthority
from ztunnel_py.controller.kube import (
    ApiError,
    KubeApi,
    KubernetesSource,
    NotInstalled,
    in_cluster_namespace,
    load_api_client,
)

logger = log.get("controller.kube.identity")

TOKEN_REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"  # noqa: S105 - a URL
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
SA_PREFIX = "system:serviceaccount:"

CA_SECRET = "ztunnel-py-ca"  # noqa: S105 - a Secret's name
CACERTS_SECRET = "cacerts"  # noqa: S105 - a Secret's name
CACERTS_KEYS = ("ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem")
SELF_SIGNED_KEYS = ("ca-cert.pem", "ca-key.pem", "extra-roots.pem")


class KubeTokenReviewer:
    """``TokenReviewer`` over the API server; needs RBAC ``create`` on tokenreviews."""

    def __init__(
        self,
        api: KubeApi,
        *,
        cache_ttl_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self._ttl = cache_ttl_s
        self._clock = clock
        self._cache: dict[tuple[bytes, tuple[str, ...]], tuple[float, TokenReviewResult]] = {}
        self._lock = threading.Lock()
        self.reviews = 0

    def review(self, token: str, audiences: Sequence[str]) -> TokenReviewResult:
        key = (hashlib.sha256(token.encode()).digest(), tuple(audiences))
        now = self._clock()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": list(audiences)},
        }
        try:
            answer = self.api.json("POST", TOKEN_REVIEW_PATH, body=body)
        except ApiError as exc:
            hint = ""
            if exc.status == 403:
                hint = " (the controller needs RBAC create on tokenreviews)"
            raise ApiError(exc.status, exc.reason + hint, exc.path) from None
        self.reviews += 1
        result = parse_review(answer)
        with self._lock:
            if len(self._cache) > 4096:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            self._cache[key] = (now + self._ttl, result)
        return result


def parse_review(answer: Mapping[str, Any]) -> TokenReviewResult:
    """A TokenReview response → the fields the authenticator uses (wire types stop here)."""
    status = answer.get("status")
    if not isinstance(status, Mapping):
        return TokenReviewResult(False, error="TokenReview response has no status")
    if not status.get("authenticated"):
        return TokenReviewResult(False, error=str(status.get("error") or "not authenticated"))
    user = status.get("user") if isinstance(status.get("user"), Mapping) else {}
    assert isinstance(user, Mapping)
    username = str(user.get("username") or "")
    extra = user.get("extra") if isinstance(user.get("extra"), Mapping) else {}
    assert isinstance(extra, Mapping)

    def first(name: str) -> str:
        values = extra.get(name)
        if isinstance(values, list) and values:
            return str(values[0])
        return ""

    namespace = ""
    if username.startswith(SA_PREFIX):
        namespace = username[len(SA_PREFIX):].partition(":")[0]
    audiences = status.get("audiences")
    return TokenReviewResult(
        authenticated=True,
        username=username,
        audiences=tuple(str(a) for a in audiences) if isinstance(audiences, list) else (),
        pod_name=first(POD_NAME_EXTRA),
        pod_namespace=namespace,
        pod_uid=first(POD_UID_EXTRA),
    )


def pod_node_lookup(api: KubeApi, source: KubernetesSource | None = None) -> PodNodeLookup:
    """(namespace, pod) → ``spec.nodeName``; the watch cache first, then a GET."""

    def lookup(namespace: str, name: str) -> str | None:
        body: Mapping[str, Any] | None = None
        if source is not None:
            body = source.get("Pod", namespace, name)
        if body is None:
            try:
                body = api.json("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
            except NotInstalled:  # 404: no such pod
                return None
        spec = body.get("spec")
        node = spec.get("nodeName") if isinstance(spec, Mapping) else None
        return str(node) if node else None

    return lookup


# -- the CA key in a Secret ------------------------------------------------------------


class CaSecretError(Exception):
    """The CA Secret cannot be read or written (RBAC, a malformed Secret)."""


def _decode(secret: Mapping[str, Any], name: str) -> dict[str, bytes]:
    data = secret.get("data") or {}
    if not isinstance(data, Mapping):
        raise CaSecretError(f"Secret {name}: data is not a mapping")
    out: dict[str, bytes] = {}
    for key, value in data.items():
        try:
            out[str(key)] = base64.b64decode(str(value), validate=True)
        except ValueError:
            raise CaSecretError(f"Secret {name}: {key} is not base64") from None
    return out


class SecretCaStore:
    """Where the CA's key material lives in Kubernetes (see the module docstring)."""

    def __init__(
        self,
        api: KubeApi,
        namespace: str,
        *,
        secret_name: str = CA_SECRET,
        cacerts_name: str = CACERTS_SECRET,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.secret_name = secret_name
        self.cacerts_name = cacerts_name

    def _path(self, name: str = "") -> str:
        base = f"/api/v1/namespaces/{self.namespace}/secrets"
        return f"{base}/{name}" if name else base

    def _get(self, name: str) -> dict[str, bytes] | None:
        try:
            return _decode(self.api.json("GET", self._path(name)), name)
        except NotInstalled:
            return None
        except ApiError as exc:
            raise CaSecretError(
                f"cannot read Secret {self.namespace}/{name}: {exc} (the controller needs RBAC "
                "get on secrets in its namespace)"
            ) from None

    def load_authority(
        self, state_dir: Path, trust_domain: str, max_ttl_s: int
    ) -> CertificateAuthority:
        """The CA, from ``cacerts``, else our Secret, else created now and stored."""
        _private_dir(state_dir)
        cacerts = self._get(self.cacerts_name)
        if cacerts is not None:
            directory = state_dir / "cacerts-secret"
            _materialize(directory, cacerts, CACERTS_KEYS)
            logger.info("using the operator's CA Secret", secret=f"{self.namespace}/"
                        f"{self.cacerts_name}")
            return CertificateAuthority.load_or_create(
                state_dir, trust_domain, max_ttl_s, cacerts_dir=directory
            )
        ca_dir = state_dir / "ca"
        stored = self._get(self.secret_name)
        if stored is not None:
            _materialize(ca_dir, stored, SELF_SIGNED_KEYS)
            return CertificateAuthority.load_or_create(state_dir, trust_domain, max_ttl_s)
        # First start: make the root locally, then publish it; a replica that won the race
        # has published first (409), and we adopt its key instead of ours.
        _materialize(ca_dir, {}, SELF_SIGNED_KEYS)
        ca = CertificateAuthority.load_or_create(state_dir, trust_domain, max_ttl_s)
        files = {k: (ca_dir / k).read_bytes() for k in SELF_SIGNED_KEYS if (ca_dir / k).exists()}
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": self.secret_name,
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/part-of": "ztunnel-py"},
            },
            "data": {k: base64.b64encode(v).decode("ascii") for k, v in files.items()},
        }
        try:
            self.api.json("POST", self._path(), body=secret)
        except ApiError as exc:
            if exc.status != 409:
                raise CaSecretError(
                    f"cannot create Secret {self.namespace}/{self.secret_name}: {exc} (the "
                    "controller needs RBAC create on secrets in its namespace)"
                ) from None
            logger.info("another controller created the CA Secret first; adopting it")
            return self.load_authority(state_dir, trust_domain, max_ttl_s)
        logger.info("created the mesh CA and stored it in a Secret",
                    secret=f"{self.namespace}/{self.secret_name}")
        return ca


ROOT_CONFIGMAP = "ztunnel-py-ca-root"
ROOT_KEY = "root-cert.pem"


def publish_roots(api: KubeApi, namespace: str, roots_pem: bytes,
                  name: str = ROOT_CONFIGMAP) -> bool:
    """Create or update the ConfigMap the agents mount to trust the controller (no key in it).

    Returns whether it was written. Agents get it as a volume, so they need no RBAC.
    """
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    want = roots_pem.decode("ascii")
    body: dict[str, Any] = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/part-of": "ztunnel-py"}},
        "data": {ROOT_KEY: want},
    }
    try:
        try:
            current = api.json("GET", f"{path}/{name}")
        except NotInstalled:
            api.json("POST", path, body=body)
            return True
        data = current.get("data")
        if isinstance(data, Mapping) and data.get(ROOT_KEY) == want:
            return False
        body["metadata"]["resourceVersion"] = current.get("metadata", {}).get("resourceVersion")
        api.json("PUT", f"{path}/{name}", body=body)
        return True
    except ApiError as exc:
        raise CaSecretError(
            f"cannot publish the mesh root in ConfigMap {namespace}/{name}: {exc} (the "
            "controller needs RBAC get, create and update on configmaps in its namespace)"
        ) from None


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _materialize(directory: Path, files: Mapping[str, bytes], names: Sequence[str]) -> None:
    """Write exactly ``files`` (of ``names``) into ``directory``; remove stale ones."""
    _private_dir(directory)
    for name in names:
        path = directory / name
        if name in files:
            _write_private(path, files[name])
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


# -- Kubernetes mode, assembled ----------------------------------------------------------


AGENT_SERVICE_ACCOUNT = "ztunnel-py-agent"


@dataclass(frozen=True)
class KubernetesMode:
    """What ``ztunnel-py controller --kubernetes`` runs on instead of directory mode's parts."""

    source: KubernetesSource
    ca: CertificateAuthority
    authenticator: KubernetesAuthenticator
    namespace: str


def kubernetes_mode(cfg: ControllerConfig, kubeconfig: Path | None = None) -> KubernetesMode:
    """The API source (not started), the CA from its Secret, the TokenReview authenticator.

    Blocking (it reads or creates the CA Secret): call it before the event loop
    serves traffic, or in a thread.
    """
    api = KubeApi(load_api_client(kubeconfig))
    namespace = cfg.kube_namespace or in_cluster_namespace()
    agents = cfg.agent_service_account or f"{namespace}/{AGENT_SERVICE_ACCOUNT}"
    source = KubernetesSource(api)
    ca = SecretCaStore(api, namespace).load_authority(
        cfg.state_dir, cfg.trust_domain, cfg.cert_max_ttl_s
    )
    authenticator = KubernetesAuthenticator(
        KubeTokenReviewer(api),
        pod_node_lookup(api, source),
        service_account=agents,
        audiences=(cfg.token_audience,),
    )
    publish_roots(api, namespace, ca.roots_pem)
    logger.info("Kubernetes mode", namespace=namespace, agent_service_account=agents,
                token_audience=cfg.token_audience, ca=ca.source)
    return KubernetesMode(source, ca, authenticator, namespace)
