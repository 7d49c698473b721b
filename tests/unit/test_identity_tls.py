"""TLS contexts and SPIFFE checks: real handshakes over an in-memory socket pair."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import socket
import ssl
import threading

import pytest

from ztunnel_py.identity import tls
from ztunnel_py.identity.errors import IdentityError
from ztunnel_py.identity.testing import InMemoryCA

TD = "cluster.local"
ALICE = f"spiffe://{TD}/ns/default/sa/alice"
BOB = f"spiffe://{TD}/ns/other/sa/bob"


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> tuple[ssl.SSLSocket | BaseException, ssl.SSLSocket | BaseException]:
    """Run a TLS handshake over a socketpair; return each side's socket or its error."""
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    out: dict[str, ssl.SSLSocket | BaseException] = {}

    def serve() -> None:
        try:
            s = server_ctx.wrap_socket(a, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            out["server"] = exc
            a.close()
            return
        try:
            s.sendall(b"ok")
            out["server"] = s
        except (ssl.SSLError, OSError) as exc:
            out["server"] = exc
            s.close()

    t = threading.Thread(target=serve)
    t.start()
    client: ssl.SSLSocket | BaseException
    try:
        c = client_ctx.wrap_socket(b)
    except (ssl.SSLError, OSError) as exc:
        client = exc
        b.close()
    else:
        try:
            c.recv(2)  # a TLS 1.3 client learns of the server's refusal only here
            client = c
        except (ssl.SSLError, OSError) as exc:
            client = exc
            c.close()
    t.join(10)
    return out["server"], client


def close(*socks: object) -> None:
    for s in socks:
        if isinstance(s, ssl.SSLSocket):
            s.close()


def test_mutual_tls_13_h2_and_both_identities() -> None:
    ca = InMemoryCA()
    server, client = handshake(
        tls.server_context(ca.issue(BOB)), tls.client_context(ca.issue(ALICE))
    )
    try:
        assert isinstance(server, ssl.SSLSocket), server
        assert isinstance(client, ssl.SSLSocket), client
        assert client.version() == "TLSv1.3"
        assert client.selected_alpn_protocol() == "h2"
        assert tls.peer_identity(server, TD) == ALICE
        assert tls.peer_identity(client, TD) == BOB
    finally:
        close(server, client)


def test_server_rejects_client_from_another_ca() -> None:
    ca, rogue = InMemoryCA(), InMemoryCA()
    # the rogue client trusts the real roots, but its own certificate is not from them
    intruder = dataclasses.replace(rogue.issue(ALICE), roots_pem=ca.roots_pem)
    server, client = handshake(tls.server_context(ca.issue(BOB)), tls.client_context(intruder))
    close(server, client)
    assert isinstance(server, ssl.SSLCertVerificationError), server
    assert "unable to get local issuer certificate" in str(server)


def test_client_rejects_server_from_another_ca() -> None:
    ca, rogue = InMemoryCA(), InMemoryCA()
    impostor = dataclasses.replace(rogue.issue(BOB), roots_pem=ca.roots_pem)
    server, client = handshake(tls.server_context(impostor), tls.client_context(ca.issue(ALICE)))
    close(server, client)
    assert isinstance(client, ssl.SSLCertVerificationError), client


def test_server_requires_a_client_certificate() -> None:
    ca = InMemoryCA()
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cadata=ca.roots_pem.decode())
    server, client = handshake(tls.server_context(ca.issue(BOB)), anonymous)
    close(server, client)
    assert isinstance(server, ssl.SSLError)


def test_tls12_only_peer_is_refused() -> None:
    ca = InMemoryCA()
    old = tls.client_context(ca.issue(ALICE))
    old.minimum_version = ssl.TLSVersion.TLSv1_2
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    server, client = handshake(tls.server_context(ca.issue(BOB)), old)
    close(server, client)
    assert isinstance(server, ssl.SSLError)
    assert isinstance(client, (ssl.SSLError, OSError))


