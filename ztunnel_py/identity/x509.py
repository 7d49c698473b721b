"""X.509 building blocks shared by the agent, the controller's CA and the in-memory test CA.

One place makes keys and CSRs, checks CSRs, and signs leaf certificates, so
that the tests' :class:`~ztunnel_py.identity.testing.InMemoryCA` exercises the
same code as the controller's
:class:`~ztunnel_py.controller.ca.authority.CertificateAuthority`.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificateIssuerPublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ztunnel_py.identity import spiffe
from ztunnel_py.identity.errors import CsrError, IdentityError

Clock = Callable[[], dt.datetime]

ROOT_TTL = dt.timedelta(days=3650)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# -- keys and CSRs (agent side) --------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key: the only leaf key type the mesh issues."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    """PKCS#8 PEM, unencrypted: held in memory (or a 0600 file for the CA), never logged."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(pem: bytes, source: str) -> CertificateIssuerPrivateKeyTypes:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"{source}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(
        key,
        (
            ec.EllipticCurvePrivateKey,
            rsa.RSAPrivateKey,
            ed25519.Ed25519PrivateKey,
            ed448.Ed448PrivateKey,
        ),
    ):
        raise IdentityError(f"{source}: unsupported key type {type(key).__name__}")
    return key


def build_csr(key: ec.EllipticCurvePrivateKey, identity: str) -> bytes:
    """A PEM CSR for ``identity`` with the SPIFFE id as its only (URI) SAN."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def verify_csr(csr_pem: bytes, identity: str) -> ec.EllipticCurvePublicKey:
    """Check a CSR before signing it; return its public key.

    The CSR must be PEM, carry a valid self-signature, an ECDSA P-256 key and
    exactly one SAN: the URI ``identity``.
    """
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise CsrError(
            "the CSR is not a PEM certificate signing request "
            f"({len(csr_pem)} bytes that do not parse)"
        ) from None
    try:
        valid = csr.is_signature_valid
    except (ValueError, InvalidSignature):  # pragma: no cover - depends on backend details
        valid = False
    if not valid:
        raise CsrError(
            "the CSR's signature does not verify: it was not signed by the key it carries"
        )
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CsrError(
            f"the CSR carries a {type(key).__name__} key: the mesh only signs ECDSA P-256 keys"
        )
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CsrError(f"the CSR has no subjectAltName; expected the URI {identity}") from None
    except ValueError as exc:  # duplicate or malformed extensions
        raise CsrError(f"the CSR's extensions do not parse: {exc}") from None
    names = [str(n.value) for n in san]
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if uris != [identity] or len(names) != 1:
        raise CsrError(f"the CSR's subjectAltName is {names}, but the request is for {identity}")
    return key


# -- certificates ------------------------------------------------------------------


def load_certs(pem: bytes, source: str) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle, in order; at least one."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise IdentityError(f"{source}: not a PEM certificate bundle ({exc})") from None
    return certs


def certs_pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def leaf_identity(cert: x509.Certificate, trust_domain: str | None = None) -> str:
    """The leaf's single SPIFFE URI SAN, optionally required to be in ``trust_domain``."""
    uris = uri_sans(cert)
    if not uris:
        raise IdentityError(
            f"certificate serial {cert.serial_number:x} has no URI SAN: it is not a mesh "
            "workload certificate (issued by another CA?)"
        )
    if len(uris) != 1:
        raise IdentityError(
            f"certificate serial {cert.serial_number:x} has {len(uris)} URI SANs {uris}; "
            "a mesh workload certificate has exactly one SPIFFE id"
        )
    if trust_domain is None:
        spiffe.parse(uris[0])
    else:
        spiffe.check_trust_domain(uris[0], trust_domain)
    return uris[0]


def verify_chain(chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]) -> None:
    """Check that each certificate is signed by the next and the last by one of ``roots``.

    A structural check for certificates handed to us by the CA (OpenSSL does
    the full RFC 5280 verification during handshakes).
    """
    for child, parent in itertools.pairwise(chain):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            raise IdentityError(
                f"certificate {child.subject.rfc4514_string() or '(no subject)'} is not "
                f"signed by the next one in the chain ({parent.subject.rfc4514_string()})"
            ) from None
    if issuing_root(chain[-1], roots) is None:
        raise IdentityError(
            "the certificate chain does not lead to any of the trusted roots: the CA's root "
            "changed, or the roots bundle is stale"
        )


