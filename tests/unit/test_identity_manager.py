"""The secret manager against the in-memory CA: single flight, prefetch, forget, backoff."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import Callable

import pytest

from ztunnel_py.identity.errors import CertificateUnavailable
from ztunnel_py.identity.manager import (
    RefreshPolicy,
    SecretManager,
    refresh_delay,
    retry_delay,
    wanted_identities,
)
from ztunnel_py.identity.testing import InMemoryCA, InMemoryCaClient
from ztunnel_py.state.model import Workload
from ztunnel_py.state.snapshot import Snapshot

TD = "cluster.local"
ALICE = f"spiffe://{TD}/ns/default/sa/alice"
BOB = f"spiffe://{TD}/ns/default/sa/bob"


async def eventually(predicate: Callable[[], object], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.01)


# -- pure timing decisions ------------------------------------------------------------


def test_refresh_delay_is_half_life_with_bounded_jitter() -> None:
    ca = InMemoryCA()
    cert = ca.issue(ALICE, ttl_s=1000)
    policy = RefreshPolicy(jitter=0.05)
    now = cert.not_before
    life = cert.lifetime.total_seconds()  # 1000 s from issue + the clock-skew backdate
    assert life == 1000 + 120
    assert refresh_delay(cert, now, 0.0, policy) == pytest.approx(life / 2)
    assert refresh_delay(cert, now, 1.0, policy) == pytest.approx(life * 0.55)
    assert refresh_delay(cert, now, -1.0, policy) == pytest.approx(life * 0.45)
    rng = random.Random(7)
    delays = {refresh_delay(cert, now, rng.uniform(-1, 1), policy) for _ in range(50)}
    assert len(delays) > 40, "jitter spreads refreshes"
    assert all(life * 0.45 <= d <= life * 0.55 for d in delays)


def test_refresh_delay_never_negative_nor_past_expiry() -> None:
    ca = InMemoryCA()
    cert = ca.issue(ALICE, ttl_s=100)
    huge_jitter = RefreshPolicy(jitter=5.0)
    life = cert.lifetime.total_seconds()
    assert refresh_delay(cert, cert.not_before, 1.0, huge_jitter) <= life * 0.9
    late = cert.not_before + dt.timedelta(seconds=life * 0.8)
    assert refresh_delay(cert, late, 0.0, RefreshPolicy()) == 0.0


def test_retry_delay_backs_off_exponentially_up_to_a_cap() -> None:
    policy = RefreshPolicy(backoff_initial_s=0.5, backoff_max_s=8.0)
    upper = [retry_delay(n, 1.0, policy) for n in range(1, 8)]
    assert upper == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert retry_delay(3, 0.0, policy) == 1.0  # jitter takes it down to half, not to zero


def test_wanted_identities_are_the_enrolled_workloads_of_this_node() -> None:
    def wl(name: str, node: str, sa: str, **kw: object) -> Workload:
        return Workload(
            uid=f"default/{name}", name=name, namespace="default", service_account=sa,
            node=node, ips=(), **kw,  # type: ignore[arg-type]
        )

    snap = Snapshot(
        workloads=(
            wl("a", "n1", "alice", enrolled=True),
            wl("b", "n2", "bob", enrolled=True),
            wl("c", "n1", "carol"),
            wl("w", "n1", "waypoint", is_waypoint=True),
        )
    )
    assert wanted_identities(snap, "n1") == {ALICE, f"spiffe://{TD}/ns/default/sa/waypoint"}


# -- the manager ----------------------------------------------------------------------


async def test_concurrent_fetches_share_one_ca_request() -> None:
    client = InMemoryCaClient(InMemoryCA(), delay_s=0.05)
    mgr = SecretManager(client)
    try:
        certs = await asyncio.gather(*(mgr.fetch(ALICE) for _ in range(20)))
        assert client.calls == 1
        assert {c.serial for c in certs} == {certs[0].serial}
        assert certs[0].identity == ALICE
        assert (await mgr.fetch(ALICE)).serial == certs[0].serial  # cached
        assert client.calls == 1
    finally:
        await mgr.close()


async def test_keys_are_made_in_the_agent_and_are_p256() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    seen: list[bytes] = []
    ca = InMemoryCA()

    class Recording(InMemoryCaClient):
        async def sign(self, csr_pem: bytes, identity: str, ttl_s: int) -> tuple[bytes, bytes]:
            seen.append(csr_pem)
            return await super().sign(csr_pem, identity, ttl_s)

    mgr = SecretManager(Recording(ca))
    try:
        cert = await mgr.fetch(ALICE)
    finally:
        await mgr.close()
    key = load_pem_private_key(cert.key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert len(seen) == 1 and b"PRIVATE" not in seen[0]


async def test_retain_prefetches_and_forgets() -> None:
    client = InMemoryCaClient(InMemoryCA())
    mgr = SecretManager(client)
    try:
        mgr.retain([ALICE, BOB])
        await eventually(lambda: mgr.current(ALICE) and mgr.current(BOB))
        assert client.calls == 2
        mgr.retain([BOB])
        assert mgr.current(ALICE) is None
        assert [r["identity"] for r in mgr.describe()] == [BOB]
    finally:
        await mgr.close()


async def test_describe_lists_validity_and_rotation_never_the_key() -> None:
    mgr = SecretManager(InMemoryCaClient(InMemoryCA()), policy=RefreshPolicy(ttl_s=600))
    try:
        cert = await mgr.fetch(ALICE)
        [row] = mgr.describe()
    finally:
        await mgr.close()
    assert row["identity"] == ALICE
    assert row["serial"] == f"{cert.serial:x}"
    assert row["not_after"] == cert.not_after.isoformat()
    assert row["state"] == "valid"
    assert isinstance(row["seconds_to_rotation"], float)
    assert 200 < row["seconds_to_rotation"] < 300  # half of 600 s + 120 s backdate, from issue
    text = repr(row) + repr(cert)
    assert "PRIVATE KEY" not in text
    assert cert.key_pem.decode() not in text


async def test_ca_down_without_certificate_fails_fast_then_recovers() -> None:
    client = InMemoryCaClient(InMemoryCA())
    client.available = False
    mgr = SecretManager(client, policy=RefreshPolicy(backoff_initial_s=0.2, backoff_max_s=0.4))
    try:
        with pytest.raises(CertificateUnavailable, match="in-memory CA is down"):
            await mgr.fetch(ALICE)
        # within the backoff window, callers are told at once rather than piling on the CA
        calls = client.calls
        with pytest.raises(CertificateUnavailable, match="next attempt in"):
            await mgr.fetch(ALICE)
        assert client.calls == calls
        client.available = True
        await eventually(lambda: mgr.current(ALICE))
        assert (await mgr.fetch(ALICE)).identity == ALICE
    finally:
        await mgr.close()


async def test_a_ca_answering_for_another_identity_is_not_believed() -> None:
    ca = InMemoryCA()

    class Confused(InMemoryCaClient):
        async def sign(self, csr_pem: bytes, identity: str, ttl_s: int) -> tuple[bytes, bytes]:
            other = ca.issue(BOB)
            return other.chain_pem, other.roots_pem

    mgr = SecretManager(Confused(ca), policy=RefreshPolicy(backoff_initial_s=5))
    try:
        with pytest.raises(CertificateUnavailable, match="does not match the private key"):
            await mgr.fetch(ALICE)
    finally:
        await mgr.close()


async def test_fetch_after_close_is_refused() -> None:
    mgr = SecretManager(InMemoryCaClient(InMemoryCA()))
    await mgr.close()
    with pytest.raises(CertificateUnavailable, match="stopping"):
        await mgr.fetch(ALICE)


async def test_track_snapshot_follows_the_nodes_enrolled_workloads() -> None:
    def wl(name: str, node: str) -> Workload:
        return Workload(uid=f"default/{name}", name=name, namespace="default",
                        service_account=name, node=node, ips=(), enrolled=True)

    client = InMemoryCaClient(InMemoryCA())
    mgr = SecretManager(client)
    try:
        mgr.track_snapshot(Snapshot(workloads=(wl("alice", "n1"), wl("bob", "n2"))), "n1")
        await eventually(lambda: mgr.current(ALICE))
        assert [r["identity"] for r in mgr.describe()] == [ALICE]
        mgr.track_snapshot(Snapshot(workloads=(wl("bob", "n1"),)), "n1")
        await eventually(lambda: mgr.current(BOB))
        assert mgr.current(ALICE) is None
        assert [r["identity"] for r in mgr.describe()] == [BOB]
    finally:
        await mgr.close()


def test_in_memory_ca_refuses_other_trust_domains_like_the_real_one() -> None:
    from ztunnel_py.identity.errors import CsrError

    with pytest.raises(CsrError, match="trust domain"):
        InMemoryCA().issue("spiffe://other.td/ns/default/sa/alice")
    assert InMemoryCA("other.td").issue("spiffe://other.td/ns/default/sa/a").identity.endswith("/a")
