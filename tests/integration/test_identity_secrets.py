"""No private-key material in any log line or admin dump produced by the identity code.

The scenario drives the real CA over gRPC (issue, refusals), the secret
manager (prefetch, rotation, a CA outage) and the TLS helpers, while every
structlog event (before and after rendering) and every stdlib log record is
captured. The captured text, plus every describe()/repr dump, is then searched
for "PRIVATE KEY" and for the bytes of every private key that existed.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from ztunnel_py import log
from ztunnel_py.config import LogConfig
from ztunnel_py.controller.ca.auth import BootstrapTokens
from ztunnel_py.controller.ca.authority import CertificateAuthority
from ztunnel_py.controller.ca.service import add_certificate_service
from ztunnel_py.identity import tls
from ztunnel_py.identity import x509 as x509u
from ztunnel_py.identity.errors import IdentityError
from ztunnel_py.identity.manager import GrpcCaClient, RefreshPolicy, SecretManager
from ztunnel_py.identity.testing import mismatched_csr
from ztunnel_py.proto_gen import ca_pb2, ca_pb2_grpc
from ztunnel_py.state.model import Workload
from ztunnel_py.state.snapshot import Snapshot

pytestmark = pytest.mark.slow

TD = "cluster.local"
ALICE = f"spiffe://{TD}/ns/default/sa/alice"
BOB = f"spiffe://{TD}/ns/default/sa/bob"
SNAPSHOT = Snapshot(
    workloads=tuple(
        Workload(uid=f"default/{n}", name=n, namespace="default", service_account=n,
                 node=node, ips=(), enrolled=True)
        for n, node in (("alice", "node-1"), ("bob", "node-2"))
    )
)


async def eventually(predicate: Callable[[], object], timeout_s: float = 5) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.05)


def key_needles(key_pem: bytes) -> list[str]:
    """Strings that would betray this key: PEM body lines, DER base64, the scalar."""
    lines = [ln for ln in key_pem.decode().splitlines() if ln and not ln.startswith("-----")]
    key = load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    d = key.private_numbers().private_value
    der = base64.b64decode("".join(lines))
    return [
        *[ln for ln in lines if len(ln) >= 16],
        base64.b64encode(der).decode(),
        f"{d:064x}", f"{d:x}", str(d), der.hex(), repr(der)[2:40],
    ]


def leaks(text: str, keys: list[bytes]) -> list[str]:
    found = ["PRIVATE KEY"] if "PRIVATE KEY" in text else []
    for key_pem in keys:
        found += [n[:20] + "..." for n in key_needles(key_pem) if n in text]
    return found


def test_the_scanner_finds_a_planted_key() -> None:
    key = x509u.private_key_pem(x509u.new_key())
    k = load_pem_private_key(key, None)
    assert isinstance(k, ec.EllipticCurvePrivateKey)
    body = key.decode().splitlines()[1]
    assert leaks(f"event={body!r}", [key])
    assert leaks(json.dumps({"k": key.decode()}).replace("PRIVATE", "P"), [key])
    assert leaks(f"d={k.private_numbers().private_value:x}", [key])
    assert not leaks("certificate issued serial=abc", [key])


@pytest.fixture
def captured(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], str]]:
    """Everything logged from now on: raw structlog events, rendered lines, stdlib records."""
    old = structlog.get_config()
    root_handlers = list(logging.getLogger().handlers)
    raw: list[str] = []
    rendered = io.StringIO()
    log.configure(LogConfig(format="json", level="debug"), stream=rendered)

    def tap(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        raw.append(repr(event))
        return event

    structlog.configure(processors=[tap, *structlog.get_config()["processors"]])
    caplog.set_level(logging.DEBUG)
    try:
        yield lambda: "\n".join(raw) + rendered.getvalue() + "\n".join(
            r.getMessage() for r in caplog.records
        )
    finally:
        structlog.configure(**old)
        for handler in logging.getLogger().handlers:
            if handler not in root_handlers:
                logging.getLogger().removeHandler(handler)


async def test_no_private_key_material_in_logs_or_dumps(
    tmp_path: Path, captured: Callable[[], str]
) -> None:
    keys: list[bytes] = []
    dumps: list[str] = []

    ca = CertificateAuthority.load_or_create(tmp_path, TD, 3600)
    keys.append((tmp_path / "ca" / "ca-key.pem").read_bytes())
    tokens = BootstrapTokens(tmp_path)
    token = tokens.token_for("node-1")
    chain, serving_key = ca.serving_certificate([], ["127.0.0.1"])
    keys.append(serving_key)
    server = grpc.aio.server()
    add_certificate_service(server, ca, tokens, lambda: SNAPSHOT)
    creds = grpc.ssl_server_credentials([(serving_key, chain)])
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    channel = grpc.aio.secure_channel(
        f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca.roots_pem)
    )
    mgr = SecretManager(
        GrpcCaClient(channel, token=token, timeout_s=2),
        policy=RefreshPolicy(ttl_s=2, jitter=0.0, backoff_initial_s=0.1, backoff_max_s=0.2),
    )
    try:
        # issue and rotate
        mgr.retain([ALICE])
        first = await mgr.fetch(ALICE)
        keys.append(first.key_pem)
        dumps += [repr(first), json.dumps(mgr.describe()), json.dumps(ca.describe())]
        tls.server_context(first)
        tls.client_context(first)
        await eventually(lambda: (c := mgr.current(ALICE)) and c.serial != first.serial)
        cur = mgr.current(ALICE)
        assert cur is not None
        keys.append(cur.key_pem)
        dumps += [repr(cur), json.dumps(mgr.describe())]

        # refusals: another node's identity, a bad CSR, a bad token
        stub = ca_pb2_grpc.CertificateServiceStub(channel)
        md = [("authorization", f"Bearer {token}")]
        bad_key = x509u.new_key()
        keys.append(x509u.private_key_pem(bad_key))
        for identity, csr, metadata in (
            (BOB, x509u.build_csr(bad_key, BOB), md),
            (ALICE, mismatched_csr(ALICE), md),
            (ALICE, x509u.private_key_pem(bad_key), md),  # a key sent as a "CSR"!
            (ALICE, x509u.build_csr(bad_key, ALICE), [("authorization", "Bearer nope")]),
        ):
            request = ca_pb2.CreateCertificateRequest(
                csr=csr.decode(), validity_duration=60, identity=identity
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.CreateCertificate(request, metadata=metadata, timeout=5)
            dumps.append(str(err.value.details()))
        try:
            await mgr.fetch(BOB)
        except IdentityError as exc:
            dumps.append(str(exc))

        # a CA outage while certificates rotate
        await server.stop(None)
        await eventually(lambda: any(r["failures"] for r in mgr.describe()))
        dumps.append(json.dumps(mgr.describe()))
        for c in (mgr.current(ALICE),):
            if c is not None:
                keys.append(c.key_pem)
    finally:
        await mgr.close()
        await channel.close()
        await server.stop(None)

    text = captured()
    assert "certificate issued" in text and "certificate refused" in text, "the capture works"
    assert "certificate refresh failed" in text
    everything = text + "\n".join(dumps)
    assert leaks(everything, keys) == []
