"""``bench.hbone._iperf``: a busy iperf3 server (still ending the last test) is asked
again for a bounded time; any other error fails the measurement at once."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

import bench.hbone as hb

BUSY = json.dumps({"error": "the server is busy running a test. try again later"})
DONE = json.dumps({"end": {"sum_received": {"bits_per_second": 4.5e9}}})


class Topo:
    def __init__(self, answers: list[str]) -> None:
        self.answers = answers
        self.calls = 0

    def run(self, pod: str, argv: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        self.calls += 1
        out = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return subprocess.CompletedProcess(argv, 1, out, "")


def test_a_busy_server_is_asked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hb.time, "sleep", lambda _s: None)
    topo = Topo([BUSY, BUSY, DONE])
    assert hb._iperf(topo, "client", "10.0.0.1", 5201, 5, 1) == 4.5
    assert topo.calls == 3


def test_a_server_busy_past_the_wait_or_another_error_fails(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hb, "IPERF_BUSY_WAIT_S", 0.0)
    with pytest.raises(RuntimeError, match="busy"):
        hb._iperf(Topo([BUSY]), "client", "10.0.0.1", 5201, 5, 1)
    refused = Topo([json.dumps({"error": "unable to connect to server: Connection refused"})])
    with pytest.raises(RuntimeError, match="refused"):
        hb._iperf(refused, "client", "10.0.0.1", 5201, 5, 1)
    assert refused.calls == 1
