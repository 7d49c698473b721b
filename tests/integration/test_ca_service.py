"""The certificate service over real gRPC with TLS on loopback, against the real CA."""

from __future__ import annotations

import datetime as dt
import subprocess
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ztunnel_py.controller.ca.auth import (
    BootstrapTokens,
    KubernetesAuthenticator,
    TokenReviewResult,
)
from ztunnel_py.controller.ca.authority import CertificateAuthority
from ztunnel_py.controller.ca.service import add_certificate_service
from ztunnel_py.identity import x509 as x509u
from ztunnel_py.identity.certs import WorkloadCertificate
from ztunnel_py.identity.errors import CaError
from ztunnel_py.identity.manager import GrpcCaClient, RefreshPolicy, SecretManager
from ztunnel_py.identity.testing import mismatched_csr
from ztunnel_py.proto_gen import ca_pb2, ca_pb2_grpc
from ztunnel_py.state.model import Workload
from ztunnel_py.state.snapshot import Snapshot

TD = "cluster.local"
ALICE = f"spiffe://{TD}/ns/default/sa/alice"  # enrolled on node-1
BOB = f"spiffe://{TD}/ns/default/sa/bob"  # enrolled on node-2
CAROL = f"spiffe://{TD}/ns/default/sa/carol"  # on node-1, not enrolled
WAYPOINT = f"spiffe://{TD}/ns/default/sa/waypoint"  # waypoint pod on node-1
MAX_TTL = 3600


def workload(name: str, node: str, *, enrolled: bool = True, waypoint: bool = False) -> Workload:
    return Workload(
        uid=f"default/{name}",
        name=name,
        namespace="default",
        service_account=name,
        node=node,
        ips=(),
        enrolled=enrolled,
        is_waypoint=waypoint,
    )


SNAPSHOT = Snapshot(
    version="v1",
    workloads=(
        workload("alice", "node-1"),
        workload("bob", "node-2"),
        workload("carol", "node-1", enrolled=False),
        workload("waypoint", "node-1", enrolled=False, waypoint=True),
    ),
)


@dataclass
class Controller:
    ca: CertificateAuthority
    tokens: BootstrapTokens
    address: str
    channel: grpc.aio.Channel

    def stub(self) -> ca_pb2_grpc.CertificateServiceStub:
        return ca_pb2_grpc.CertificateServiceStub(self.channel)

    async def create(
        self, identity: str, csr: str, ttl_s: int = 600, token: str | None = None
    ) -> ca_pb2.CreateCertificateResponse:
        md = [("authorization", f"Bearer {token}")] if token is not None else []
        request = ca_pb2.CreateCertificateRequest(
            csr=csr, validity_duration=ttl_s, identity=identity
        )
        return await self.stub().CreateCertificate(request, metadata=md, timeout=10)


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    ca = CertificateAuthority.load_or_create(tmp_path / "state", TD, MAX_TTL)
    tokens = BootstrapTokens(tmp_path / "state")
    server = grpc.aio.server()
    add_certificate_service(server, ca, tokens, lambda: SNAPSHOT)
    chain, key = ca.serving_certificate(["controller.test"], ["127.0.0.1"])
    creds = grpc.ssl_server_credentials([(key, chain)])
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(ca.roots_pem))
    try:
        yield Controller(ca, tokens, address, channel)
    finally:
        await channel.close()
        await server.stop(None)


def csr_for(identity: str) -> tuple[str, ec.EllipticCurvePrivateKey]:
    key = x509u.new_key()
    return x509u.build_csr(key, identity).decode(), key


def openssl_verify(tmp_path: Path, roots_pem: bytes, chain: list[str]) -> str:
    (tmp_path / "roots.pem").write_bytes(roots_pem)
    (tmp_path / "leaf.pem").write_text(chain[0])
    (tmp_path / "untrusted.pem").write_text("".join(chain[1:]))
    proc = subprocess.run(
        [
            "openssl", "verify", "-CAfile", str(tmp_path / "roots.pem"),
            "-untrusted", str(tmp_path / "untrusted.pem"), "-purpose", "sslclient",
            str(tmp_path / "leaf.pem"),
        ],
        capture_output=True, text=True, timeout=30, check=False,
    )
    return proc.stdout + proc.stderr


async def test_enrolled_workload_on_callers_node_gets_a_verifiable_chain(
    controller: Controller, tmp_path: Path
) -> None:
    token = controller.tokens.token_for("node-1")
    csr, key = csr_for(ALICE)
    response = await controller.create(ALICE, csr, ttl_s=600, token=token)
    chain = list(response.cert_chain)
    assert len(chain) == 2  # leaf, root (self-signed CA: no intermediates)
    assert chain[-1].encode() == controller.ca.roots_pem
    assert "OK" in openssl_verify(tmp_path, controller.ca.roots_pem, chain)
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert [str(n.value) for n in san.value] == [ALICE]
    ttl = dt.timedelta(seconds=600)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == ttl + x509u.backdate(ttl)
    assert leaf.public_key() == key.public_key()
    # the agent side accepts it as a workload certificate
    cert = WorkloadCertificate.from_pem(
        "".join(chain).encode(), x509u.private_key_pem(key), "".join(response.trust_bundle).encode()
    )
    assert cert.identity == ALICE and cert.serial == leaf.serial_number


