"""Test doubles beside the real things: an in-memory CA and a CA client over it.

:class:`InMemoryCA` signs with :class:`ztunnel_py.identity.x509.Issuer`, the
same code as the controller's CA, so tests exercise the real signing path.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ztunnel_py.identity import x509 as x509u
from ztunnel_py.identity.certs import WorkloadCertificate
from ztunnel_py.identity.errors import CaError


class InMemoryCA:
    """A self-signed root in memory; ``issue`` returns ready-to-use workload certificates."""

    def __init__(
        self,
        trust_domain: str = "cluster.local",
        *,
        also_trust: Sequence[bytes] = (),
        max_ttl_s: float = 24 * 3600,
    ) -> None:
        self.trust_domain = trust_domain
        key = x509u.new_key()
        root = x509u.self_signed_root(key, trust_domain)
        extra = [c for pem in also_trust for c in x509u.load_certs(pem, "also_trust")]
        self.issuer = x509u.Issuer(
            key=key,
            cert=root,
            intermediates=(),
            roots=(root, *extra),
            max_ttl=dt.timedelta(seconds=max_ttl_s),
            trust_domain=trust_domain,
        )

    @property
    def roots_pem(self) -> bytes:
        return self.issuer.roots_pem

    @property
    def max_ttl_s(self) -> float:
        return self.issuer.max_ttl.total_seconds()

    @property
    def root_pem(self) -> bytes:
        """This CA's own root only (``roots_pem`` may hold extra trusted roots)."""
        return x509u.certs_pem([self.issuer.cert])

    def sign_csr(self, csr_pem: bytes, identity: str, ttl_s: float) -> tuple[bytes, bytes]:
        return self.issuer.sign_csr(csr_pem, identity, ttl_s)

    def issue(self, identity: str, ttl_s: float = 3600) -> WorkloadCertificate:
        """A key and certificate for ``identity``, through the real CSR checks and signing."""
        key = x509u.new_key()
        chain, roots = self.sign_csr(x509u.build_csr(key, identity), identity, ttl_s)
        return WorkloadCertificate.from_pem(chain, x509u.private_key_pem(key), roots)

    def issue_unchecked(
        self,
        uris: Sequence[str],
        *,
        ttl_s: float = 3600,
        not_before: dt.datetime | None = None,
    ) -> WorkloadCertificate:
        """For negative tests: any URI SANs (another trust domain, several, none), any dates."""
        key = x509u.new_key()
        leaf = self.issuer.issue(
            key.public_key(), uris=uris, ttl=dt.timedelta(seconds=ttl_s), not_before=not_before
        )
        return WorkloadCertificate(
            identity=uris[0] if uris else "",
            chain_pem=x509u.certs_pem([leaf]),
            key_pem=x509u.private_key_pem(key),
            roots_pem=self.roots_pem,
            serial=leaf.serial_number,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
        )


def mismatched_csr(identity: str) -> bytes:
    """A well-formed CSR carrying key A but signed by key B (its signature cannot verify)."""
    key_a, key_b = x509u.new_key(), x509u.new_key()
    csr = x509.load_pem_x509_csr(x509u.build_csr(key_a, identity))
    tbs = csr.tbs_certrequest_bytes
    signature = key_b.sign(tbs, ec.ECDSA(hashes.SHA256()))
    alg = bytes.fromhex("300a06082a8648ce3d040302")  # ecdsa-with-SHA256
    bit_string = _der(0x03, b"\x00" + signature)
    der = _der(0x30, tbs + alg + bit_string)
    return x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + body


class InMemoryCaClient:
    """A :class:`~ztunnel_py.identity.manager.CaClient` over an :class:`InMemoryCA`.

    ``available = False`` makes every call fail like an unreachable CA;
    ``calls`` counts sign attempts (successful or not); ``delay_s`` slows answers.
    """

    def __init__(self, ca: InMemoryCA, *, delay_s: float = 0.0) -> None:
        self.ca = ca
        self.available = True
        self.delay_s = delay_s
        self.calls = 0
        self.failures = 0

    async def sign(self, csr_pem: bytes, identity: str, ttl_s: int) -> tuple[bytes, bytes]:
        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if not self.available:
            self.failures += 1
            raise CaError("in-memory CA is down (test)", code="UNAVAILABLE")
        return self.ca.sign_csr(csr_pem, identity, ttl_s)
