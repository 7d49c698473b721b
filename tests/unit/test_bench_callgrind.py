"""``bench.hbone.callgrind_totals``: the event totals of a real callgrind dump with the
cache simulation ``--instructions`` turns on (valgrind: scripts/setup.sh installs it)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.hbone import _valgrind, callgrind_totals


def test_a_dump_gives_instructions_and_l1_misses_by_name(tmp_path: Path) -> None:
    subprocess.run([*_valgrind(tmp_path, "t"), "/bin/true"], check=True, capture_output=True,
                   timeout=120)
    totals = callgrind_totals((tmp_path / "callgrind-t.out").read_text())
    assert {"Ir", "I1mr", "D1mr", "D1mw"} <= totals.keys()
    # misses are a part of the accesses: every instruction fetch is one I1 access
    assert 0 < totals["I1mr"] < totals["Ir"] and totals["D1mr"] < totals["Dr"]


def test_the_totals_line_stands_in_for_a_missing_summary_and_trailing_zeros_are_left_out(
) -> None:
    dump = "version: 1\nevents: Ir I1mr D1mw\nfn=(1) main\n16 3\ntotals: 120 7\n"
    assert callgrind_totals(dump) == {"Ir": 120, "I1mr": 7, "D1mw": 0}
