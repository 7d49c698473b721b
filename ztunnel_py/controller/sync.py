"""From source objects to published versions: debounce, translate, publish.

Sources (the directory watcher, the Kubernetes watcher, a benchmark) call
``submit(objects, problems)`` with the whole current object set; ``run`` waits
``debounce_s`` after the first change so that a burst becomes one version,
translates (keeping the last good version of any object whose new version is
refused) and hands the snapshot to ``publish``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from ztunnel_py import log
from ztunnel_py.controller.translate import (
    KubeObject,
    ObjectId,
    Problem,
    Translation,
    Translator,
)
from ztunnel_py.state.snapshot import Snapshot


def _log() -> Any:
    """Resolved at each use, so that ``log.configure`` (run after imports) applies."""
    return log.get("controller.sync")


class ModelSync:
    def __init__(
        self,
        publish: Callable[[Snapshot], str | None],
        *,
        trust_domain: str,
        root_namespace: str,
        debounce_s: float,
    ) -> None:
        self._publish = publish
        self._debounce_s = debounce_s
        self._pending: tuple[list[KubeObject], list[Problem]] | None = None
        self._changed = asyncio.Event()
        self._translator = Translator(trust_domain=trust_domain, root_namespace=root_namespace)
        self._last_good: dict[ObjectId, KubeObject] = {}
        self._reported: set[Problem] = set()
        self.translation: Translation | None = None
        self.source_problems: list[Problem] = []
        self.version: str | None = None
        self.published = asyncio.Event()
        self.last_translate_s = 0.0

    def submit(self, objects: Sequence[KubeObject], problems: Sequence[Problem] = ()) -> None:
        self._pending = (list(objects), list(problems))
        self._changed.set()

    @property
    def problems(self) -> list[Problem]:
        translated = self.translation.problems if self.translation else []
        return [*self.source_problems, *translated]

    async def run(self) -> None:
        while True:
            await self._changed.wait()
            await asyncio.sleep(self._debounce_s)
            self._changed.clear()
            if self._pending is None:
                continue
            objects, source_problems = self._pending
            self._pending = None
            self.rebuild(objects, source_problems)

    def rebuild(self, objects: list[KubeObject], source_problems: list[Problem]) -> str | None:
        start = time.perf_counter()
        translation = self._translator.translate_keeping_last_good(objects, self._last_good)
        self.last_translate_s = time.perf_counter() - start
        self._last_good = dict(translation.accepted)
        self.translation = translation
        self.source_problems = source_problems
        self._report()
        version = self._publish(translation.snapshot)
        if version != self.version:
            _log().info("model published", version=version, workloads=len(
                translation.snapshot.workloads), services=len(translation.snapshot.services),
                problems=len(self.problems), translate_ms=round(self.last_translate_s * 1e3, 1))
        self.version = version
        self.published.set()
        return version

    def _report(self) -> None:
        current = set(self.problems)
        for p in sorted(current - self._reported, key=str):
            if p.severity == "error":
                _log().error("configuration problem", problem=str(p))
            else:
                _log().warning("configuration problem", problem=str(p))
        self._reported = current