async def test_validity_is_capped_at_the_configured_maximum(controller: Controller) -> None:
    token = controller.tokens.token_for("node-1")
    csr, _ = csr_for(ALICE)
    response = await controller.create(ALICE, csr, ttl_s=10 * MAX_TTL, token=token)
    leaf = x509.load_pem_x509_certificate(response.cert_chain[0].encode())
    ttl = dt.timedelta(seconds=MAX_TTL)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == ttl + x509u.backdate(ttl)


async def test_waypoint_identity_is_allowed_on_its_node(controller: Controller) -> None:
    token = controller.tokens.token_for("node-1")
    response = await controller.create(WAYPOINT, csr_for(WAYPOINT)[0], token=token)
    assert len(response.cert_chain) == 2


def other_key_csr(identity: str) -> str:
    key = ec.generate_private_key(ec.SECP384R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True
        )
        .sign(key, hashes.SHA384())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


REFUSALS = {
    "workload on another node": (BOB, lambda: csr_for(BOB)[0], "node-1", "PERMISSION_DENIED"),
    "workload not enrolled": (CAROL, lambda: csr_for(CAROL)[0], "node-1", "PERMISSION_DENIED"),
    "unknown identity": (
        f"spiffe://{TD}/ns/x/sa/nobody", lambda: csr_for(f"spiffe://{TD}/ns/x/sa/nobody")[0],
        "node-1", "PERMISSION_DENIED",
    ),
    "SAN differs from the request": (ALICE, lambda: csr_for(BOB)[0], "node-1", "INVALID_ARGUMENT"),
    "bad CSR signature": (ALICE, lambda: mismatched_csr(ALICE).decode(), "node-1",
                          "INVALID_ARGUMENT"),
    "garbage instead of a CSR": (
        ALICE, lambda: "\x00\x01garbage\xff" * 50, "node-1", "INVALID_ARGUMENT"
    ),
    "PEM header around garbage": (
        ALICE,
        lambda: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        "node-1", "INVALID_ARGUMENT",
    ),
    "P-384 key": (ALICE, lambda: other_key_csr(ALICE), "node-1", "INVALID_ARGUMENT"),
    "other trust domain": (
        "spiffe://evil.example/ns/default/sa/alice",
        lambda: csr_for("spiffe://evil.example/ns/default/sa/alice")[0],
        "node-1", "INVALID_ARGUMENT",
    ),
    "not a SPIFFE id": (
        "alice", lambda: csr_for(ALICE)[0], "node-1", "INVALID_ARGUMENT"
    ),
    "unknown token": (ALICE, lambda: csr_for(ALICE)[0], None, "UNAUTHENTICATED"),
}


@pytest.fixture
def audit() -> Iterator[list[dict[str, object]]]:
    with structlog.testing.capture_logs() as events:
        yield events


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_refusals_have_the_right_status_and_one_audit_line(
    controller: Controller, case: str, audit: list[dict[str, object]]
) -> None:
    identity, make_csr, node, code = REFUSALS[case]
    token = controller.tokens.token_for(node) if node else "not-a-token"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await controller.create(identity, make_csr(), token=token)
    assert err.value.code().name == code, err.value.details()
    assert err.value.details()
    lines = [e for e in audit if e.get("component") == "controller.ca.audit"]
    assert len(lines) == 1
    assert lines[0]["outcome"] == "refused" and lines[0]["code"] == code
    assert "BEGIN" not in repr(lines[0])  # no CSR in the audit trail
    # the service survived: a good request still works
    token = controller.tokens.token_for("node-1")
    good = await controller.create(ALICE, csr_for(ALICE)[0], token=token)
    assert len(good.cert_chain) == 2


async def test_revoked_and_missing_tokens_are_unauthenticated(controller: Controller) -> None:
    token = controller.tokens.token_for("node-1")
    assert await controller.create(ALICE, csr_for(ALICE)[0], token=token)
    assert controller.tokens.revoke("node-1")
    for bad in (token, None):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await controller.create(ALICE, csr_for(ALICE)[0], token=bad)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # a new token for the node works again; the old one stays dead
    fresh = controller.tokens.token_for("node-1")
    assert fresh != token
    assert await controller.create(ALICE, csr_for(ALICE)[0], token=fresh)


