"""The floor under a Python data plane: what one wakeup costs a server that reads a small
message and writes it back, in C and in Python on uvloop, plain and in TLS 1.3.

    .venv/bin/python -m bench.floor [--round-trips 6000] [--repeat 3]

A client (this process, blocking sockets) sends 100 bytes and waits for them to come
back, one message at a time and a pause of 0.4 ms between, so that, as at
``bench.hbone``'s fixed rate, every message wakes the server from its sleep in epoll.
Each server runs in a process of its own on loopback and is charged its CPU time per
round trip (``/proc/PID/schedstat``: time on CPU in nanoseconds, kernel included), which
is steadier here than the round trip itself (printed too, as the client's p50):

* c: an epoll echo in C (compiled here with cc): the floor of any proxy's wakeup;
* uvloop: an asyncio ``BufferedProtocol`` echo on uvloop, as the agents' TCP legs;
* c-tls: the C echo under OpenSSL's TLS 1.3 (read-ahead, one read per record): one
  record decrypted and one encrypted per wakeup, as HAProxy does them;
* uvloop-tls: the uvloop echo under uvloop's TLS 1.3 (``SSLProtocol`` over the ssl
  module's ``SSLObject``), as the agents' HBONE side.

Ratios are against c, in the same run. The Python echo is two interpreted lines, the
least a Python protocol can do, so "uvloop - c" is the runtime's own cost per wakeup (the
event loop's callbacks, the GIL, objects), whatever the protocol then does. A request
through ``bench.hbone``'s two agents wakes them four times (request and response, each
agent), so four times that is the floor of what a Python data plane adds to its round
trip over HAProxy's, which pays the C rows. (The TLS rows differ by more: uvloop's
``SSLProtocol`` and the ssl module's wrappers come on top, and the GIL is released
around every OpenSSL call.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MESSAGE = b"x" * 99 + b"\n"
PAUSE_S = 0.0004
WARM_UP = 500
SERVERS = ("c", "uvloop", "c-tls", "uvloop-tls")

LISTEN_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

static int one = 1;

static int listen_loopback(const char *port) {
  int ls = socket(AF_INET, SOCK_STREAM, 0);
  setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(port)),
                          .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 16)) exit(1);
  return ls;
}
"""

ECHO_C = LISTEN_C + r"""
int main(int argc, char **argv) {
  int ls = listen_loopback(argv[1]), ep = epoll_create1(0);
  struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls}, evs[64];
  epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
  static char buf[65536];
  for (;;) {
    int n = epoll_wait(ep, evs, 64, -1);
    for (int i = 0; i < n; i++) {
      int fd = evs[i].data.fd;
      if (fd == ls) {
        int c = accept4(ls, 0, 0, SOCK_NONBLOCK);
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct epoll_event e = {.events = EPOLLIN, .data.fd = c};
        epoll_ctl(ep, EPOLL_CTL_ADD, c, &e);
        continue;
      }
      ssize_t got = read(fd, buf, sizeof buf);
      if (got <= 0) {
        close(fd);
        continue;
      }
      if (write(fd, buf, got) != got) close(fd);
    }
  }
}
"""

ECHO_TLS_C = LISTEN_C + r"""
#include <openssl/ssl.h>

/* one connection at a time: TLS 1.3 handshake (blocking), then an epoll loop that
   decrypts what came and encrypts it back, as a proxy in C does per wakeup */
int main(int argc, char **argv) {
  SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  SSL_CTX_set_read_ahead(ctx, 1); /* one read(2) per record, as from a proxy's buffer */
  if (SSL_CTX_use_certificate_chain_file(ctx, argv[2]) != 1 ||
      SSL_CTX_use_PrivateKey_file(ctx, argv[2], SSL_FILETYPE_PEM) != 1) return 2;
  int ls = listen_loopback(argv[1]), ep = epoll_create1(0);
  static char buf[65536];
  for (;;) {
    int c = accept(ls, 0, 0);
    if (c < 0) continue;
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    SSL *s = SSL_new(ctx);
    SSL_set_fd(s, c);
    if (SSL_accept(s) == 1) {
      fcntl(c, F_SETFL, O_NONBLOCK);
      struct epoll_event e = {.events = EPOLLIN, .data.fd = c}, got;
      epoll_ctl(ep, EPOLL_CTL_ADD, c, &e);
      for (int open = 1; open;) {
        /* (read-ahead may hold a record already: the first one came with the handshake) */
        if (!SSL_has_pending(s) && epoll_wait(ep, &got, 1, -1) < 1) continue;
        int n = SSL_read(s, buf, sizeof buf);
        if (n <= 0)
          open = SSL_get_error(s, n) == SSL_ERROR_WANT_READ;
        else if (SSL_write(s, buf, n) != n)
          open = 0;
      }
      epoll_ctl(ep, EPOLL_CTL_DEL, c, 0);
    }
    SSL_free(s);
    close(c);
  }
}
"""


# -- the Python servers (``serve``, in a process of their own) ---------------------------


