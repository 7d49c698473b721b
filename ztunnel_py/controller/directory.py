"""The directory source: multi-document YAML (``*.yaml``, ``*.yml``, recursive), watched.

``DirectoryLoader`` is the synchronous core: ``load()`` (re)reads the files that
changed and returns every object with its origin (``"rel/path.yaml#doc3"``) and
the problems met reading them. A file that stops parsing keeps its last good
objects (with a problem saying so); a deleted file takes its objects away.

``watch`` turns filesystem events (inotify, through watchfiles) into calls of
``on_change(objects, problems)``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import watchfiles
import yaml

from ztunnel_py import log
from ztunnel_py.controller.translate import KubeObject, Problem


def _log() -> Any:
    """Resolved at each use, so that ``log.configure`` (run after imports) applies."""
    return log.get("controller.directory")

SUFFIXES = (".yaml", ".yml")
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class SourceError(Exception):
    """The directory itself cannot be read."""


@dataclass
class _FileState:
    mtime_ns: int
    size: int
    objects: list[KubeObject]
    problems: list[Problem]


def parse_documents(text: str, origin: str) -> tuple[list[KubeObject], list[Problem]]:
    """Every non-empty document of ``text``; a YAML error fails the whole file."""
    try:
        docs = list(yaml.load_all(text, Loader=_Loader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        return [], [Problem(origin, "", "", where, f"YAML does not parse: {what}",
                            "fix the YAML syntax (indentation, quotes, colons)")]
    objects = [KubeObject(f"{origin}#doc{i}", d) for i, d in enumerate(docs, 1) if d is not None]
    return objects, []


class DirectoryLoader:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._files: dict[Path, _FileState] = {}
        self.generation = 0  # bumped whenever a file appears, changes or goes away

    def _paths(self) -> list[Path]:
        if not self.root.is_dir():
            raise SourceError(f"config directory {self.root} does not exist or is not a directory")
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            out += [Path(dirpath) / f for f in filenames
                    if f.endswith(SUFFIXES) and not f.startswith(".")]
        return sorted(out)

    def load(self) -> tuple[list[KubeObject], list[Problem]]:
        paths = self._paths()
        for gone in set(self._files) - set(paths):
            del self._files[gone]
            self.generation += 1
        for path in paths:
            try:
                st = path.stat()
            except FileNotFoundError:
                if self._files.pop(path, None) is not None:
                    self.generation += 1
                continue
            state = self._files.get(path)
            if state is not None and (state.mtime_ns, state.size) == (st.st_mtime_ns, st.st_size):
                continue
            self.generation += 1
            rel = path.relative_to(self.root).as_posix()
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                problems = [Problem(rel, "", "", "", f"cannot read the file: {exc}",
                                    "check its permissions and encoding (UTF-8)")]
                self._files[path] = _FileState(st.st_mtime_ns, st.st_size,
                                               state.objects if state else [], problems)
                continue
            objects, problems = parse_documents(text, rel)
            if problems and state is not None and state.objects:
                problems = [*problems, Problem(rel, "", "", "", "keeping this file's last good "
                                               f"objects ({len(state.objects)})", "",
                                               "warning")]
                objects = state.objects
            self._files[path] = _FileState(st.st_mtime_ns, st.st_size, objects, problems)
        objects_out: list[KubeObject] = []
        problems_out: list[Problem] = []
        for path in sorted(self._files):
            objects_out += self._files[path].objects
            problems_out += self._files[path].problems
        return objects_out, problems_out


def _is_yaml(_change: watchfiles.Change, path: str) -> bool:
    return path.endswith(SUFFIXES)


async def watch(
    loader: DirectoryLoader,
    on_change: Callable[[list[KubeObject], list[Problem]], None],
    *,
    debounce_ms: int = 20,
    rescan_s: float = 5.0,
    reported: int = -1,
) -> None:
    """Report the directory now, then after every change, until cancelled.

    inotify events (through watchfiles) drive it; every ``rescan_s`` without an
    event the files are re-stat'ed anyway (cheap: only changed files are read),
    which covers an edit made while the watch was being set up, and filesystems
    where inotify misses changes. ``reported``: the loader generation the caller
    has already handed on (so that an unchanged directory is not reported twice).
    """
    seen = reported

    def reload() -> None:
        nonlocal seen
        try:
            objects, problems = loader.load()
        except SourceError as exc:
            _log().error("config directory unreadable; keeping the last good model",
                         error=str(exc))
            return
        if loader.generation != seen:
            seen = loader.generation
            on_change(objects, problems)

    reload()
    # watchfiles logs every batch at INFO through stdlib logging; ours says it at debug
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    async for changes in watchfiles.awatch(
        loader.root, watch_filter=_is_yaml, debounce=debounce_ms, step=10, recursive=True,
        rust_timeout=int(rescan_s * 1000), yield_on_timeout=True,
    ):
        if changes:
            _log().debug("config directory changed", files=sorted({p for _c, p in changes})[:5])
        reload()


def load_directory(root: Path) -> tuple[list[KubeObject], list[Problem]]:
    """One-shot read (``analyze``)."""
    return DirectoryLoader(root).load()
