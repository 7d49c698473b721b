"""Identity in Kubernetes, against the fake API server: TokenReview, node check, CA Secret.

The CSR tests run the real certificate service over gRPC on loopback, with the
real ``KubernetesAuthenticator`` on top of this module's TokenReview adapter,
the pod → node lookup from the watch cache, and a CA loaded from a Secret.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.fakes.kubeapi import FakeKubeApi, service_account_review
from ztunnel_py.controller import kube, kube_identity
from ztunnel_py.controller.ca.auth import KubernetesAuthenticator
from ztunnel_py.controller.ca.service import add_certificate_service
from ztunnel_py.controller.translate import translate
from ztunnel_py.identity import x509 as x509u
from ztunnel_py.proto_gen import ca_pb2, ca_pb2_grpc

SYSTEM_NS = "ztunnel-py-system"
AGENT_SA = "ztunnel-py-agent"


def pod(name: str, ns: str, node: str, sa: str, ip: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {"nodeName": node, "serviceAccountName": sa,
                 "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "podIP": ip,
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }


@pytest.fixture
def fake() -> Iterator[FakeKubeApi]:
    with FakeKubeApi() as api:
        api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SYSTEM_NS}})
        api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": "demo", "labels": {"istio.io/dataplane-mode": "ambient"}}})
        a = api.apply(pod("agent-a", SYSTEM_NS, "node-1", AGENT_SA, "192.168.0.1"))
        b = api.apply(pod("agent-b", SYSTEM_NS, "node-2", AGENT_SA, "192.168.0.2"))
        api.apply(pod("web", "demo", "node-1", "web", "10.0.1.5"))
        api.apply(pod("db", "demo", "node-2", "db", "10.0.2.5"))
        api.token_reviews["token-a"] = service_account_review(
            SYSTEM_NS, AGENT_SA, "agent-a", a["metadata"]["uid"])
        api.token_reviews["token-b"] = service_account_review(
            SYSTEM_NS, AGENT_SA, "agent-b", b["metadata"]["uid"])
        api.token_reviews["token-web"] = service_account_review("demo", "web", "web", "u-web")
        yield api


def api_for(fake: FakeKubeApi) -> kube.KubeApi:
    return kube.KubeApi(kube.load_api_client(fake.write_kubeconfig()))


def test_token_review_reads_the_bound_pod_and_caches(fake: FakeKubeApi) -> None:
    reviewer = kube_identity.KubeTokenReviewer(api_for(fake))
    result = reviewer.review("token-a", ["istio-ca"])
    assert result.authenticated
    assert result.username == f"system:serviceaccount:{SYSTEM_NS}:{AGENT_SA}"
    assert (result.pod_namespace, result.pod_name) == (SYSTEM_NS, "agent-a")
    assert result.audiences == ("istio-ca",)
    sent = fake.review_requests[0]
    assert sent["spec"] == {"token": "token-a", "audiences": ["istio-ca"]}

    assert reviewer.review("token-a", ["istio-ca"]) == result
    assert len(fake.review_requests) == 1  # cached

    wrong_audience = reviewer.review("token-a", ["other"])
    assert not wrong_audience.authenticated and "audience" in wrong_audience.error
    bad = reviewer.review("forged", ["istio-ca"])
    assert not bad.authenticated and bad.error


@pytest.fixture
async def ca_server(fake: FakeKubeApi, tmp_path: Path) -> AsyncIterator[tuple[str, Any]]:
    api = api_for(fake)
    source = kube.KubernetesSource(api, settings=kube.SourceSettings(backoff_initial_s=0.05))
    await source.start(sync_timeout_s=10)
    ca = kube_identity.SecretCaStore(api, SYSTEM_NS).load_authority(
        tmp_path / "state", "cluster.local", 3600)
    auth = KubernetesAuthenticator(
        kube_identity.KubeTokenReviewer(api),
        kube_identity.pod_node_lookup(api, source),
        service_account=f"{SYSTEM_NS}/{AGENT_SA}",
    )

    def snapshot() -> Any:
        return translate(source.objects(), trust_domain="cluster.local",
                         root_namespace="istio-system").snapshot

    server = grpc.aio.server()
    add_certificate_service(server, ca, auth, snapshot)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", ca
    finally:
        await server.stop(0)
        await source.stop()


async def create_certificate(address: str, token: str, node: str, identity: str) -> Any:
    csr = x509u.build_csr(x509u.new_key(), identity).decode()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = ca_pb2_grpc.CertificateServiceStub(channel)  # type: ignore[no-untyped-call]
        return await stub.CreateCertificate(
            ca_pb2.CreateCertificateRequest(csr=csr, validity_duration=600, identity=identity),
            metadata=(("authorization", f"Bearer {token}"), ("x-ztunnel-node", node)),
            timeout=10,
        )


WEB = "spiffe://cluster.local/ns/demo/sa/web"
DB = "spiffe://cluster.local/ns/demo/sa/db"


async def test_agent_gets_certificates_for_its_own_node(ca_server: tuple[str, Any]) -> None:
    address, _ = ca_server
    reply = await create_certificate(address, "token-a", "node-1", WEB)
    leaf = x509u.load_certs(reply.cert_chain[0].encode(), "leaf")[0]
    assert x509u.uri_sans(leaf) == [WEB]


async def test_csr_from_agent_whose_token_names_a_pod_on_another_node_is_refused(
    ca_server: tuple[str, Any],
) -> None:
    address, _ = ca_server
    # agent-a's token (its pod runs on node-1) claiming node-2 to get db's identity
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create_certificate(address, "token-a", "node-2", DB)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "runs on node 'node-1'" in (err.value.details() or "")
    # and its own node cannot get identities of workloads elsewhere either
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create_certificate(address, "token-a", "node-1", DB)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_workload_token_is_not_an_agent(ca_server: tuple[str, Any]) -> None:
    address, _ = ca_server
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create_certificate(address, "token-web", "node-1", WEB)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_ca_secret_created_once_and_reused(fake: FakeKubeApi, tmp_path: Path) -> None:
    api = api_for(fake)
    first = kube_identity.SecretCaStore(api, SYSTEM_NS).load_authority(
        tmp_path / "one", "cluster.local", 3600)
    stored = fake.objects[("", "secrets", SYSTEM_NS, kube_identity.CA_SECRET)]
    assert set(stored["data"]) == {"ca-cert.pem", "ca-key.pem"}
    key_file = tmp_path / "one" / "ca" / "ca-key.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert base64.b64decode(stored["data"]["ca-key.pem"]) == key_file.read_bytes()

    # a restart (or a second replica) with an empty state dir adopts the same root
    second = kube_identity.SecretCaStore(api, SYSTEM_NS).load_authority(
        tmp_path / "two", "cluster.local", 3600)
    assert second.roots_pem == first.roots_pem
    posts = [r for r in fake.requests if r.method == "POST" and r.path.endswith("/secrets")]
    assert len(posts) == 1


def test_losing_the_create_race_adopts_the_winner(fake: FakeKubeApi, tmp_path: Path) -> None:
    api = api_for(fake)
    winner = kube_identity.SecretCaStore(api, SYSTEM_NS).load_authority(
        tmp_path / "winner", "cluster.local", 3600)

    class RacingApi(kube.KubeApi):
        """Sees no Secret on the first GET (the winner had not stored it yet)."""

        hidden = True

        def json(self, method: str, path: str, query: Any = None, body: Any = None) -> Any:
            if self.hidden and method == "GET" and path.endswith(kube_identity.CA_SECRET):
                self.hidden = False
                raise kube.NotInstalled(404, "not found", path)
            return super().json(method, path, query, body)

    loser = kube_identity.SecretCaStore(RacingApi(api.api_client), SYSTEM_NS).load_authority(
        tmp_path / "loser", "cluster.local", 3600)
    assert loser.roots_pem == winner.roots_pem


def test_operator_cacerts_secret_wins(fake: FakeKubeApi, tmp_path: Path) -> None:
    key = x509u.new_key()
    root = x509u.self_signed_root(key, "cluster.local")
    pem = x509u.certs_pem([root])
    fake.apply({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": "cacerts", "namespace": SYSTEM_NS},
                "data": {k: base64.b64encode(v).decode() for k, v in {
                    "ca-cert.pem": pem, "root-cert.pem": pem,
                    "ca-key.pem": x509u.private_key_pem(key)}.items()}})
    ca = kube_identity.SecretCaStore(api_for(fake), SYSTEM_NS).load_authority(
        tmp_path / "state", "cluster.local", 3600)
    assert ca.roots_pem == pem
    assert ca.source.startswith("cacerts")
    assert ("", "secrets", SYSTEM_NS, kube_identity.CA_SECRET) not in fake.objects


def test_parse_review_tolerates_partial_answers() -> None:
    assert not kube_identity.parse_review({}).authenticated
    r = kube_identity.parse_review({"status": {"authenticated": True, "user": {
        "username": "system:serviceaccount:ns1:sa1"}}})
    assert r.authenticated and r.pod_namespace == "ns1" and r.pod_name == ""


def test_roots_are_published_for_agents_and_kept_current(fake: FakeKubeApi) -> None:
    api = api_for(fake)
    assert kube_identity.publish_roots(api, SYSTEM_NS, b"ROOT-1\n")
    key = ("", "configmaps", SYSTEM_NS, kube_identity.ROOT_CONFIGMAP)
    assert fake.objects[key]["data"] == {"root-cert.pem": "ROOT-1\n"}
    assert not kube_identity.publish_roots(api, SYSTEM_NS, b"ROOT-1\n")  # unchanged: no write
    assert kube_identity.publish_roots(api, SYSTEM_NS, b"ROOT-1\nROOT-2\n")  # a rotation
    assert fake.objects[key]["data"] == {"root-cert.pem": "ROOT-1\nROOT-2\n"}


def test_kubernetes_mode_assembles_source_ca_and_authenticator(
    fake: FakeKubeApi, tmp_path: Path
) -> None:
    from ztunnel_py.config import ControllerConfig

    cfg = ControllerConfig(kubernetes=True, state_dir=tmp_path / "state",
                           kube_namespace=SYSTEM_NS)
    mode = kube_identity.kubernetes_mode(cfg, fake.write_kubeconfig())
    assert mode.namespace == SYSTEM_NS
    published = fake.objects[("", "configmaps", SYSTEM_NS, kube_identity.ROOT_CONFIGMAP)]
    assert published["data"]["root-cert.pem"] == mode.ca.roots_pem.decode()
    assert ("", "secrets", SYSTEM_NS, kube_identity.CA_SECRET) in fake.objects
    # the default agent identity is <namespace>/ztunnel-py-agent, audience istio-ca
    node = mode.authenticator.authenticate(
        {"authorization": "Bearer token-a", "x-ztunnel-node": "node-1"})
    assert node == "node-1"
    assert fake.review_requests[-1]["spec"]["audiences"] == ["istio-ca"]