async def test_a_node_token_cannot_be_used_for_another_node(controller: Controller) -> None:
    token_2 = controller.tokens.token_for("node-2")
    assert await controller.create(BOB, csr_for(BOB)[0], token=token_2)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await controller.create(ALICE, csr_for(ALICE)[0], token=token_2)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_raw_garbage_bytes_do_not_crash_the_service(controller: Controller) -> None:
    raw = controller.channel.unary_unary(
        "/ztunnel.ca.v1.CertificateService/CreateCertificate",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    token = controller.tokens.token_for("node-1")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw(b"\xff\xfe\x00garbage" * 20, metadata=[("authorization", f"Bearer {token}")])
    assert err.value.code() != grpc.StatusCode.OK
    assert await controller.create(ALICE, csr_for(ALICE)[0], token=token)


async def test_secret_manager_over_grpc(controller: Controller) -> None:
    token = controller.tokens.token_for("node-1")
    client = GrpcCaClient(controller.channel, token=lambda: token)
    mgr = SecretManager(client, policy=RefreshPolicy(ttl_s=900, backoff_initial_s=10))
    try:
        cert = await mgr.fetch(ALICE)
        assert cert.identity == ALICE
        assert cert.roots_pem == controller.ca.roots_pem
        assert cert.chain_pem.count(b"BEGIN CERTIFICATE") == 1  # the root is not in the chain
        assert cert.lifetime == dt.timedelta(seconds=900) + x509u.CLOCK_SKEW_GRACE
        with pytest.raises(CaError, match="PERMISSION_DENIED"):
            await client.sign(x509u.build_csr(x509u.new_key(), BOB), BOB, 60)
    finally:
        await mgr.close()


async def test_grpc_client_reports_unauthenticated_with_a_hint(controller: Controller) -> None:
    client = GrpcCaClient(controller.channel, token="bogus")
    with pytest.raises(CaError, match=r"UNAUTHENTICATED.*ZTUNNEL_TOKEN_FILE") as err:
        await client.sign(x509u.build_csr(x509u.new_key(), ALICE), ALICE, 60)
    assert err.value.code == "UNAUTHENTICATED"


class FakeReviewer:
    """TokenReview as the API server would answer for one agent pod on node-1."""

    def review(self, token: str, audiences: Sequence[str]) -> TokenReviewResult:
        if token != "projected-sa-token" or "istio-ca" not in audiences:
            return TokenReviewResult(False, error="invalid bearer token")
        return TokenReviewResult(
            True, username="system:serviceaccount:istio-system:ztunnel", audiences=("istio-ca",),
            pod_name="ztunnel-abcde", pod_namespace="istio-system",
        )


async def test_kubernetes_mode_over_grpc(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, TD, MAX_TTL)
    pods = {("istio-system", "ztunnel-abcde"): "node-1"}
    auth = KubernetesAuthenticator(FakeReviewer(), lambda ns, name: pods.get((ns, name)))
    server = grpc.aio.server()
    add_certificate_service(server, ca, auth, lambda: SNAPSHOT)
    chain, key = ca.serving_certificate(["controller.test"], [])
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, chain)]))
    await server.start()
    channel = grpc.aio.secure_channel(
        f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca.roots_pem),
        options=[("grpc.ssl_target_name_override", "controller.test")],
    )
    try:
        ok = GrpcCaClient(channel, token="projected-sa-token", node="node-1")
        chain_pem, _roots = await ok.sign(x509u.build_csr(x509u.new_key(), ALICE), ALICE, 60)
        assert x509u.leaf_identity(x509u.load_certs(chain_pem, "c")[0], TD) == ALICE
        # the same pod's token cannot pose as an agent on node-2
        liar = GrpcCaClient(channel, token="projected-sa-token", node="node-2")
        with pytest.raises(CaError) as err:
            await liar.sign(x509u.build_csr(x509u.new_key(), BOB), BOB, 60)
        assert err.value.code == "PERMISSION_DENIED"
        stolen = GrpcCaClient(channel, token="someone-elses-token", node="node-1")
        with pytest.raises(CaError) as err:
            await stolen.sign(x509u.build_csr(x509u.new_key(), ALICE), ALICE, 60)
        assert err.value.code == "UNAUTHENTICATED"
    finally:
        await channel.close()
        await server.stop(None)


async def test_operator_intermediate_chain_verifies_with_openssl(tmp_path: Path) -> None:
    from tests.unit.test_ca_authority import write_cacerts

    root = write_cacerts(tmp_path / "state" / "cacerts")
    ca = CertificateAuthority.load_or_create(tmp_path / "state", TD, MAX_TTL)
    tokens = BootstrapTokens(tmp_path / "state")
    server = grpc.aio.server()
    add_certificate_service(server, ca, tokens, lambda: SNAPSHOT)
    chain, key = ca.serving_certificate(["controller.test"], ["127.0.0.1"])
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, chain)]))
    await server.start()
    channel = grpc.aio.secure_channel(
        f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca.roots_pem)
    )
    try:
        controller = Controller(ca, tokens, f"127.0.0.1:{port}", channel)
        response = await controller.create(
            ALICE, csr_for(ALICE)[0], token=tokens.token_for("node-1")
        )
    finally:
        await channel.close()
        await server.stop(None)
    issued = list(response.cert_chain)
    assert len(issued) == 3  # leaf, intermediate, root
    assert issued[-1].encode() == x509u.certs_pem([root])
    root_only = x509u.certs_pem([root])
    assert "OK" in openssl_verify(tmp_path, root_only, issued[:-1])
    # without the intermediate, the leaf does not verify: the chain really is needed
    out = openssl_verify(tmp_path, root_only, [issued[0], issued[-1]])
    assert "unable to get local issuer certificate" in out, out
