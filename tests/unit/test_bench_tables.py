"""``bench.hbone``'s tables show what the run measured, and only that."""

from __future__ import annotations

import pytest

from bench.hbone import print_cpu, print_rounds, print_table


def test_rows_the_run_did_not_measure_are_left_out(capsys: pytest.CaptureFixture[str]) -> None:
    print_cpu({"agents": {"rps_16": 45.0, "conn_per_s": 500.0},
               "haproxy": {"rps_16": 50.0, "conn_per_s": 2000.0}})
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("CPU")]
    assert [row.split()[:4] for row in rows] == [
        ["CPU", "us", "per", "request"], ["CPU", "us", "per", "new"]]
    assert rows[0].endswith("0.90x") and rows[1].endswith("0.25x")
    assert "nan" not in "".join(rows)


def test_a_path_the_run_left_out_shows_as_a_dash(capsys: pytest.CaptureFixture[str]) -> None:
    nan = float("nan")  # a metric the run left out: absent, or NaN as its median
    print_table({"agents": {"p50_ms": 0.33, "rps_16": nan},
                 "haproxy": {"p50_ms": 0.30, "rps_16": nan}}, 5, 2000)
    out = capsys.readouterr().out.splitlines()
    [row] = [line for line in out if line.startswith("p50")]
    assert row.split()[-5:] == ["-", "0.33", "0.30", "1.10x", "-"]
    assert not [line for line in out if line.startswith(("p99", "throughput", "requests"))]


def test_each_round_shows_the_tail_as_a_ratio_and_as_both_sides_figures(
        capsys: pytest.CaptureFixture[str]) -> None:
    print_rounds({"agents": [{"p50_ms": 0.33, "p99_ms": 1.2}, {"p50_ms": 0.34, "p99_ms": 0.6}],
                  "haproxy": [{"p50_ms": 0.30, "p99_ms": 0.6}, {"p50_ms": 0.31, "p99_ms": 0.6}]})
    rows = {line[:38].strip(): line[38:] for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["p99 latency"] == "2.00x 1.00x"
    assert rows["p99 ms, agents/haproxy"] == "1.20/0.60 0.60/0.60"
