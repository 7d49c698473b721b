"""The identity package's errors: each message says what was wrong and the likely cause."""

from __future__ import annotations


class IdentityError(Exception):
    """A certificate or SPIFFE identity is missing, malformed or not acceptable."""


class CsrError(IdentityError):
    """A certificate signing request cannot be signed (garbage, bad signature, wrong SAN/key)."""


class CaError(IdentityError):
    """The CA could not be reached or refused to sign; ``code`` is the gRPC status name if any."""

    def __init__(self, message: str, *, code: str = "UNAVAILABLE") -> None:
        super().__init__(message)
        self.code = code


class CertificateUnavailable(IdentityError):
    """No valid certificate is held for an identity and none could be fetched now."""
