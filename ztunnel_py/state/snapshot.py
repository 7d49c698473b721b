"""The agent's immutable view of the mesh, with indexes for the data path.

A ``Snapshot`` is built once per config version and swapped whole
(``StateStore.swap``); it is never mutated. Lookups the data path needs on
every connection are dict lookups on indexes computed at build time.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

from ztunnel_py.state.model import AuthorizationPolicy, PeerAuthentication, Service, Workload


@dataclass(frozen=True)
class Snapshot:
    version: str = ""
    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    authorization_policies: tuple[AuthorizationPolicy, ...] = ()
    peer_authentications: tuple[PeerAuthentication, ...] = ()
    # L7 routing objects (VirtualService, DestinationRule, Gateway, HTTPRoute): model
    # types from ztunnel_py.state.routing, consumed by waypoints.
    routing: tuple[Any, ...] = ()
    root_namespace: str = "istio-system"

    # indexes, derived in __post_init__
    by_uid: dict[str, Workload] = field(init=False, repr=False, compare=False)
    by_ip: dict[str, Workload] = field(init=False, repr=False, compare=False)
    by_vip_port: dict[tuple[str, int], Service] = field(init=False, repr=False, compare=False)
    by_vip: dict[str, Service] = field(init=False, repr=False, compare=False)
    by_service_key: dict[str, Service] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_uid = {w.uid: w for w in self.workloads}
        by_ip: dict[str, Workload] = {}
        for w in self.workloads:
            for ip in w.ips:
                by_ip[ip] = w
        by_vip_port: dict[tuple[str, int], Service] = {}
        by_vip: dict[str, Service] = {}
        for s in self.services:
            for vip in s.vips:
                by_vip[vip] = s
                for p in s.ports:
                    by_vip_port[(vip, p.port)] = s
        object.__setattr__(self, "by_uid", by_uid)
        object.__setattr__(self, "by_ip", by_ip)
        object.__setattr__(self, "by_vip_port", by_vip_port)
        object.__setattr__(self, "by_vip", by_vip)
        object.__setattr__(self, "by_service_key", {s.key: s for s in self.services})

    def derive(
        self,
        *,
        version: str,
        root_namespace: str,
        workloads: tuple[Workload, ...],
        services: tuple[Service, ...],
        authorization_policies: tuple[AuthorizationPolicy, ...],
        peer_authentications: tuple[PeerAuthentication, ...],
        routing: tuple[Any, ...],
        gone_workloads: Iterable[Workload] = (),
        new_workloads: Iterable[Workload] = (),
        gone_services: Iterable[Service] = (),
        new_services: Iterable[Service] = (),
    ) -> Snapshot:
        """The next snapshot, its indexes patched from this one's instead of rebuilt.

        ``gone_*`` are the objects of this snapshot that were removed or replaced,
        ``new_*`` those added or replacing them; the tuples are the next snapshot's
        whole contents. A delta touching a few objects of a large mesh costs a few
        dict copies (C speed) instead of a Python loop over every workload. The
        result equals ``Snapshot(...)`` built from scratch (tested).
        """
        derived = object.__new__(Snapshot)
        init: dict[str, Any] = {
            "version": version, "workloads": workloads, "services": services,
            "authorization_policies": authorization_policies,
            "peer_authentications": peer_authentications, "routing": routing,
            "root_namespace": root_namespace,
        }
        derived_fields = {f.name for f in fields(Snapshot) if not f.init}
        if derived_fields != _PATCHED_INDEXES or set(init) != {
            f.name for f in fields(Snapshot) if f.init
        }:
            return Snapshot(**init)  # someone added a field: be correct rather than fast
        for name, value in init.items():
            object.__setattr__(derived, name, value)
        by_uid, by_ip = dict(self.by_uid), dict(self.by_ip)
        for w in gone_workloads:
            if by_uid.get(w.uid) is w:
                del by_uid[w.uid]
            for ip in w.ips:
                if by_ip.get(ip) is w:
                    del by_ip[ip]
        for w in new_workloads:
            by_uid[w.uid] = w
            for ip in w.ips:
                by_ip[ip] = w
        by_vip_port, by_vip = dict(self.by_vip_port), dict(self.by_vip)
        by_service_key = dict(self.by_service_key)
        for s in gone_services:
            if by_service_key.get(s.key) is s:
                del by_service_key[s.key]
            for vip in s.vips:
                if by_vip.get(vip) is s:
                    del by_vip[vip]
                for p in s.ports:
                    if by_vip_port.get((vip, p.port)) is s:
                        del by_vip_port[(vip, p.port)]
        for s in new_services:
            by_service_key[s.key] = s
            for vip in s.vips:
                by_vip[vip] = s
                for p in s.ports:
                    by_vip_port[(vip, p.port)] = s
        object.__setattr__(derived, "by_uid", by_uid)
        object.__setattr__(derived, "by_ip", by_ip)
        object.__setattr__(derived, "by_vip_port", by_vip_port)
        object.__setattr__(derived, "by_vip", by_vip)
        object.__setattr__(derived, "by_service_key", by_service_key)
        return derived

    def with_version(self, version: str) -> Snapshot:
        """The same snapshot under another version, sharing its indexes (no rebuild)."""
        out = copy.copy(self)
        object.__setattr__(out, "version", version)
        return out

    def workloads_on(self, node: str) -> Iterable[Workload]:
        return (w for w in self.workloads if w.node == node)

    def workload_by_ip(self, ip: str) -> Workload | None:
        return self.by_ip.get(ip)

    def service_for(self, ip: str, port: int) -> Service | None:
        return self.by_vip_port.get((ip, port))


_last_full_collection = time.monotonic()


def settle_heap(full_every_s: float = 600.0) -> None:
    """Move the live object graph out of the cyclic garbage collector's way.

    A mesh of ten thousand workloads is a million long-lived Python objects; a
    full (generation 2) collection walks all of them and stalls the event loop
    for a few hundred milliseconds at random. Processes that hold snapshots call
    this after swapping one in: ``gc.freeze()`` parks what is alive now in the
    permanent generation (reference counting still frees it: the model is
    acyclic), so collections only walk what is new. At most every
    ``full_every_s`` seconds one real full collection reclaims any reference
    cycles that were parked (a bounded, rare pause instead of frequent ones).
    """
    global _last_full_collection
    now = time.monotonic()
    if now - _last_full_collection >= full_every_s:
        _last_full_collection = now
        gc.unfreeze()
        gc.collect()
    gc.freeze()


@contextlib.contextmanager
def pause_gc() -> Iterator[None]:
    """No cyclic garbage collection inside (reference counting goes on).

    For building a large acyclic object graph that all stays alive (a full
    snapshot): every collection triggered by those allocations would walk the new
    objects once more and find nothing to free. The previous state is restored.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# The indexes ``derive`` knows how to patch; a new index makes it fall back to a full build.
_PATCHED_INDEXES = frozenset({"by_uid", "by_ip", "by_vip_port", "by_vip", "by_service_key"})

Listener = Callable[[Snapshot, Snapshot], None]


class StateStore:
    """Holds the current snapshot; ``swap`` replaces it atomically and tells listeners."""

    def __init__(self, initial: Snapshot | None = None) -> None:
        self._current = initial or Snapshot()
        self._listeners: list[Listener] = []

    @property
    def current(self) -> Snapshot:
        return self._current

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def swap(self, new: Snapshot) -> Snapshot:
        old, self._current = self._current, new
        for listener in self._listeners:
            listener(old, new)
        return old