def issuing_root(
    cert: x509.Certificate, roots: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    """The root in ``roots`` that is ``cert`` or signed it, if any."""
    for root in roots:
        if root == cert:
            return root
        try:
            cert.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return root
    return None


def _signature_hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    return hashes.SHA256()


CLOCK_SKEW_GRACE = dt.timedelta(minutes=2)


def backdate(ttl: dt.timedelta) -> dt.timedelta:
    """How far before its issue a certificate's validity starts: a peer whose clock runs
    a little behind (another node, or this one stepped back by NTP) must not see a fresh
    certificate as not yet valid. Two minutes, as Istio's CA, but at most a quarter of a
    short lifetime so that renewal at half the lifetime stays in the future."""
    return min(CLOCK_SKEW_GRACE, ttl / 4)


def self_signed_root(
    key: CertificateIssuerPrivateKeyTypes,
    trust_domain: str,
    *,
    ttl: dt.timedelta = ROOT_TTL,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """A self-signed root CA certificate for ``trust_domain`` (like Istio's self-signed root)."""
    now = now or utcnow()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, "ztunnel-py root CA"),
        ]
    )
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - backdate(ttl))
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, _signature_hash(key))
    )


@dataclass(frozen=True)
class Issuer:
    """Signs leaf certificates: a CA key, its certificate, the intermediates and the roots.

    ``intermediates`` are the certificates above ``cert`` up to (not including)
    a root; ``roots`` is the trust bundle handed to agents (it may hold several
    roots during a root rotation). ``cert`` may itself be a root.
    """

    key: CertificateIssuerPrivateKeyTypes = field(repr=False)
    cert: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]
    max_ttl: dt.timedelta = dt.timedelta(hours=24)
    trust_domain: str = ""  # when set, only identities of this trust domain are signed
    clock: Clock = utcnow

    def __post_init__(self) -> None:
        if not self.roots:
            raise IdentityError("the CA needs at least one root certificate")
        if self.key.public_key() != self.cert.public_key():
            raise IdentityError(
                "the CA key does not match the CA certificate (ca-key.pem and ca-cert.pem "
                "are from different pairs)"
            )
        verify_chain([self.cert, *self.intermediates], self.roots)

    @functools.cached_property
    def roots_pem(self) -> bytes:
        return certs_pem(self.roots)

    @functools.cached_property
    def chain_tail(self) -> tuple[x509.Certificate, ...]:
        """What follows a leaf in its chain: the CA cert (unless it is a root) and intermediates."""
        tail = (self.cert, *self.intermediates)
        return tuple(c for c in tail if not is_self_signed(c))

    def sign_csr(self, csr_pem: bytes, identity: str, ttl_s: float) -> tuple[bytes, bytes]:
        """Verify ``csr_pem`` for ``identity`` and sign it; return (chain_pem, roots_pem).

        ``chain_pem`` is the leaf then the intermediates (not the root). The
        validity is ``ttl_s`` capped at ``max_ttl`` (and at the CA's own expiry).
        """
        try:
            if self.trust_domain:
                spiffe.check_trust_domain(identity, self.trust_domain)
            else:
                spiffe.parse(identity)
        except IdentityError as exc:
            raise CsrError(str(exc)) from None
        public = verify_csr(csr_pem, identity)
        ttl = dt.timedelta(seconds=min(ttl_s, self.max_ttl.total_seconds()))
        leaf = self.issue(public, uris=[identity], ttl=ttl)
        return certs_pem([leaf, *self.chain_tail]), self.roots_pem

    def _authority_key_id(self) -> x509.AuthorityKeyIdentifier:
        try:
            ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:
            return x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)

    def issue(
        self,
        public_key: CertificateIssuerPublicKeyTypes,
        *,
        uris: Sequence[str] = (),
        dns_names: Sequence[str] = (),
        ips: Sequence[str] = (),
        ttl: dt.timedelta,
        not_before: dt.datetime | None = None,
        client_auth: bool = True,
    ) -> x509.Certificate:
        """Sign a leaf for ``public_key`` with the given SANs (no checks: callers check).

        The validity is ``ttl`` from now, cut short at the CA certificate's own expiry,
        and starts ``backdate(ttl)`` before now (or at ``not_before`` when given).
        """
        if ttl <= dt.timedelta(0):
            raise CsrError(f"requested validity {ttl.total_seconds()}s must be positive")
        if not_before is None:
            now = self.clock()
            start = now - backdate(ttl)
        else:
            now = start = not_before
        end = min(now + ttl, self.cert.not_valid_after_utc)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        names += [x509.DNSName(d) for d in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        usages = [ExtendedKeyUsageOID.SERVER_AUTH]
        if client_auth:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(self._authority_key_id(), critical=False)
        )
        if names:
            # The subject is empty, so the SAN carries the identity and is critical (RFC 5280).
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
        return builder.sign(self.key, _signature_hash(self.key))
