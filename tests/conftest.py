"""Test-wide settings: uvloop for every asyncio test, and no leaked tasks."""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio
import uvloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The data path runs on uvloop in production; so do the tests."""
    return {"uvloop": uvloop.new_event_loop}


@pytest_asyncio.fixture
async def _no_leaked_tasks() -> AsyncIterator[None]:
    before = asyncio.all_tasks()
    yield
    for _ in range(3):
        await asyncio.sleep(0)
    me = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() - before if t is not me and not t.done()]
    # A task its owner already cancelled is ending, not leaked: grpc.aio's server stop
    # returns while its per-RPC tasks are still unwinding. Give those a bounded grace.
    ending = [t for t in leaked if t.cancelling()]
    if ending:
        await asyncio.wait(ending, timeout=2.0)
        leaked = [t for t in leaked if not t.done()]
    if leaked:
        for t in leaked:
            t.cancel()
        pytest.fail(f"test leaked {len(leaked)} asyncio task(s): {leaked!r}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        fn = getattr(item, "function", None)
        if fn is not None and inspect.iscoroutinefunction(fn):
            item.fixturenames.insert(0, "_no_leaked_tasks")  # type: ignore[attr-defined]


def is_root() -> bool:
    return os.geteuid() == 0


def require_root() -> None:
    """Skip loudly (never silently pass) where root is truly absent."""
    if not is_root():
        msg = "SKIPPED LOUDLY: needs root for network namespaces / eBPF (CI runs as root)"
        if os.environ.get("CI"):
            pytest.fail("CI must run as root: " + msg)
        pytest.skip(msg)
