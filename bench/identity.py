"""Costs of workload identity: CA signing, agent key/CSR, TLS contexts, mTLS handshakes.

    .venv/bin/python -m bench.identity [--seconds 1.0]

Each group has a baseline measured in the same run; the ratio column is the
row's cost per operation relative to its group's baseline (>1 = slower):

* CA: a raw ECDSA P-256 signature vs ``sign_csr`` (parse + verify CSR, issue leaf);
* agent: a raw key generation vs key + CSR;
* contexts: ``load_cert_chain`` from a tmpfs file vs our memfd ``server_context``;
* handshakes (in memory, both sides in this process): server-auth-only TLS 1.3
  vs the mesh's mutual TLS 1.3 with SPIFFE id extraction.
"""

from __future__ import annotations

import argparse
import os
import ssl
import tempfile
import time
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ztunnel_py.identity import tls
from ztunnel_py.identity import x509 as x509u
from ztunnel_py.identity.testing import InMemoryCA

TD = "cluster.local"
ALICE = f"spiffe://{TD}/ns/default/sa/alice"
BOB = f"spiffe://{TD}/ns/default/sa/bob"


def rate(fn: Callable[[], object], seconds: float) -> float:
    calls, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        fn()
        calls += 1
        now = time.perf_counter()
        if now >= deadline:
            return calls / (now - start)


def pump(client: ssl.SSLObject, c_in: ssl.MemoryBIO, c_out: ssl.MemoryBIO,
         server: ssl.SSLObject, s_in: ssl.MemoryBIO, s_out: ssl.MemoryBIO) -> None:
    """Drive both handshakes to completion through memory BIOs."""
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, obj in (("c", client), ("s", server)):
            if done[name]:
                continue
            try:
                obj.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise RuntimeError("handshake did not complete")


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, check: bool) -> None:
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    pump(client, c_in, c_out, server, s_in, s_out)
    if check:
        assert tls.peer_identity(client, TD) == BOB
        assert tls.peer_identity(server, TD) == ALICE


def plain_server_ctx(path: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(path)
    return ctx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per row (default 1.0)")
    args = parser.parse_args(argv)
    s = args.seconds

    ca = InMemoryCA()
    raw_key = x509u.new_key()
    csr = x509u.build_csr(x509u.new_key(), ALICE)
    server_cert, client_cert = ca.issue(BOB), ca.issue(ALICE)

    groups: list[tuple[str, list[tuple[str, float]]]] = []
    groups.append(("CA", [
        ("ECDSA P-256 sign (baseline)",
         rate(lambda: raw_key.sign(b"x" * 32, ec.ECDSA(hashes.SHA256())), s)),
        ("sign_csr: verify CSR + issue leaf", rate(lambda: ca.sign_csr(csr, ALICE, 3600), s)),
    ]))
    groups.append(("agent", [
        ("P-256 key generation (baseline)", rate(x509u.new_key, s)),
        ("key + CSR", rate(lambda: x509u.build_csr(x509u.new_key(), ALICE), s)),
    ]))
    with tempfile.NamedTemporaryFile(dir="/dev/shm", suffix=".pem") as f:
        f.write(server_cert.chain_pem + server_cert.key_pem)
        f.flush()
        os.fchmod(f.fileno(), 0o600)
        groups.append(("contexts", [
            ("load_cert_chain from tmpfs file (baseline)",
             rate(lambda: plain_server_ctx(f.name), s)),
            ("tls.server_context (memfd, roots, ALPN)",
             rate(lambda: tls.server_context(server_cert), s)),
            ("tls.client_context (memfd, roots, ALPN)",
             rate(lambda: tls.client_context(client_cert), s)),
        ]))
    server_only = tls.server_context(server_cert)
    server_only.verify_mode = ssl.CERT_NONE
    anon = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anon.check_hostname = False
    anon.load_verify_locations(cadata=ca.roots_pem.decode())
    anon.set_alpn_protocols(["h2"])
    mtls_server, mtls_client = tls.server_context(server_cert), tls.client_context(client_cert)
    groups.append(("handshakes", [
        ("TLS 1.3 server-auth only (baseline)",
         rate(lambda: handshake(server_only, anon, False), s)),
        ("mesh mTLS 1.3 + SPIFFE check",
         rate(lambda: handshake(mtls_server, mtls_client, True), s)),
    ]))

    print(f"{'group':<11} {'operation':<44} {'ops/s':>10} {'us/op':>9} {'ratio':>6}")
    for group, rows in groups:
        base = rows[0][1]
        for name, r in rows:
            print(f"{group:<11} {name:<44} {r:>10.0f} {1e6 / r:>9.1f} {base / r:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
