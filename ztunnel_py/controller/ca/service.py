"""The gRPC certificate service (modelled on Istio's ``CreateCertificate``).

Per request: authenticate the caller's node, check the request, authorize the
identity against the current model (pure :func:`authorize`), verify and sign
the CSR. Every request, issued or refused, leaves exactly one audit log line;
the CSR itself (let alone any key) is never logged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from ztunnel_py import log
from ztunnel_py.controller.ca.auth import Authenticator, AuthError
from ztunnel_py.identity import spiffe
from ztunnel_py.identity import x509 as x509u
from ztunnel_py.identity.errors import CsrError, IdentityError
from ztunnel_py.proto_gen import ca_pb2, ca_pb2_grpc
from ztunnel_py.state.snapshot import Snapshot

MAX_CSR_BYTES = 16 * 1024


class CsrSigner(Protocol):
    trust_domain: str

    @property
    def max_ttl_s(self) -> float: ...

    def sign_csr(self, csr_pem: bytes, identity: str, ttl_s: float) -> tuple[bytes, bytes]: ...


@dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    message: str


def authorize(node: str, identity: str, snapshot: Snapshot) -> Refusal | None:
    """May ``node`` hold ``identity``? Only for workloads enrolled on that node (or its waypoints).

    Refusal messages say why without naming where else the identity lives.
    """
    local = [w for w in snapshot.workloads_on(node) if w.identity == identity]
    if not local:
        return Refusal(
            grpc.StatusCode.PERMISSION_DENIED,
            f"no workload with identity {identity} runs on node {node} "
            f"(model version {snapshot.version or 'empty'})",
        )
    if not any(w.enrolled or w.is_waypoint for w in local):
        return Refusal(
            grpc.StatusCode.PERMISSION_DENIED,
            f"the workloads with identity {identity} on node {node} are not enrolled in the "
            "mesh (label istio.io/dataplane-mode=ambient)",
        )
    return None


def check_request(identity: str, csr: str, validity_s: int, trust_domain: str) -> Refusal | None:
    """Shape checks before authorization: an identity of our trust domain, a CSR, a validity."""
    if not identity:
        return Refusal(grpc.StatusCode.INVALID_ARGUMENT, "the request names no identity")
    try:
        spiffe.check_trust_domain(identity, trust_domain)
    except IdentityError as exc:
        return Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if not csr:
        return Refusal(grpc.StatusCode.INVALID_ARGUMENT, "the request carries no CSR")
    if len(csr) > MAX_CSR_BYTES:
        return Refusal(
            grpc.StatusCode.INVALID_ARGUMENT, f"the CSR is {len(csr)} bytes (max {MAX_CSR_BYTES})"
        )
    if validity_s < 0:
        return Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"negative validity {validity_s}s")
    return None


def _audit() -> Any:
    return log.get("controller.ca.audit")


class CertificateServicer(ca_pb2_grpc.CertificateServiceServicer):
    def __init__(
        self,
        ca: CsrSigner,
        authenticator: Authenticator,
        snapshot_provider: Callable[[], Snapshot],
    ) -> None:
        self._ca = ca
        self._auth = authenticator
        self._snapshot = snapshot_provider

    async def CreateCertificate(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        identity: str = request.identity
        fields: dict[str, object] = {
            "identity": identity,
            "peer": context.peer(),
            "requested_ttl_s": request.validity_duration,
        }
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        try:
            # In Kubernetes mode this may ask the API server (TokenReview): off the loop.
            node = await asyncio.to_thread(self._auth.authenticate, metadata)
        except AuthError as exc:
            return await self._refuse(context, Refusal(exc.code, exc.message), fields)
        fields["node"] = node
        refusal = check_request(
            identity, request.csr, request.validity_duration, self._ca.trust_domain
        ) or authorize(node, identity, self._snapshot())
        if refusal is not None:
            return await self._refuse(context, refusal, fields)
        ttl_s = request.validity_duration or self._ca.max_ttl_s
        try:
            csr_pem = request.csr.encode("ascii")
            chain_pem, roots_pem = self._ca.sign_csr(csr_pem, identity, ttl_s)
        except UnicodeEncodeError:
            refusal = Refusal(grpc.StatusCode.INVALID_ARGUMENT, "the CSR is not ASCII PEM")
            return await self._refuse(context, refusal, fields)
        except (CsrError, IdentityError) as exc:
            refusal = Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return await self._refuse(context, refusal, fields)
        chain = x509u.load_certs(chain_pem, "issued chain")
        roots = x509u.load_certs(roots_pem, "roots")
        root = x509u.issuing_root(chain[-1], roots) or roots[0]
        leaf = chain[0]
        _audit().info(
            "certificate issued",
            outcome="issued",
            serial=f"{leaf.serial_number:x}",
            not_after=leaf.not_valid_after_utc.isoformat(),
            ttl_s=(leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds(),
            **fields,
        )
        return ca_pb2.CreateCertificateResponse(
            cert_chain=[x509u.certs_pem([c]).decode("ascii") for c in (*chain, root)],
            trust_bundle=[x509u.certs_pem([r]).decode("ascii") for r in roots],
        )

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        refusal: Refusal,
        fields: dict[str, object],
    ) -> Any:
        _audit().warning(
            "certificate refused",
            outcome="refused",
            code=refusal.code.name,
            reason=refusal.message,
            **fields,
        )
        await context.abort(refusal.code, refusal.message)


def add_certificate_service(
    server: grpc.aio.Server,
    ca: CsrSigner,
    authenticator: Authenticator,
    snapshot_provider: Callable[[], Snapshot],
) -> CertificateServicer:
    """Register the certificate service on the controller's gRPC (TLS) server."""
    servicer = CertificateServicer(ca, authenticator, snapshot_provider)
    ca_pb2_grpc.add_CertificateServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    return servicer
