"""``bench.hbone.print_cpu``: the CPU table shows what the run measured, and only that."""

from __future__ import annotations

import pytest

from bench.hbone import print_cpu


def test_rows_the_run_did_not_measure_are_left_out(capsys: pytest.CaptureFixture[str]) -> None:
    print_cpu({"agents": {"rps_16": 45.0, "conn_per_s": 500.0},
               "haproxy": {"rps_16": 50.0, "conn_per_s": 2000.0}})
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("CPU")]
    assert [row.split()[:4] for row in rows] == [
        ["CPU", "us", "per", "request"], ["CPU", "us", "per", "new"]]
    assert rows[0].endswith("0.90x") and rows[1].endswith("0.25x")
    assert "nan" not in "".join(rows)
