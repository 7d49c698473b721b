"""The data path's hot modules, compiled by mypyc or interpreted.

``scripts/build_native.py`` (``make native``; ``make setup`` runs it) compiles
``MODULES`` from their Python source, unchanged, into C extensions beside the
sources (mypyc: the typed code ``mypy --strict`` checks becomes C calls and
native attribute access), and writes ``STAMP``: the SHA-256 of each source it
compiled. Two sets in one build: the agent's per-frame and per-connection
modules (HBONE, the relay, the outbound path, the pool, the connection record and
its access-log line: 13 % fewer user-space instructions per request, 19 % per new
connection, ``bench.hbone --instructions``) and the waypoint's per-request modules
(about half its Python CPU per request). One build because they meet: the
waypoint's stream pipe is an HBONE ``Leg``.

Importing ``ztunnel_py`` calls ``select`` once per process, which decides for
all of them together:

- compiled, when the stamp matches every source as it is now and the interpreter
  that runs (its ``sys.version``: version and build, as mypyc's C uses CPython's
  internals);
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
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent  # where the packages are
# The agent: what every HBONE frame and every connection runs through. inbound stays
# interpreted (its tests replace a method of an instance, which a compiled class forbids;
# little of a connection's cost is its own); sockets too (an OSError subclass).
AGENT = ("ztunnel_py.hbone.aio", "ztunnel_py.hbone.core", "ztunnel_py.proxy.guard",
         "ztunnel_py.proxy.outbound", "ztunnel_py.proxy.pool", "ztunnel_py.proxy.relay",
         "ztunnel_py.telemetry.accesslog", "ztunnel_py.telemetry.connection")
# The waypoint: what every request runs through (HTTP/1.1, the decision, endpoints,
# telemetry). http2, mesh and routes stay interpreted: per stream or per configuration.
WAYPOINT = tuple(f"waypoint.{m}" for m in (
    "authz", "cluster", "engine", "http1", "pipe", "proxy", "request", "server", "telemetry",
    "upstream"))
MODULES = AGENT + WAYPOINT
GROUP = "ztunnel_native"  # mypyc's shared library: <repo>/ztunnel_native__mypyc*.so
STAMP = ROOT / "ztunnel_py" / "native.json"
PURE_ENV = "ZTUNNEL_PY_PURE"

compiled = False  # set by ``select``
_decided = False


def source(module: str) -> Path:
    return ROOT / f"{module.replace('.', '/')}.py"


def digests() -> dict[str, str]:
    return {m: hashlib.sha256(source(m).read_bytes()).hexdigest() for m in MODULES}


def built() -> list[Path]:
    """The compiled extensions present beside the sources."""
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    found = (source(m).with_suffix(s) for m in MODULES for s in suffixes)
    return [path for path in found if path.exists()]


def stale_reason() -> str | None:
    """None when the compiled modules are there and match their sources; else why not."""
    if len(built()) < len(MODULES):
        return "not every module is compiled"
    if not any(ROOT.glob(f"{GROUP}__mypyc*")):
        return f"no {GROUP}__mypyc library beside the packages"
    try:
        stamp = json.loads(STAMP.read_text())
    except (OSError, ValueError):
        return f"no readable {STAMP.name}"
    if stamp.get("cache_tag") != sys.implementation.cache_tag:
        return f"built for {stamp.get('cache_tag')}, running {sys.implementation.cache_tag}"
    if stamp.get("interpreter") != sys.version:  # mypyc's C uses CPython's internals
        return f"built by Python {stamp.get('interpreter')!r}, running {sys.version!r}"
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
        if fullname not in MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, source(fullname))


def describe() -> str:
    """How a process started now runs these modules, in a few words (the benchmarks'
    headers)."""
    reason = f"{PURE_ENV}=1" if os.environ.get(PURE_ENV) == "1" else stale_reason()
    how = "mypyc-compiled" if reason is None else f"interpreted: {reason}"
    return f"{how}; Python {platform.python_version()} at {os.path.realpath(sys.executable)}"


def select() -> bool:
    """Decide (once) whether this process runs the compiled modules; returns it."""
    global compiled, _decided
    if _decided:
        return compiled
    _decided = True
    reason = "ZTUNNEL_PY_PURE=1" if os.environ.get(PURE_ENV) == "1" else stale_reason()
    if reason is None:
        # The extensions import mypyc's library as a top-level module, from beside the
        # packages: on the path already in an installed tree (site-packages), not in an
        # editable install run from elsewhere (its finder maps the packages alone)
        if str(ROOT) not in sys.path:
            sys.path.append(str(ROOT))
        compiled = True
        return True
    if built() and os.environ.get(PURE_ENV) != "1":
        print(f"ztunnel-py: running interpreted, the compiled modules are stale ({reason}); "
              "'make native' rebuilds them", file=sys.stderr)
    sys.meta_path.insert(0, _Interpreted())
    compiled = False
    return False
