"""Compile the data path's hot modules with mypyc, in place (``make native``).

    .venv/bin/python scripts/build_native.py [--clean]

Builds ``ztunnel_py.native.MODULES`` (the agent's HBONE and relay modules, the
waypoint's per-request ones) into C extensions beside their sources plus mypyc's
shared library (``ztunnel_native__mypyc*.so`` at the repository root), then
writes ``ztunnel_py/native.json`` with the SHA-256 of each compiled source.
Nothing is done when that stamp already matches the sources. Needs a C compiler
and the Python headers (``make setup`` installs gcc). ``--clean`` removes the
build: everything then runs interpreted.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


PACKAGES = ("ztunnel_py", "waypoint")
# what earlier builds left (the waypoint's modules alone, as their own group)
OLD = ("waypoint_native__mypyc*", "waypoint/native.json")


def _native() -> ModuleType:
    """``ztunnel_py/native.py`` by path: importing the package would already choose."""
    path = REPO / "ztunnel_py" / "native.py"
    spec = importlib.util.spec_from_file_location("_ztunnel_native", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def clean(native: ModuleType) -> None:
    """Every extension in the packages (a module dropped from ``MODULES`` included: its
    old extension would shadow the source) and mypyc's library."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for package in PACKAGES:
            for path in (REPO / package).rglob(f"*{suffix}"):
                path.unlink()
    for pattern in (f"{native.GROUP}__mypyc*", *OLD):
        for path in REPO.glob(pattern):
            path.unlink()
    native.STAMP.unlink(missing_ok=True)


def build(native: ModuleType) -> None:
    from mypyc.build import mypycify
    from setuptools import Distribution

    sources = [str(native.source(m).relative_to(REPO)) for m in native.MODULES]
    before = native.digests()
    with tempfile.TemporaryDirectory(prefix="ztunnel-native-") as tmp:
        cwd = os.getcwd()
        os.chdir(REPO)  # mypycify reads pyproject.toml's [tool.mypy] from here
        try:
            ext = mypycify(sources, group_name=native.GROUP, opt_level="3",
                           target_dir=str(Path(tmp) / "c"))
            dist = Distribution({"name": "ztunnel-native", "ext_modules": ext})
            cmd = dist.get_command_obj("build_ext")
            cmd.inplace = True  # type: ignore[attr-defined]
            cmd.build_temp = str(Path(tmp) / "temp")  # type: ignore[attr-defined]
            cmd.build_lib = str(Path(tmp) / "lib")  # type: ignore[attr-defined]
            dist.run_command("build_ext")
        finally:
            os.chdir(cwd)
    if native.digests() != before:
        clean(native)
        raise SystemExit("build_native: a source changed during the build; run it again")
    native.STAMP.write_text(json.dumps(
        {"cache_tag": sys.implementation.cache_tag, "interpreter": sys.version,
         "sources": before}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clean", action="store_true", help="remove the compiled modules")
    args = p.parse_args(argv)
    native = _native()
    if args.clean:
        clean(native)
        print("build_native: removed; everything runs interpreted")
        return 0
    reason = native.stale_reason()
    if reason is None:
        print("build_native: compiled modules are current")
        return 0
    if shutil.which(os.environ.get("CC", "gcc")) is None:
        print("build_native: no C compiler (gcc); everything runs interpreted", file=sys.stderr)
        return 1
    started = time.monotonic()
    clean(native)
    build(native)
    print(f"build_native: compiled {len(native.MODULES)} modules "
          f"({reason}) in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