class Echo(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.buf = memoryview(bytearray(65536))
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        assert self.transport is not None
        self.transport.write(bytes(self.buf[:nbytes]))


def serve(port: int, cert: str | None) -> int:
    import uvloop

    ctx = None
    if cert is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(cert)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(
            Echo, "127.0.0.1", port, ssl=ctx)
        async with server:
            await server.serve_forever()

    uvloop.run(main())
    return 0


# -- the client and the table ----------------------------------------------------------


def _cpu_ns(pid: int) -> int:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def _round_trips(port: int, tls: bool, pid: int, count: int) -> tuple[float, float]:
    """(server CPU us per round trip, client's p50 round trip in us) over ``count``."""
    sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # a yardstick on loopback: no identity to check
        sock = ctx.wrap_socket(sock)
    times: list[float] = []
    with sock:
        for i in range(WARM_UP + count):
            if i == WARM_UP:
                cpu0 = _cpu_ns(pid)
            t = time.perf_counter()
            sock.sendall(MESSAGE)
            got = 0
            while got < len(MESSAGE):
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError(f"server on :{port} closed")
                got += len(chunk)
            times.append(time.perf_counter() - t)
            time.sleep(PAUSE_S)
        cpu = (_cpu_ns(pid) - cpu0) / 1e3 / count
    return cpu, statistics.median(times[WARM_UP:]) * 1e6


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for :{port} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on :{port}")


def _cert(workdir: Path) -> str:
    from ztunnel_py.identity.testing import InMemoryCA

    issued = InMemoryCA().issue("spiffe://cluster.local/ns/bench/sa/floor", 3600)
    path = workdir / "echo.pem"
    path.write_bytes(issued.chain_pem + issued.key_pem)
    os.chmod(path, 0o600)
    return str(path)


def _commands(workdir: Path, base_port: int) -> dict[str, tuple[list[str], int]]:
    for name, code, libs in (("echo", ECHO_C, []), ("echo-tls", ECHO_TLS_C, ["-lssl", "-lcrypto"])):
        (workdir / f"{name}.c").write_text(code)
        subprocess.run(["cc", "-O2", "-o", str(workdir / name), str(workdir / f"{name}.c"), *libs],
                       check=True)
    cert = _cert(workdir)
    me = [sys.executable, "-m", "bench.floor", "serve"]
    return {
        "c": ([str(workdir / "echo"), str(base_port)], base_port),
        "uvloop": ([*me, str(base_port + 1)], base_port + 1),
        "c-tls": ([str(workdir / "echo-tls"), str(base_port + 2), cert], base_port + 2),
        "uvloop-tls": ([*me, str(base_port + 3), "--cert", cert], base_port + 3),
    }


def run(count: int, repeat: int, base_port: int) -> dict[str, list[tuple[float, float]]]:
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in SERVERS}
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp:
        commands = _commands(Path(tmp), base_port)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        procs = {name: subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)
                 for name, (cmd, _port) in commands.items()}
        try:
            for name, (_cmd, port) in commands.items():
                _wait_listening(port, procs[name])
            for rnd in range(repeat):
                order = SERVERS if rnd % 2 == 0 else SERVERS[::-1]
                for name in order:
                    print(f"# round {rnd + 1}/{repeat}: {name} ...", file=sys.stderr, flush=True)
                    rows[name].append(_round_trips(commands[name][1], name.endswith("-tls"),
                                                   procs[name].pid, count))
        finally:
            for proc in procs.values():
                proc.terminate()
            for proc in procs.values():
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return rows


def print_table(rows: dict[str, list[tuple[float, float]]], count: int) -> None:
    med = {name: (statistics.median(c for c, _ in r), statistics.median(p for _, p in r))
           for name, r in rows.items()}
    base_cpu, base_p50 = med["c"]
    print(f"\none wakeup: 100 bytes read and written back, one at a time ({count} round trips "
          f"per round; medians of {len(rows['c'])} rounds)\n")
    head = (f"{'server':<14}{'CPU us/round trip':>19}{'vs c':>8}{'p50 round trip us':>19}"
            f"{'vs c':>8}")
    print(head)
    print("-" * len(head))
    for name, (cpu, p50) in med.items():
        print(f"{name:<14}{cpu:>19.1f}{cpu / base_cpu:>7.2f}x{p50:>19.1f}{p50 / base_p50:>7.2f}x")
    print()
    for py, c in (("uvloop", "c"), ("uvloop-tls", "c-tls")):
        extra = med[py][0] - med[c][0]
        print(f"{py} - {c}: {extra:.1f} us of CPU per wakeup (x4, the wakeups of a request "
              f"through bench.hbone's two agents: {4 * extra:.0f} us)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    s = sub.add_parser("serve", help="(internal) a uvloop echo server")
    s.add_argument("port", type=int)
    s.add_argument("--cert", help="PEM chain and key: serve TLS 1.3")
    parser.add_argument("--round-trips", type=int, default=6000, help="per server and round")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds, the servers' order flipped every round")
    parser.add_argument("--port", type=int, default=19460,
                        help="the first of the four loopback ports the servers listen on")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        return serve(args.port, args.cert)
    print_table(run(args.round_trips, max(1, args.repeat), args.port), args.round_trips)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
