"""TLS contexts for HBONE (TLS 1.3, ALPN h2, mutual authentication) and peer identity.

Python's ``ssl`` loads certificates and keys only from files; we hand it an
anonymous in-memory file (``memfd_create``) through ``/proc/self/fd/N`` so that
private keys never touch a disk. Building a context costs a few hundred
microseconds: callers cache contexts per certificate serial.
"""

from __future__ import annotations

import os
import ssl
import typing
from typing import Any

from cryptography import x509

from ztunnel_py.identity import x509 as x509u
from ztunnel_py.identity.certs import WorkloadCertificate
from ztunnel_py.identity.errors import IdentityError

ALPN_H2 = "h2"


def _load_identity(ctx: ssl.SSLContext, cert: WorkloadCertificate) -> None:
    fd = os.memfd_create("ztunnel-identity", os.MFD_CLOEXEC)
    try:
        data = memoryview(cert.chain_pem + b"\n" + cert.key_pem)
        while data:
            data = data[os.write(fd, data):]
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    except ssl.SSLError as exc:
        raise IdentityError(
            f"cannot load the certificate for {cert.identity} into TLS: {exc.reason or exc}"
        ) from None
    finally:
        os.close(fd)


class DirectSSLObject(ssl.SSLObject):
    """An ``SSLObject`` whose ``read``, ``write`` and ``pending`` are the C object's own.

    uvloop's SSL protocol (the transport of every HBONE connection) calls them about
    twice per TLS record; ``ssl.SSLObject``'s methods only forward to ``_sslobj`` with
    the same arguments, each a Python frame of its own (four per request through an
    agent). Bound as instance attributes, uvloop's calls go straight to C. Every other
    method is ``SSLObject``'s."""

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> DirectSSLObject:
        obj = super()._create(*args, **kwargs)  # type: ignore[misc]
        c = obj._sslobj
        vars(obj).update(read=c.read, write=c.write, pending=c.pending)
        return typing.cast(DirectSSLObject, obj)


def _base(purpose: ssl.Purpose, cert: WorkloadCertificate) -> ssl.SSLContext:
    server = purpose is ssl.Purpose.CLIENT_AUTH
    protocol = ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT
    ctx = ssl.SSLContext(protocol)
    if hasattr(ssl.SSLObject, "_create"):  # (CPython's, since 3.7)
        ctx.sslobject_class = DirectSSLObject
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([ALPN_H2])
    try:
        ctx.load_verify_locations(cadata=cert.roots_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError) as exc:
        raise IdentityError(f"cannot load the mesh roots for {cert.identity}: {exc}") from None
    _load_identity(ctx, cert)
    return ctx


def server_context(cert: WorkloadCertificate) -> ssl.SSLContext:
    """HBONE server side: present ``cert``, require a client certificate from the mesh roots."""
    ctx = _base(ssl.Purpose.CLIENT_AUTH, cert)
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Pooled HBONE connections never resume sessions: do not send tickets.
    ctx.num_tickets = 0
    return ctx


def client_context(cert: WorkloadCertificate) -> ssl.SSLContext:
    """HBONE client side: present ``cert``, verify the server chain against the mesh roots.

    Host names are not checked: the caller checks the peer's SPIFFE id with
    :func:`peer_identity` against the identity it expected.
    """
    ctx = _base(ssl.Purpose.SERVER_AUTH, cert)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket, trust_domain: str) -> str:
    """The verified peer's SPIFFE id (its leaf's single URI SAN) in ``trust_domain``."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise IdentityError(
            "the peer presented no certificate: it is not a mesh workload (plaintext client, "
            "or a TLS context without CERT_REQUIRED)"
        )
    try:
        leaf = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise IdentityError(f"the peer's certificate does not parse: {exc}") from None
    return x509u.leaf_identity(leaf, trust_domain)
