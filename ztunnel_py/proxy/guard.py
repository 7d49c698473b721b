"""Open relays, each with the policy ``Connection`` that authorized it.

A policy change applies to existing connections too: after a snapshot swap
the agent re-evaluates the ``Connection`` of every open relay and aborts the
ones the new policy denies (``Proxy.revoke``).
"""

from __future__ import annotations

from collections.abc import Iterator

from ztunnel_py.policy.types import Connection
from ztunnel_py.proxy.relay import Relay


class RelaySet:
    """A set of open relays (iteration, ``add``/``discard``) remembering their authorization."""

    def __init__(self) -> None:
        self._relays: dict[Relay, Connection | None] = {}

    def add(self, relay: Relay, authorized: Connection | None = None) -> None:
        self._relays[relay] = authorized

    def discard(self, relay: Relay) -> None:
        self._relays.pop(relay, None)

    def authorized(self) -> list[tuple[Relay, Connection]]:
        return [(r, c) for r, c in self._relays.items() if c is not None]

    def __iter__(self) -> Iterator[Relay]:
        return iter(list(self._relays))

    def __len__(self) -> int:
        return len(self._relays)

    def __contains__(self, relay: object) -> bool:
        return relay in self._relays
