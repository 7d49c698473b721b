"""The compiled hot modules (agent and waypoint): used when current, never when stale or
turned off."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ztunnel_py import native

REPO = Path(__file__).resolve().parents[2]
PROBE = ("import ztunnel_py.native as n, waypoint.proxy as p, ztunnel_py.hbone.aio as a; "
         "print(n.compiled, p.__file__.rsplit('.', 1)[-1], a.__file__.rsplit('.', 1)[-1])")


def _built() -> bool:
    return native.stale_reason() is None


def test_ci_runs_the_tests_against_the_compiled_modules() -> None:
    """``make setup`` compiles them; the suite must exercise what production runs."""
    if not _built():
        if os.environ.get("CI") == "true":
            pytest.fail(f"the hot modules are not compiled under CI: "
                        f"{native.stale_reason()}")
        pytest.skip(f"NOT COMPILED (run 'make native'): {native.stale_reason()}")
    assert native.compiled
    import waypoint.proxy
    import ztunnel_py.hbone.aio

    for module in (waypoint.proxy, ztunnel_py.hbone.aio):
        assert module.__file__ is not None and module.__file__.endswith(".so")


def _copy(tmp: Path) -> Path:
    """The packages with their build, and mypyc's shared library, in ``tmp``."""
    for package in ("ztunnel_py", "waypoint"):
        shutil.copytree(REPO / package, tmp / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for lib in REPO.glob(f"{native.GROUP}__mypyc*"):
        shutil.copy(lib, tmp)
    return tmp


def _probe(root: Path, **env: str) -> tuple[str, str]:
    run = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=root, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{REPO}", **env})
    assert run.returncode == 0, run.stderr
    return run.stdout.strip(), run.stderr


def test_a_stale_build_is_not_used_and_says_so(tmp_path: Path) -> None:
    if not _built():
        pytest.skip(f"NOT COMPILED (run 'make native'): {native.stale_reason()}")
    root = _copy(tmp_path)
    out, err = _probe(root)
    assert out == "True so so" and err == ""
    src = root / "ztunnel_py" / "hbone" / "core.py"
    src.write_text(src.read_text() + "\n# edited after the build\n")
    out, err = _probe(root)
    assert out == "False py py"  # the edited source runs, not its old extension
    assert "stale" in err and "ztunnel_py.hbone.core" in err


def test_a_build_of_another_module_set_is_not_used(tmp_path: Path) -> None:
    """mypyc's library holds the modules it was built with: a stamp for another set of
    modules (one added to ``MODULES`` since, or dropped) is stale even if each source
    it lists is unchanged."""
    if not _built():
        pytest.skip(f"NOT COMPILED (run 'make native'): {native.stale_reason()}")
    root = _copy(tmp_path)
    stamp = root / "ztunnel_py" / native.STAMP.name
    data = json.loads(stamp.read_text())
    del data["sources"]["waypoint.authz"]
    stamp.write_text(json.dumps(data))
    out, err = _probe(root)
    assert out == "False py py" and "built for modules" in err


def test_a_build_by_another_interpreter_is_not_used(tmp_path: Path) -> None:
    """Two builds of one Python version share a cache tag (``cpython-311``) but not
    necessarily CPython's internals, which mypyc's C uses: the stamp names the build."""
    if not _built():
        pytest.skip(f"NOT COMPILED (run 'make native'): {native.stale_reason()}")
    root = _copy(tmp_path)
    stamp = root / "ztunnel_py" / native.STAMP.name
    data = json.loads(stamp.read_text())
    data["interpreter"] = "3.11.0 (main, Jan  1 2023, 00:00:00) [another build]"
    stamp.write_text(json.dumps(data))
    out, err = _probe(root)
    assert out == "False py py" and "built by Python '3.11.0" in err


def test_the_compiled_modules_load_from_any_working_directory() -> None:
    """mypyc's library sits beside the packages, which an editable install's finder does
    not put on the path: an agent started from elsewhere still loads the build."""
    if not _built():
        pytest.skip(f"NOT COMPILED (run 'make native'): {native.stale_reason()}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", PROBE], cwd="/", capture_output=True,
                         text=True, timeout=60, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "True so so"


def test_pure_mode_runs_the_sources(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    out, err = _probe(root, ZTUNNEL_PY_PURE="1")
    assert out == "False py py" and err == ""
