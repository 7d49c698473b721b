"""``bench.floor`` runs end to end: the C echo builds (cc: scripts/setup.sh installs gcc),
every server answers, figures come."""

from __future__ import annotations

import math
import random

import pytest

from bench.floor import SERVERS, print_table, run


def test_every_server_echoes_and_is_charged_its_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    rows = run(count=50, repeat=1, base_port=random.randrange(20000, 30000, 4))
    assert list(rows) == list(SERVERS)
    for name, [(cpu, p50)] in rows.items():
        assert math.isfinite(cpu) and cpu > 0, name
        assert math.isfinite(p50) and p50 > 0, name
    print_table(rows, 50)
    out = capsys.readouterr().out
    assert all(name in out for name in SERVERS) and "uvloop-tls - c-tls" in out
