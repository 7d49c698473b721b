"""The CA goes away: the agent keeps its certificates, backs off, and recovers when it returns."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from ztunnel_py.controller.ca.auth import BootstrapTokens
from ztunnel_py.controller.ca.authority import CertificateAuthority
from ztunnel_py.controller.ca.service import add_certificate_service
from ztunnel_py.identity.errors import CaError, CertificateUnavailable
from ztunnel_py.identity.manager import GrpcCaClient, RefreshPolicy, SecretManager
from ztunnel_py.identity.testing import InMemoryCA, InMemoryCaClient
from ztunnel_py.state.model import Workload
from ztunnel_py.state.snapshot import Snapshot

pytestmark = pytest.mark.slow

TD = "cluster.local"
ALICE = f"spiffe://{TD}/ns/default/sa/alice"
SNAPSHOT = Snapshot(
    workloads=(
        Workload(uid="default/alice", name="alice", namespace="default", service_account="alice",
                 node="node-1", ips=(), enrolled=True),
    )
)


async def eventually(predicate: Callable[[], object], timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.02)


class Recording:
    """Wraps a CA client and remembers when each attempt happened and how it ended."""

    def __init__(self, inner: GrpcCaClient) -> None:
        self.inner = inner
        self.attempts: list[tuple[float, str]] = []

    async def sign(self, csr_pem: bytes, identity: str, ttl_s: int) -> tuple[bytes, bytes]:
        try:
            result = await self.inner.sign(csr_pem, identity, ttl_s)
        except CaError as exc:
            self.attempts.append((time.monotonic(), exc.code))
            raise
        self.attempts.append((time.monotonic(), "OK"))
        return result


async def start_controller(ca: CertificateAuthority, tokens: BootstrapTokens, port: int,
                           chain: bytes, key: bytes) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    add_certificate_service(server, ca, tokens, lambda: SNAPSHOT)
    bound = server.add_secure_port(f"127.0.0.1:{port}", grpc.ssl_server_credentials([(key, chain)]))
    await server.start()
    return server, bound


async def test_agent_rides_out_a_ca_outage_over_grpc(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, TD, 3600)
    tokens = BootstrapTokens(tmp_path)
    token = tokens.token_for("node-1")
    chain, key = ca.serving_certificate([], ["127.0.0.1"])
    server, port = await start_controller(ca, tokens, 0, chain, key)
    channel = grpc.aio.secure_channel(
        f"127.0.0.1:{port}",
        grpc.ssl_channel_credentials(ca.roots_pem),
        options=[("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 300),
                 ("grpc.min_reconnect_backoff_ms", 100)],
    )
    client = Recording(GrpcCaClient(channel, token=token, timeout_s=1.0))
    policy = RefreshPolicy(ttl_s=6, jitter=0.0, backoff_initial_s=0.2, backoff_max_s=0.8,
                           request_timeout_s=1.5)
    mgr = SecretManager(client, policy=policy)
    try:
        mgr.retain([ALICE])
        first = await mgr.fetch(ALICE)
        await server.stop(None)  # the CA goes down

        # past half-life the refresh fails, is retried with backoff, and the old cert serves
        await eventually(lambda: sum(1 for _, c in client.attempts if c != "OK") >= 3, 8)
        assert (await mgr.fetch(ALICE)).serial == first.serial
        assert mgr.current(ALICE) == first
        [row] = mgr.describe()
        assert row["state"] == "valid" and row["failures"] >= 3 and row["last_error"]
        failures = [t for t, c in client.attempts if c != "OK"]
        gaps = [b - a for a, b in itertools.pairwise(failures)]
        assert all(g >= 0.09 for g in gaps), f"retries must back off, not spin: {gaps}"
        assert first.is_valid()

        # the CA returns (same port): the agent recovers before the old certificate expires
        server, _ = await start_controller(ca, tokens, port, chain, key)
        await eventually(lambda: (c := mgr.current(ALICE)) and c.serial != first.serial, 8)
        assert dt.datetime.now(dt.UTC) < first.not_after
        [row] = mgr.describe()
        assert row["state"] == "valid" and row["failures"] == 0
    finally:
        await mgr.close()
        await channel.close()
        await server.stop(None)


async def test_when_the_ca_stays_down_past_expiry_the_certificate_is_dropped() -> None:
    ca_client = InMemoryCaClient(InMemoryCA())
    policy = RefreshPolicy(ttl_s=2, jitter=0.0, backoff_initial_s=0.1, backoff_max_s=0.3)
    mgr = SecretManager(ca_client, policy=policy)
    try:
        first = await mgr.fetch(ALICE)
        ca_client.available = False
        await eventually(lambda: mgr.current(ALICE) is None, 5)
        assert not first.is_valid()
        with pytest.raises(CertificateUnavailable):
            await mgr.fetch(ALICE)
        [row] = mgr.describe()
        assert row["state"] in ("expired", "failed") and row["failures"] > 0
        ca_client.available = True
        await eventually(lambda: mgr.current(ALICE) is not None, 5)
    finally:
        await mgr.close()
