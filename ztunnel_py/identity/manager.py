"""The agent's secret manager: a key and certificate per identity, kept fresh.

* fetched on demand (first connection from or to a workload), single-flight per
  identity, and prefetched for the enrolled workloads of this node (``retain``);
* refreshed at half-life with jitter; on CA errors retried with exponential
  backoff while the current certificate keeps serving until it expires;
* identities no longer needed are forgotten (their keys dropped).

Keys are ECDSA P-256, made here, and never leave the process: only the CSR
goes to the CA. Timing decisions are pure functions (``refresh_delay``,
``retry_delay``) so they are tested without waiting.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from ztunnel_py import log
from ztunnel_py.identity import x509 as x509u
from ztunnel_py.identity.certs import WorkloadCertificate
from ztunnel_py.identity.errors import CaError, CertificateUnavailable, IdentityError
from ztunnel_py.proto_gen import ca_pb2, ca_pb2_grpc
from ztunnel_py.state.snapshot import Snapshot

# Metadata an agent sends with its credential (Kubernetes mode: the node it claims).
NODE_METADATA = "x-ztunnel-node"


class CaClient(Protocol):
    async def sign(self, csr_pem: bytes, identity: str, ttl_s: int) -> tuple[bytes, bytes]:
        """Have the CA sign ``csr_pem``; return (chain_pem, roots_pem) or raise CaError."""
        ...


class CertificateSource(Protocol):
    async def fetch(self, identity: str) -> WorkloadCertificate:
        """A currently valid certificate for ``identity`` (raises IdentityError if none)."""
        ...


def _log() -> Any:
    return log.get("identity")


# -- timing decisions (pure) ------------------------------------------------------


@dataclass(frozen=True)
class RefreshPolicy:
    ttl_s: int = 24 * 3600
    jitter: float = 0.05  # ± this fraction of the lifetime around half-life
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    request_timeout_s: float = 10.0


def refresh_delay(
    cert: WorkloadCertificate, now: dt.datetime, sample: float, policy: RefreshPolicy
) -> float:
    """Seconds until the refresh of ``cert``: half-life ± jitter (``sample`` in [-1, 1]).

    Always before expiry, never negative.
    """
    lifetime = cert.lifetime.total_seconds()
    at = (cert.rotate_at - now).total_seconds() + sample * policy.jitter * lifetime
    latest = cert.expires_in(now) * 0.9
    return max(0.0, min(at, latest))


def retry_delay(attempt: int, sample: float, policy: RefreshPolicy) -> float:
    """Exponential backoff after ``attempt`` failures (>= 1), with jitter (``sample`` in [0, 1])."""
    base = min(policy.backoff_max_s, policy.backoff_initial_s * 2.0 ** (attempt - 1))
    return base * (0.5 + 0.5 * sample)


def wanted_identities(snapshot: Snapshot, node: str) -> set[str]:
    """Identities to prefetch on ``node``: its enrolled workloads (and its waypoints)."""
    return {w.identity for w in snapshot.workloads_on(node) if w.enrolled or w.is_waypoint}


# -- the manager --------------------------------------------------------------------


@dataclass
class _Entry:
    identity: str
    cert: WorkloadCertificate | None = None
    inflight: asyncio.Task[WorkloadCertificate] | None = None
    refresher: asyncio.Task[None] | None = None
    failures: int = 0
    last_error: str = ""
    retry_at: dt.datetime | None = None
    next_refresh: dt.datetime | None = None


class SecretManager:
    """Holds a certificate per identity for the workloads of this node."""

    def __init__(
        self,
        ca_client: CaClient,
        *,
        policy: RefreshPolicy | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], dt.datetime] = x509u.utcnow,
    ) -> None:
        self._ca = ca_client
        self._policy = policy or RefreshPolicy()
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    # -- public API --

    async def fetch(self, identity: str) -> WorkloadCertificate:
        if self._closed:
            raise CertificateUnavailable(f"no certificate for {identity}: the agent is stopping")
        entry = self._entries.get(identity) or self._track(identity)
        now = self._clock()
        if entry.cert is not None and entry.cert.is_valid(now):
            return entry.cert
        if entry.retry_at is not None and now < entry.retry_at and entry.inflight is None:
            raise CertificateUnavailable(
                f"no valid certificate for {identity} and the CA failed "
                f"{entry.failures} time(s); next attempt in "
                f"{(entry.retry_at - now).total_seconds():.1f}s: {entry.last_error}"
            )
        try:
            return await self._issue(entry)
        except IdentityError as exc:
            raise CertificateUnavailable(f"no certificate for {identity}: {exc}") from exc

    def current(self, identity: str) -> WorkloadCertificate | None:
        """The valid certificate held for ``identity`` right now, if any (no I/O)."""
        entry = self._entries.get(identity)
        if entry is None or entry.cert is None or not entry.cert.is_valid(self._clock()):
            return None
        return entry.cert

    def retain(self, identities: Iterable[str]) -> None:
        """Prefetch (and keep fresh) exactly these identities; forget every other one."""
        wanted = set(identities)
        for identity in list(self._entries):
            if identity not in wanted:
                self.forget(identity)
        if self._closed:
            return
        for identity in sorted(wanted - set(self._entries)):
            self._track(identity)

    def track_snapshot(self, snapshot: Snapshot, node: str) -> None:
        """Retain the identities ``node`` needs in ``snapshot`` (a StateStore listener)."""
        self.retain(wanted_identities(snapshot, node))

    def forget(self, identity: str) -> None:
        entry = self._entries.pop(identity, None)
        if entry is None:
            return
        if entry.refresher is not None:
            entry.refresher.cancel()
        _log().info("certificate forgotten", identity=identity)

    def describe(self) -> list[dict[str, object]]:
        """For ``ztunnel-py ctl certs``: identity, serial, validity, time to rotation; no key."""
        now = self._clock()
        rows: list[dict[str, object]] = []
        for identity in sorted(self._entries):
            entry = self._entries[identity]
            row: dict[str, object] = {
                "identity": identity,
                "serial": None,
                "not_before": None,
                "not_after": None,
                "seconds_to_rotation": None,
                "seconds_to_expiry": None,
            }
            if entry.cert is not None:
                row.update(entry.cert.describe(now))
                state = "valid" if entry.cert.is_valid(now) else "expired"
            else:
                state = "failed" if entry.failures else "pending"
            if entry.next_refresh is not None:
                row["seconds_to_rotation"] = round((entry.next_refresh - now).total_seconds(), 3)
            row.update(state=state, failures=entry.failures, last_error=entry.last_error)
            rows.append(row)
        return rows

    async def close(self) -> None:
        self._closed = True
        self._entries.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- internals --

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _track(self, identity: str) -> _Entry:
        entry = _Entry(identity)
        self._entries[identity] = entry
        entry.refresher = self._spawn(self._refresh_loop(entry))
        return entry

    async def _issue(self, entry: _Entry) -> WorkloadCertificate:
        """Single flight: one CA request per identity at a time, shared by every caller."""
        if entry.inflight is None:
            task: asyncio.Task[WorkloadCertificate] = self._spawn(self._request(entry))
            entry.inflight = task

            def done(t: asyncio.Task[WorkloadCertificate]) -> None:
                if entry.inflight is t:
                    entry.inflight = None
                if not t.cancelled():
                    t.exception()  # retrieved here; callers see it through shield

            task.add_done_callback(done)
        return await asyncio.shield(entry.inflight)

    async def _request(self, entry: _Entry) -> WorkloadCertificate:
        identity = entry.identity
        key = x509u.new_key()
        csr = x509u.build_csr(key, identity)
        try:
            async with asyncio.timeout(self._policy.request_timeout_s):
                chain_pem, roots_pem = await self._ca.sign(csr, identity, self._policy.ttl_s)
        except TimeoutError:
            err: IdentityError = CaError(
                f"the CA did not answer within {self._policy.request_timeout_s}s",
                code="DEADLINE_EXCEEDED",
            )
            self._failed(entry, err)
            raise err from None
        except IdentityError as exc:
            self._failed(entry, exc)
            raise
        try:
            cert = WorkloadCertificate.from_pem(
                chain_pem, x509u.private_key_pem(key), roots_pem, expected_identity=identity
            )
        except IdentityError as exc:
            self._failed(entry, exc)
            raise
        if self._entries.get(identity) is entry:
            entry.cert = cert
            entry.failures = 0
            entry.last_error = ""
            entry.retry_at = None
        _log().info(
            "certificate issued",
            identity=identity,
            serial=f"{cert.serial:x}",
            not_after=cert.not_after.isoformat(),
        )
        return cert

    def _failed(self, entry: _Entry, exc: IdentityError) -> None:
        entry.failures += 1
        entry.last_error = str(exc)
        delay = retry_delay(entry.failures, self._rng.random(), self._policy)
        entry.retry_at = self._clock() + dt.timedelta(seconds=delay)

    async def _refresh_loop(self, entry: _Entry) -> None:
        while True:
            now = self._clock()
            if entry.failures and entry.retry_at is not None:
                delay = max(0.0, (entry.retry_at - now).total_seconds())
            elif entry.cert is None:
                delay = 0.0
            else:
                delay = refresh_delay(entry.cert, now, self._rng.uniform(-1, 1), self._policy)
            entry.next_refresh = now + dt.timedelta(seconds=delay)
            held = entry.cert
            await asyncio.sleep(delay)
            if entry.cert is not held and entry.cert is not None and not entry.failures:
                continue  # an on-demand fetch renewed it meanwhile: plan from the new one
            try:
                await self._issue(entry)
            except IdentityError as exc:
                now = self._clock()
                held = entry.cert
                if held is not None and not held.is_valid(now):
                    entry.cert = None  # expired: drop it (and its key)
                    held = None
                _log().warning(
                    "certificate refresh failed; retrying with backoff",
                    identity=entry.identity,
                    failures=entry.failures,
                    retry_in_s=round(((entry.retry_at or now) - now).total_seconds(), 3),
                    keeping_serial=f"{held.serial:x}" if held else None,
                    expires_in_s=round(held.expires_in(now), 3) if held else None,
                    error=str(exc),
                )


# -- the real CA client ---------------------------------------------------------------

_HINTS = {
    grpc.StatusCode.UNAUTHENTICATED: "the node's token is unknown, revoked or expired "
    "(ZTUNNEL_TOKEN_FILE)",
    grpc.StatusCode.PERMISSION_DENIED: "the controller does not (yet) place an enrolled "
    "workload with this identity on this node",
    grpc.StatusCode.UNAVAILABLE: "is the controller running and reachable (ZTUNNEL_CONTROLLER)?",
    grpc.StatusCode.INVALID_ARGUMENT: "the CSR was refused; this is a bug in the agent",
}


class GrpcCaClient:
    """:class:`CaClient` over the controller's gRPC certificate service."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        token: str | Callable[[], str] | None = None,
        node: str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self._stub = ca_pb2_grpc.CertificateServiceStub(channel)  # type: ignore[no-untyped-call]
        self._token = token
        self._node = node
        self._timeout_s = timeout_s

    def _metadata(self) -> list[tuple[str, str]]:
        md: list[tuple[str, str]] = []
        token = self._token() if callable(self._token) else self._token
        if token:
            md.append(("authorization", f"Bearer {token.strip()}"))
        if self._node:
            md.append((NODE_METADATA, self._node))
        return md

    async def sign(self, csr_pem: bytes, identity: str, ttl_s: int) -> tuple[bytes, bytes]:
        request = ca_pb2.CreateCertificateRequest(
            csr=csr_pem.decode("ascii"), validity_duration=int(ttl_s), identity=identity
        )
        try:
            response = await self._stub.CreateCertificate(
                request, metadata=self._metadata(), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            hint = _HINTS.get(code, "")
            raise CaError(
                f"CA refused {identity}: {code.name}: {exc.details()}"
                + (f" ({hint})" if hint else ""),
                code=code.name,
            ) from None
        except OSError as exc:
            raise CaError(f"CA unreachable: {exc}") from None
        pems = [p.encode("ascii") for p in response.cert_chain]
        if len(pems) < 2:
            raise CaError(f"CA answered with {len(pems)} certificate(s): expected leaf and root")
        roots = b"".join(p.encode("ascii") for p in response.trust_bundle) or pems[-1]
        return b"".join(pems[:-1]), roots
