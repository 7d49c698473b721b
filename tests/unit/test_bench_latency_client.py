"""``bench.hbone.run_latency``: the fixed-rate client gives each target its turns."""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import threading
import time

import pytest

from bench.hbone import run_latency

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Responder:
    """A loopback HTTP/1.1 keep-alive responder that notes when each request came."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.times: list[float] = []
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while data := conn.recv(4096):
                buf += data
                while (end := buf.find(b"\r\n\r\n")) >= 0:
                    buf = buf[end + 4 :]
                    self.times.append(time.perf_counter())
                    conn.sendall(RESPONSE)

    def close(self) -> None:
        """Stop accepting, end every connection and wait for its thread.

        A connection is shut down, not closed, from here: its serve thread may be in
        ``recv`` on it, and closing the descriptor under that call fails it with EBADF.
        The shutdown makes ``recv`` return EOF; the serve thread then closes its socket.
        """
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._acceptor.join(timeout=5)
        for conn in self._conns:
            with contextlib.suppress(OSError):  # its thread closed it when the client left
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)


def test_targets_take_turns_and_each_gets_its_share(capsys: pytest.CaptureFixture[str]) -> None:
    a, b = Responder(), Responder()
    try:
        rc = run_latency([("127.0.0.1", a.port), ("127.0.0.1", b.port)], rate=400,
                         duration=0.5, conns=2, slice_s=0.05)
    finally:
        a.close()
        b.close()
    assert rc == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [f["count"] for f in figures] == [200, 200]
    assert [f["errors"] for f in figures] == [0, 0]
    assert all(0 < f["p50_ms"] <= f["p99_ms"] for f in figures)
    # turns of 20 requests: each target is served across the whole second, not one half
    # of it after the other, and the requests of one turn go to one target
    assert len(a.times) == len(b.times) == 200
    assert a.times[-1] - a.times[0] > 0.8 and b.times[-1] - b.times[0] > 0.8
    merged = sorted([(t, "a") for t in a.times] + [(t, "b") for t in b.times])
    switches = sum(1 for x, y in itertools.pairwise(merged) if x[1] != y[1])
    assert 15 <= switches <= 25  # 20 turns in all: 19 switches
