"""The mesh CA: a self-signed root made on first start, or the operator's ``cacerts``.

Operator-provided material uses Istio's layout (in ``<state_dir>/cacerts`` or a
configured directory)::

    ca-cert.pem     the signing (intermediate) certificate
    ca-key.pem      its private key
    root-cert.pem   the trusted root(s); several during a root rotation
    cert-chain.pem  ca-cert.pem followed by intermediates up to the root (optional)

Otherwise the CA creates ``<state_dir>/ca/ca-key.pem`` (0600, directory 0700)
and a self-signed ``ca-cert.pem`` once, and reuses them on later starts. An
optional ``<state_dir>/ca/extra-roots.pem`` adds trusted roots (for rotating
to a new root). Signing is :class:`ztunnel_py.identity.x509.Issuer`, the code
the tests' in-memory CA runs.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509

from ztunnel_py import log
from ztunnel_py.identity import x509 as x509u
from ztunnel_py.identity.errors import IdentityError

CACERTS_FILES = ("ca-cert.pem", "ca-key.pem", "root-cert.pem")
SERVING_TTL = dt.timedelta(days=365)


class CaSetupError(IdentityError):
    """The CA's key material is missing, unreadable, inconsistent or unsafe."""


def _log() -> Any:
    return log.get("controller.ca")


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) != 0o700:
        path.chmod(0o700)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CaSetupError(f"cannot read {path}: {exc.strerror}") from None