def test_root_bundle_with_several_roots_accepts_both() -> None:
    """During a root rotation peers trust the old and the new root."""
    old = InMemoryCA()
    new = InMemoryCA(also_trust=[old.root_pem])
    assert new.roots_pem.count(b"BEGIN CERTIFICATE") == 2
    server, client = handshake(
        tls.server_context(new.issue(BOB)), tls.client_context(new.issue(ALICE))
    )
    try:
        assert isinstance(server, ssl.SSLSocket), server
        assert tls.peer_identity(server, TD) == ALICE
    finally:
        close(server, client)
    # a client still holding an old-root certificate, but trusting both roots
    legacy_both = dataclasses.replace(old.issue(ALICE), roots_pem=new.roots_pem)
    server, client = handshake(tls.server_context(new.issue(BOB)), tls.client_context(legacy_both))
    try:
        assert isinstance(server, ssl.SSLSocket), server
        assert tls.peer_identity(server, TD) == ALICE
    finally:
        close(server, client)


@pytest.mark.parametrize(
    ("uris", "needle"),
    [
        (["spiffe://other.domain/ns/default/sa/alice"], "trust domain"),
        ([], "no URI SAN"),
        ([ALICE, BOB], "2 URI SANs"),
        (["https://example.com/alice"], "not a SPIFFE id"),
        ([f"spiffe://{TD}/alice"], "not a workload SPIFFE id"),
    ],
)
def test_peer_identity_refuses_bad_certificates(uris: list[str], needle: str) -> None:
    ca = InMemoryCA()
    server, client = handshake(
        tls.server_context(ca.issue(BOB)), tls.client_context(ca.issue_unchecked(uris))
    )
    try:
        assert isinstance(server, ssl.SSLSocket), server
        with pytest.raises(IdentityError, match=needle):
            tls.peer_identity(server, TD)
    finally:
        close(server, client)


def test_peer_identity_without_peer_certificate() -> None:
    ca = InMemoryCA()
    srv = tls.server_context(ca.issue(BOB))
    srv.verify_mode = ssl.CERT_NONE
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.verify_mode = ssl.CERT_NONE
    server, client = handshake(srv, anonymous)
    try:
        assert isinstance(server, ssl.SSLSocket), server
        with pytest.raises(IdentityError, match="no certificate"):
            tls.peer_identity(server, TD)
    finally:
        close(server, client)


def test_expired_certificate_is_refused_by_the_peer() -> None:
    ca = InMemoryCA()
    expired = ca.issue_unchecked(
        [ALICE], ttl_s=60, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    )
    server, client = handshake(tls.server_context(ca.issue(BOB)), tls.client_context(expired))
    close(server, client)
    assert isinstance(server, ssl.SSLError)
    assert "expired" in str(server)


def test_contexts_load_keys_without_leaking_descriptors() -> None:
    """The key goes through a memfd: no file descriptors are left open afterwards."""
    ca = InMemoryCA()
    cert = ca.issue(ALICE)
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(5):
        tls.server_context(cert)
        tls.client_context(cert)
    assert set(os.listdir("/proc/self/fd")) <= before


def test_memory_bio_tls_calls_the_c_object_directly_and_still_works() -> None:
    # uvloop's SSL protocol wraps memory BIOs: its read/write/pending go straight to C
    ca = InMemoryCA()
    s_ctx, c_ctx = tls.server_context(ca.issue(BOB)), tls.client_context(ca.issue(ALICE))
    bios = [ssl.MemoryBIO() for _ in range(4)]
    server = s_ctx.wrap_bio(bios[0], bios[1], server_side=True)
    client = c_ctx.wrap_bio(bios[2], bios[3])
    for obj in (server, client):
        assert isinstance(obj, tls.DirectSSLObject)
        assert type(obj.read).__name__ == "builtin_function_or_method"
        assert obj.read.__self__ is obj._sslobj and obj.write.__self__ is obj._sslobj
        assert obj.pending.__self__ is obj._sslobj

    def pump(src: ssl.MemoryBIO, dst: ssl.MemoryBIO) -> None:
        dst.write(src.read())

    for _ in range(5):  # the handshake over memory, as uvloop drives it
        for obj in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        pump(bios[3], bios[0])
        pump(bios[1], bios[2])
    assert client.write(b"through C") == 9
    pump(bios[3], bios[0])
    buf = bytearray(64)
    assert server.read(64, buf) == 9 and bytes(buf[:9]) == b"through C"
    assert server.pending() == 0
    assert tls.peer_identity(server, TD) == ALICE
