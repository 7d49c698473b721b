"""``ztunnel-py doctor``: the pure decisions, and the real command on this host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from tests.conftest import require_root
from ztunnel_py import doctor
from ztunnel_py.doctor import FAIL, OK, WARN, Result


def _header_tree(root: Path) -> Path:
    for rel in ("include/linux/kconfig.h", "include/generated/autoconf.h"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("/* */\n")
    return root


def test_headers_come_from_bcc_kernel_source_first(tmp_path: Path) -> None:
    path, source = doctor.choose_headers({"BCC_KERNEL_SOURCE": str(tmp_path)}, "6.1.0-x")
    assert (path, source) == (tmp_path, "BCC_KERNEL_SOURCE")
    path, source = doctor.choose_headers({}, "no-such-release")
    assert path == doctor.DEFAULT_HEADERS


def test_empty_header_dir_fails_with_a_fix_naming_the_variable(tmp_path: Path) -> None:
    bad = doctor.headers_result(tmp_path, "BCC_KERNEL_SOURCE")
    assert bad.status == FAIL
    assert "kconfig.h" in bad.detail
    assert f"BCC_KERNEL_SOURCE={tmp_path}" in bad.fix
    missing = doctor.headers_result(tmp_path / "nope", "BCC_KERNEL_SOURCE")
    assert missing.status == FAIL and "does not exist" in missing.detail
    good = doctor.headers_result(_header_tree(tmp_path), "BCC_KERNEL_SOURCE")
    assert good.status == OK


def test_privileges_accept_root_or_both_capabilities() -> None:
    caps = doctor.caps_from_status("Name:\tx\nCapEff:\t0000008000001000\n")
    assert caps == (1 << doctor.CAP_BPF) | (1 << doctor.CAP_NET_ADMIN)
    assert doctor.privileges_result(1000, caps).status == OK
    assert doctor.privileges_result(0, 0).status == OK
    only_net = doctor.privileges_result(1000, 1 << doctor.CAP_NET_ADMIN)
    assert only_net.status == FAIL and "CAP_BPF" in only_net.detail and only_net.fix


def test_exit_status_and_table() -> None:
    results = [
        Result("a", OK, "fine"),
        Result("b", WARN, "meh", "try x"),
        Result("c", FAIL, "broken", "do y", required=False),
    ]
    assert doctor.exit_status(results) == 0
    results.append(Result("d", FAIL, "gone", "mount it"))
    assert doctor.exit_status(results) == 1
    table = doctor.render_table(results)
    assert table.splitlines()[0].split() == ["CHECK", "STATUS", "DETAIL", "FIX"]
    assert "mount it" in table and "1 required check(s) failed" in table


def test_a_crashing_probe_is_a_failure_not_a_crash() -> None:
    def probe_boom(env: Mapping[str, str]) -> Result:
        raise RuntimeError("kaput")

    def probe_fine(env: Mapping[str, str]) -> Result:
        return Result("fine", OK, env["X"])

    results = doctor.run_checks({"X": "seen"}, (probe_boom, probe_fine))
    assert [(r.check, r.status) for r in results] == [("boom", FAIL), ("fine", OK)]
    assert "kaput" in results[0].detail and results[1].detail == "seen"


def _doctor(env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ztunnel_py", "doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(env),
    )


def test_doctor_passes_on_this_host() -> None:
    require_root()
    done = _doctor(os.environ)
    report = json.loads(done.stdout)
    failed = [c for c in report["checks"] if c["status"] == FAIL]
    assert done.returncode == 0, failed
    assert report["ok"] is True
    assert {c["check"] for c in report["checks"]} >= {"bpf syscall", "tc clsact", "bcc"}


def test_doctor_fails_with_empty_bcc_kernel_source_and_says_how_to_fix(tmp_path: Path) -> None:
    require_root()
    done = _doctor({**os.environ, "BCC_KERNEL_SOURCE": str(tmp_path)})
    assert done.returncode != 0
    checks = {c["check"]: c for c in json.loads(done.stdout)["checks"]}
    assert checks["kernel headers"]["status"] == FAIL
    assert "BCC_KERNEL_SOURCE" in checks["kernel headers"]["fix"]
    assert checks["bcc"]["status"] == FAIL  # the trial compile really used the empty dir
