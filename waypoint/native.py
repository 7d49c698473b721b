"""The waypoint's per-request modules, compiled by mypyc or interpreted.

``scripts/build_native.py`` (``make native``; ``make setup`` runs it) compiles
``MODULES`` from their Python source, unchanged, into C extensions beside the
sources (mypyc: the typed code ``mypy --strict`` checks becomes C calls and
native attribute access; about half the Python CPU per request), and writes
``STAMP``: the SHA-256 of each source it compiled.

Importing ``waypoint`` calls ``select`` once per process, which decides for all
of them together:

- compiled, when the stamp matches every source as it is now;
- interpreted, when ``ZTUNNEL_PY_PURE=1``, when nothing was built, or when the
  build is stale (a source edited since: its old extension would otherwise be
  imported instead of the edited code; said once on stderr).

All or none: compiled modules call each other directly, so one interpreted
module among compiled ones would run as two copies with two sets of globals.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

PACKAGE = "waypoint"
HERE = Path(__file__).resolve().parent
# What every request runs through (HTTP/1.1, the decision, endpoints, telemetry). http2,
# mesh and routes stay interpreted: per stream or per configuration, not per request.
MODULES = ("authz", "cluster", "engine", "http1", "pipe", "proxy", "request", "server",
           "telemetry", "upstream")
GROUP = "waypoint_native"  # mypyc's shared library: <repo>/waypoint_native__mypyc*.so
STAMP = HERE / "native.json"
PURE_ENV = "ZTUNNEL_PY_PURE"

compiled = False  # set by ``select``
_decided = False


def digests() -> dict[str, str]:
    return {m: hashlib.sha256((HERE / f"{m}.py").read_bytes()).hexdigest() for m in MODULES}


def built() -> list[Path]:
    """The compiled extensions present beside the sources."""
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    return [HERE / f"{m}{s}" for m in MODULES for s in suffixes if (HERE / f"{m}{s}").exists()]


def stale_reason() -> str | None:
    """None when the compiled modules are there and match their sources; else why not."""
    if len(built()) < len(MODULES):
        return "not every module is compiled"
    try:
        stamp = json.loads(STAMP.read_text())
    except (OSError, ValueError):
        return f"no readable {STAMP.name}"
    if stamp.get("cache_tag") != sys.implementation.cache_tag:
        return f"built for {stamp.get('cache_tag')}, running {sys.implementation.cache_tag}"
    sources = stamp.get("sources", {})
    if set(sources) != set(MODULES):  # built as another group: its library calls those
        return f"built for modules {sorted(sources)}"
    changed = sorted(m for m, d in digests().items() if sources[m] != d)
    if changed:
        return f"sources changed since the build: {', '.join(changed)}"
    return None


class _Interpreted(importlib.abc.MetaPathFinder):
    """Finds ``MODULES`` as their ``.py`` sources, ahead of the extensions beside them."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        pkg, _, name = fullname.rpartition(".")
        if pkg != PACKAGE or name not in MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, HERE / f"{name}.py")


def select() -> bool:
    """Decide (once) whether this process runs the compiled modules; returns it."""
    global compiled, _decided
    if _decided:
        return compiled
    _decided = True
    reason = "ZTUNNEL_PY_PURE=1" if os.environ.get(PURE_ENV) == "1" else stale_reason()
    if reason is None:
        compiled = True
        return True
    if built() and os.environ.get(PURE_ENV) != "1":
        print(f"waypoint: running interpreted, the compiled modules are stale ({reason}); "
              "'make native' rebuilds them", file=sys.stderr)
    sys.meta_path.insert(0, _Interpreted())
    compiled = False
    return False
