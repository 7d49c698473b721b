"""A workload's certificate as the agent holds it: chain, key, roots and validity."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from ztunnel_py.identity import x509 as x509u
from ztunnel_py.identity.errors import IdentityError


@dataclass(frozen=True)
class WorkloadCertificate:
    """One identity's certificate and key. Immutable; replaced whole on rotation.

    ``chain_pem`` is the leaf then the intermediates (never the root);
    ``roots_pem`` holds one or more trusted roots. ``key_pem`` is excluded from
    ``repr`` and must never be logged or dumped (see :meth:`describe`).
    """

    identity: str
    chain_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    roots_pem: bytes = field(repr=False)
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime

    @classmethod
    def from_pem(
        cls,
        chain_pem: bytes,
        key_pem: bytes,
        roots_pem: bytes,
        *,
        expected_identity: str | None = None,
    ) -> WorkloadCertificate:
        """Build from PEM, checking that the key, the chain, the roots and the SAN agree."""
        chain = x509u.load_certs(chain_pem, "certificate chain")
        roots = x509u.load_certs(roots_pem, "roots bundle")
        # A CA may append its root to the chain (Istio's CreateCertificate does): drop it.
        while len(chain) > 1 and chain[-1] in roots:
            chain.pop()
        leaf = chain[0]
        key = x509u.load_private_key(key_pem, "workload key")
        if key.public_key() != leaf.public_key():
            raise IdentityError(
                "the certificate's public key does not match the private key: the CA "
                "answered a different CSR"
            )
        identity = x509u.leaf_identity(leaf)
        if expected_identity is not None and identity != expected_identity:
            raise IdentityError(
                f"the CA issued a certificate for {identity}, but {expected_identity} was requested"
            )
        x509u.verify_chain(chain, roots)
        return cls(
            identity=identity,
            chain_pem=x509u.certs_pem(chain),
            key_pem=key_pem,
            roots_pem=x509u.certs_pem(roots),
            serial=leaf.serial_number,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
        )

    @property
    def lifetime(self) -> dt.timedelta:
        return self.not_after - self.not_before

    @property
    def rotate_at(self) -> dt.datetime:
        """Half-life: when the agent starts fetching a replacement."""
        return self.not_before + self.lifetime / 2

    def expires_in(self, now: dt.datetime | None = None) -> float:
        """Seconds until ``not_after`` (negative once expired)."""
        return (self.not_after - (now or x509u.utcnow())).total_seconds()

    def is_valid(self, now: dt.datetime | None = None) -> bool:
        now = now or x509u.utcnow()
        return self.not_before <= now < self.not_after

    def describe(self, now: dt.datetime | None = None) -> dict[str, object]:
        """A JSON-friendly summary for admin dumps; never the key."""
        now = now or x509u.utcnow()
        return {
            "identity": self.identity,
            "serial": f"{self.serial:x}",
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "seconds_to_rotation": round((self.rotate_at - now).total_seconds(), 3),
            "seconds_to_expiry": round(self.expires_in(now), 3),
        }