class CertificateAuthority:
    """Signs workload CSRs (and the controller's own serving certificate)."""

    def __init__(self, issuer: x509u.Issuer, trust_domain: str, *, source: str) -> None:
        self.issuer = issuer
        self.trust_domain = trust_domain
        self.source = source

    # -- loading --

    @classmethod
    def load_or_create(
        cls,
        state_dir: Path,
        trust_domain: str,
        max_ttl_s: int,
        *,
        cacerts_dir: Path | None = None,
    ) -> CertificateAuthority:
        """Use ``cacerts`` if present, else the self-signed root in the state dir (made once)."""
        _private_dir(state_dir)
        max_ttl = dt.timedelta(seconds=max_ttl_s)
        cacerts = cacerts_dir or state_dir / "cacerts"
        if cacerts_dir is not None or cacerts.exists():
            ca = cls._from_cacerts(cacerts, trust_domain, max_ttl)
        else:
            ca = cls._self_signed(state_dir / "ca", trust_domain, max_ttl)
        _log().info("CA ready", **ca.describe())
        return ca

    @classmethod
    def _from_cacerts(
        cls, directory: Path, trust_domain: str, max_ttl: dt.timedelta
    ) -> CertificateAuthority:
        missing = [n for n in CACERTS_FILES if not (directory / n).is_file()]
        if missing:
            raise CaSetupError(
                f"{directory} looks like an Istio cacerts directory but lacks {missing}: "
                "provide ca-cert.pem, ca-key.pem and root-cert.pem (cert-chain.pem optional)"
            )
        key_path = directory / "ca-key.pem"
        if stat.S_IMODE(key_path.stat().st_mode) & 0o077:
            _log().warning(
                "CA key is readable by group or others; restrict it to 0600",
                path=str(key_path),
            )
        key = x509u.load_private_key(_read(key_path), str(key_path))
        ca_cert = x509u.load_certs(_read(directory / "ca-cert.pem"), "ca-cert.pem")[0]
        roots = x509u.load_certs(_read(directory / "root-cert.pem"), "root-cert.pem")
        chain_path = directory / "cert-chain.pem"
        chain = x509u.load_certs(_read(chain_path), "cert-chain.pem") if chain_path.exists() else []
        intermediates = tuple(c for c in chain if c != ca_cert and c not in roots)
        _check_ca_cert(ca_cert, "ca-cert.pem")
        issuer = cls._issuer(
            key, ca_cert, intermediates, tuple(roots), max_ttl, trust_domain, directory
        )
        return cls(issuer, trust_domain, source=f"cacerts {directory}")

    @classmethod
    def _self_signed(
        cls, directory: Path, trust_domain: str, max_ttl: dt.timedelta
    ) -> CertificateAuthority:
        _private_dir(directory)
        key_path, cert_path = directory / "ca-key.pem", directory / "ca-cert.pem"
        if key_path.exists() != cert_path.exists():
            raise CaSetupError(
                f"{directory} holds only one of ca-key.pem and ca-cert.pem: restore the "
                "other, or remove both to create a new root (agents must then be re-trusted)"
            )
        if not key_path.exists():
            new_key = x509u.new_key()
            new_root = x509u.self_signed_root(new_key, trust_domain)
            _write_atomic(key_path, x509u.private_key_pem(new_key), 0o600)
            _write_atomic(cert_path, x509u.certs_pem([new_root]), 0o644)
            _log().info("created a self-signed mesh root", path=str(cert_path))
        if stat.S_IMODE(key_path.stat().st_mode) != 0o600:
            key_path.chmod(0o600)
        key = x509u.load_private_key(_read(key_path), str(key_path))
        root = x509u.load_certs(_read(cert_path), str(cert_path))[0]
        _check_ca_cert(root, str(cert_path))
        extra_path = directory / "extra-roots.pem"
        extra = x509u.load_certs(_read(extra_path), str(extra_path)) if extra_path.exists() else []
        issuer = cls._issuer(key, root, (), (root, *extra), max_ttl, trust_domain, directory)
        return cls(issuer, trust_domain, source=f"self-signed {directory}")

    @staticmethod
    def _issuer(
        key: Any,
        cert: x509.Certificate,
        intermediates: tuple[x509.Certificate, ...],
        roots: tuple[x509.Certificate, ...],
        max_ttl: dt.timedelta,
        trust_domain: str,
        directory: Path,
    ) -> x509u.Issuer:
        try:
            return x509u.Issuer(
                key=key,
                cert=cert,
                intermediates=intermediates,
                roots=roots,
                max_ttl=max_ttl,
                trust_domain=trust_domain,
            )
        except IdentityError as exc:
            raise CaSetupError(f"{directory}: {exc}") from None

    # -- signing --

    @property
    def roots_pem(self) -> bytes:
        return self.issuer.roots_pem

    @property
    def max_ttl_s(self) -> float:
        return self.issuer.max_ttl.total_seconds()

    def sign_csr(self, csr_pem: bytes, identity: str, ttl_s: float) -> tuple[bytes, bytes]:
        """Verify and sign a workload CSR; return (chain_pem, roots_pem).

        ``chain_pem`` is the leaf then any intermediates (not the root); the
        validity is ``ttl_s`` capped at the configured maximum. Raises
        :class:`~ztunnel_py.identity.errors.CsrError` for anything unsignable.
        """
        return self.issuer.sign_csr(csr_pem, identity, ttl_s)

    def serving_certificate(
        self,
        dns_names: Sequence[str],
        ips: Sequence[str],
        *,
        ttl: dt.timedelta = SERVING_TTL,
    ) -> tuple[bytes, bytes]:
        """A fresh key and server certificate for the controller's gRPC TLS: (chain, key) PEM."""
        if not dns_names and not ips:
            raise ValueError("the serving certificate needs at least one DNS name or IP")
        key = x509u.new_key()
        leaf = self.issuer.issue(
            key.public_key(), dns_names=dns_names, ips=ips, ttl=ttl, client_auth=False
        )
        chain = x509u.certs_pem([leaf, *self.issuer.chain_tail])
        return chain, x509u.private_key_pem(key)

    def describe(self) -> dict[str, object]:
        """For logs and the admin port: where the CA comes from and its roots; never the key."""
        return {
            "source": self.source,
            "trust_domain": self.trust_domain,
            "signer": self.issuer.cert.subject.rfc4514_string(),
            "signer_not_after": self.issuer.cert.not_valid_after_utc.isoformat(),
            "roots": [r.subject.rfc4514_string() for r in self.issuer.roots],
            "max_ttl_s": self.max_ttl_s,
        }


def _check_ca_cert(cert: x509.Certificate, source: str) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise CaSetupError(f"{source} is not a CA certificate (basicConstraints CA:TRUE missing)")
    if cert.not_valid_after_utc <= x509u.utcnow():
        raise CaSetupError(
            f"{source} expired on {cert.not_valid_after_utc.isoformat()}: rotate the CA"
        )
