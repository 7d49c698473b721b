"""The CA's key material: self-signed on first start, reused, or the operator's cacerts."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ztunnel_py.controller.ca.authority import CaSetupError, CertificateAuthority
from ztunnel_py.identity import x509 as x509u
from ztunnel_py.identity.certs import WorkloadCertificate
from ztunnel_py.identity.errors import CsrError
from ztunnel_py.identity.testing import mismatched_csr

TD = "cluster.local"
ALICE = f"spiffe://{TD}/ns/default/sa/alice"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def sign(
    ca: CertificateAuthority, identity: str = ALICE, ttl_s: float = 600
) -> WorkloadCertificate:
    key = x509u.new_key()
    chain, roots = ca.sign_csr(x509u.build_csr(key, identity), identity, ttl_s)
    return WorkloadCertificate.from_pem(chain, x509u.private_key_pem(key), roots)


def test_first_start_creates_a_private_root_and_later_starts_reuse_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ca = CertificateAuthority.load_or_create(state, TD, 3600)
    assert mode(state) == 0o700
    assert mode(state / "ca") == 0o700
    assert mode(state / "ca" / "ca-key.pem") == 0o600
    assert b"PRIVATE KEY" in (state / "ca" / "ca-key.pem").read_bytes()
    root = x509.load_pem_x509_certificate(ca.roots_pem)
    assert root.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)[0].value == TD
    again = CertificateAuthority.load_or_create(state, TD, 3600)
    assert again.roots_pem == ca.roots_pem
    # a certificate from the first instance verifies under the second one's roots
    cert = sign(ca)
    assert x509u.issuing_root(
        x509.load_pem_x509_certificate(cert.chain_pem), x509u.load_certs(again.roots_pem, "r")
    )


def test_loose_key_permissions_are_tightened(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path, TD, 3600)
    key = tmp_path / "ca" / "ca-key.pem"
    key.chmod(0o644)
    CertificateAuthority.load_or_create(tmp_path, TD, 3600)
    assert mode(key) == 0o600


def test_a_fresh_certificate_is_valid_to_a_peer_whose_clock_runs_behind(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, TD, 3600)
    before = x509u.utcnow()
    cert = sign(ca, ttl_s=600)
    after = x509u.utcnow()
    assert cert.is_valid(before - dt.timedelta(seconds=90))  # another node, 90 s behind
    assert not cert.is_valid(before - dt.timedelta(minutes=3))
    assert before + dt.timedelta(seconds=599) <= cert.not_after <= after + dt.timedelta(seconds=600)
    # the root too: an agent that loads it checks its validity with its own clock
    root = ca.issuer.roots[0]
    assert root.not_valid_before_utc <= before - dt.timedelta(seconds=119)
    # a short lifetime keeps its renewal point (half of it) in the future
    short = sign(ca, ttl_s=4)
    assert short.lifetime == dt.timedelta(seconds=5)
    assert short.rotate_at > before


def test_half_a_key_pair_is_an_error_not_a_new_root(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path, TD, 3600)
    (tmp_path / "ca" / "ca-cert.pem").unlink()
    with pytest.raises(CaSetupError, match=r"only one of ca-key\.pem and ca-cert\.pem"):
        CertificateAuthority.load_or_create(tmp_path, TD, 3600)


def test_sign_csr_checks_and_caps(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, TD, 3600)
    # validity starts backdate(ttl) before issue (clock skew) and lasts ttl from issue
    assert sign(ca, ttl_s=7200).lifetime == dt.timedelta(seconds=3600 + 120)
    assert sign(ca, ttl_s=60).lifetime == dt.timedelta(seconds=60 + 15)
    with pytest.raises(CsrError, match="signature does not verify"):
        ca.sign_csr(mismatched_csr(ALICE), ALICE, 60)
    other = "spiffe://other.td/ns/default/sa/alice"
    with pytest.raises(CsrError, match="trust domain"):
        ca.sign_csr(x509u.build_csr(x509u.new_key(), other), other, 60)
    with pytest.raises(CsrError, match="must be positive"):
        ca.sign_csr(x509u.build_csr(x509u.new_key(), ALICE), ALICE, 0)


def test_serving_certificate_is_a_server_cert_for_the_given_names(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, TD, 3600)
    chain, key_pem = ca.serving_certificate(["controller.test"], ["127.0.0.1"])
    leaf = x509.load_pem_x509_certificate(chain)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["controller.test"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.ExtendedKeyUsageOID.SERVER_AUTH]
    assert x509u.load_private_key(key_pem, "k").public_key() == leaf.public_key()
    assert ca.describe()["source"].startswith("self-signed")  # type: ignore[union-attr]
    assert "PRIVATE" not in repr(ca.describe())


# -- operator-provided cacerts (Istio layout) ------------------------------------------


def make_intermediate(
    root_key: ec.EllipticCurvePrivateKey, root: x509.Certificate, td: str
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = x509u.new_key()
    now = x509u.utcnow()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, td),
                                 x509.NameAttribute(x509.NameOID.COMMON_NAME, "intermediate")]))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), False
        )
        .sign(root_key, hashes.SHA256())
    )
    return key, cert


def write_cacerts(directory: Path, *, extra_root: bool = False) -> x509.Certificate:
    directory.mkdir(parents=True)
    root_key = x509u.new_key()
    root = x509u.self_signed_root(root_key, TD)
    key, inter = make_intermediate(root_key, root, TD)
    roots = [root]
    if extra_root:
        roots.append(x509u.self_signed_root(x509u.new_key(), TD))
    (directory / "ca-key.pem").write_bytes(x509u.private_key_pem(key))
    (directory / "ca-key.pem").chmod(0o600)
    (directory / "ca-cert.pem").write_bytes(x509u.certs_pem([inter]))
    (directory / "root-cert.pem").write_bytes(x509u.certs_pem(roots))
    (directory / "cert-chain.pem").write_bytes(x509u.certs_pem([inter, root]))
    return root


def test_cacerts_intermediate_signs_and_chains_to_the_operator_root(tmp_path: Path) -> None:
    root = write_cacerts(tmp_path / "cacerts", extra_root=True)
    ca = CertificateAuthority.load_or_create(tmp_path, TD, 3600)
    assert ca.source.startswith("cacerts")
    assert not (tmp_path / "ca").exists(), "no self-signed root when cacerts is present"
    assert ca.roots_pem.count(b"BEGIN CERTIFICATE") == 2
    cert = sign(ca)
    chain = x509u.load_certs(cert.chain_pem, "chain")
    assert len(chain) == 2  # leaf + intermediate, never the root
    assert chain[1].subject.rfc4514_string() == "CN=intermediate,O=cluster.local"
    assert x509u.issuing_root(chain[-1], [root]) == root


def test_configured_cacerts_dir(tmp_path: Path) -> None:
    write_cacerts(tmp_path / "elsewhere")
    ca = CertificateAuthority.load_or_create(
        tmp_path / "state", TD, 3600, cacerts_dir=tmp_path / "elsewhere"
    )
    assert str(tmp_path / "elsewhere") in ca.source


def test_incomplete_cacerts_names_the_missing_files(tmp_path: Path) -> None:
    write_cacerts(tmp_path / "cacerts")
    (tmp_path / "cacerts" / "ca-key.pem").unlink()
    with pytest.raises(CaSetupError, match=r"lacks \['ca-key.pem'\]"):
        CertificateAuthority.load_or_create(tmp_path, TD, 3600)


def test_cacerts_key_from_another_pair_is_refused(tmp_path: Path) -> None:
    write_cacerts(tmp_path / "cacerts")
    (tmp_path / "cacerts" / "ca-key.pem").write_bytes(x509u.private_key_pem(x509u.new_key()))
    with pytest.raises(CaSetupError, match="does not match the CA certificate"):
        CertificateAuthority.load_or_create(tmp_path, TD, 3600)


def test_cacerts_not_chaining_to_root_is_refused(tmp_path: Path) -> None:
    write_cacerts(tmp_path / "cacerts")
    stranger = x509u.self_signed_root(x509u.new_key(), TD)
    (tmp_path / "cacerts" / "root-cert.pem").write_bytes(x509u.certs_pem([stranger]))
    with pytest.raises(CaSetupError, match="does not lead to any of the trusted roots"):
        CertificateAuthority.load_or_create(tmp_path, TD, 3600)
