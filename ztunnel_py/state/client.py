"""The agent's side of the configuration stream.

``UpdateApplier`` is the sans-IO core: it checks one update against what the
agent holds (codec version, delta base, every resource decodes, no dangling
references) and returns the next snapshot or raises ``UpdateRejected``; a
refused update leaves the current snapshot untouched.

``ConfigClient`` is the asyncio shell: it opens ``MeshConfig.Stream`` on a
channel the caller built (TLS and credentials are the caller's business),
sends a hello, applies each update to the ``StateStore``, ACKs or NACKs it, and
reconnects with exponential backoff and full jitter while the store keeps
serving the last good snapshot.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from ztunnel_py import log
from ztunnel_py.proto_gen import mesh_pb2, mesh_pb2_grpc
from ztunnel_py.state import routing
from ztunnel_py.state.codec import (
    CODEC_VERSION,
    KINDS,
    CodecError,
    ResourceKey,
    decode_resource,
)
from ztunnel_py.state.model import Service, Workload
from ztunnel_py.state.snapshot import Snapshot, StateStore, pause_gc, settle_heap


def _log() -> Any:
    """Resolved at each use, so that ``log.configure`` (run after imports) applies."""
    return log.get("state.client")

# Full snapshots of large meshes exceed gRPC's 4 MiB default; channels and servers
# on both ends of this stream should use these options.
GRPC_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # The client paces its own reconnects (backoff with jitter). gRPC's channel-level
    # backoff grows to 120 s by default: after a long controller outage the channel
    # would sit out its backoff while the controller is already back.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)

# The node the caller claims, next to its credential (ztunnel_py.identity.manager.NODE_METADATA;
# the state layer sits below identity, so the name is repeated here).
NODE_METADATA = "x-ztunnel-node"
# The controller's initial metadata once it has taken the stream (credential and hello
# checked): until then, or when it refuses, the agent is not connected.
ACCEPTED_METADATA = "x-ztunnel-accepted"

_NODE_KINDS = {"agent": mesh_pb2.NODE_KIND_AGENT, "waypoint": mesh_pb2.NODE_KIND_WAYPOINT}


class UpdateRejected(Exception):
    """An update the agent will not apply; the message goes back in the NACK."""


@dataclass(frozen=True)
class WireUpdate:
    """The fields of a ``mesh_pb2.Update``, without protobuf (tests build these directly)."""

    version: str
    base_version: str
    codec_version: int
    root_namespace: str
    upserts: tuple[tuple[str, str, bytes], ...]
    removals: tuple[ResourceKey, ...]

    @classmethod
    def from_proto(cls, msg: Any) -> WireUpdate:
        return cls(
            version=msg.version,
            base_version=msg.base_version,
            codec_version=msg.codec_version,
            root_namespace=msg.root_namespace,
            upserts=tuple([(r.kind, r.key, r.body) for r in msg.upserts]),
            removals=tuple([(r.kind, r.key) for r in msg.removals]),
        )


def check_references(
    objects: Iterable[Any],
    *,
    workloads: Mapping[str, Workload] | None = None,
    waypoints: set[tuple[str, str]] | None = None,
) -> None:
    """Raise ``UpdateRejected`` if a service endpoint or waypoint among ``objects`` names
    nothing (in ``workloads`` / ``waypoints``, else among ``objects`` themselves)."""
    objects = list(objects)
    if workloads is None:
        workloads = {o.uid: o for o in objects if isinstance(o, Workload)}
    if waypoints is None:
        waypoints = _waypoints(objects)
    _check_services([o for o in objects if isinstance(o, Service)], workloads, waypoints)
    _check_workloads([o for o in objects if isinstance(o, Workload)], waypoints)


def _check_services(
    services: Iterable[Service], workloads: Mapping[str, Workload], waypoints: set[tuple[str, str]]
) -> None:
    for s in services:
        for ep in s.endpoints:
            if ep.workload_uid not in workloads:
                raise UpdateRejected(
                    f"service {s.key}: endpoint {ep.address} names workload "
                    f"{ep.workload_uid!r}, which the update does not contain"
                )
        if s.waypoint and (s.waypoint.namespace, s.waypoint.name) not in waypoints:
            raise UpdateRejected(f"service {s.key}: waypoint {s.waypoint} does not exist")


def _check_workloads(workloads: Iterable[Workload], waypoints: set[tuple[str, str]]) -> None:
    for w in workloads:
        if w.waypoint and (w.waypoint.namespace, w.waypoint.name) not in waypoints:
            raise UpdateRejected(f"workload {w.uid}: waypoint {w.waypoint} does not exist")


def _waypoints(objects: Iterable[Any]) -> set[tuple[str, str]]:
    return {(o.namespace, o.name) for o in objects
            if isinstance(o, routing.KubernetesGateway) and o.is_waypoint}


_GROUPS = ("workload", "service", "authorization_policy", "peer_authentication")


class UpdateApplier:
    """What the agent holds, by kind and key; ``apply`` computes the next snapshot.

    A delta is validated against what it touches (a full re-check only when a
    workload or a waypoint goes away) and turned into the next snapshot by
    patching the current one's indexes (``Snapshot.derive``), so that one pod
    change in a mesh of ten thousand costs dict copies, not a rebuild.
    """

    def __init__(self, *, settle: bool = False) -> None:
        """``settle``: after a full snapshot, park the live heap out of the cyclic
        collector's way (``settle_heap``), as a long-running agent wants."""
        self._settle = settle
        self.version = ""
        self.snapshot = Snapshot()
        # kind -> key -> object ("routing" gathers every other kind, keyed by (kind, key))
        self._groups: dict[str, dict[Any, Any]] = {g: {} for g in (*_GROUPS, "routing")}

    def apply(self, update: WireUpdate) -> Snapshot:
        # A full snapshot is ~10^5 new objects, all alive at the end: collecting while
        # they are made would only walk them again and again (pause_gc).
        with pause_gc():
            snapshot = self._apply(update)
            if self._settle and not update.base_version:
                settle_heap()  # before collection resumes: nothing walks the new objects
            return snapshot

    def _apply(self, update: WireUpdate) -> Snapshot:
        if update.codec_version != CODEC_VERSION:
            raise UpdateRejected(
                f"codec version {update.codec_version} not supported (this agent speaks "
                f"{CODEC_VERSION}); upgrade the agent or the controller"
            )
        full = not update.base_version
        if not full and update.base_version != self.version:
            raise UpdateRejected(
                f"delta applies to version {update.base_version!r} but the agent holds "
                f"{self.version!r}"
            )
        groups = {g: ({} if full else dict(d)) for g, d in self._groups.items()}
        gone: list[Any] = []
        for kind, key in update.removals:
            old = groups[_group(kind)].pop(_slot(kind, key), None)
            if old is not None:
                gone.append(old)
        new: list[Any] = []
        if len({(kind, key) for kind, key, _ in update.upserts}) != len(update.upserts):
            seen: set[ResourceKey] = set()
            for kind, key, _ in update.upserts:
                if (kind, key) in seen:
                    raise UpdateRejected(f"{kind} {key} appears twice in one update")
                seen.add((kind, key))
        for kind, key, body in update.upserts:
            try:
                obj = decode_resource(kind, key, body)
            except CodecError as exc:
                raise UpdateRejected(str(exc)) from None
            group, by_kind = _WHERE[kind]  # decode_resource refused unknown kinds
            slot = (kind, key) if by_kind else key
            held = groups[group]
            old = held.get(slot)
            if old is not None:
                gone.append(old)
            held[slot] = obj
            new.append(obj)
        waypoints = _waypoints(groups["routing"].values())
        # a workload or waypoint that went away may leave references dangling anywhere
        lost = any(
            (isinstance(o, Workload) and o.uid not in groups["workload"])
            or (isinstance(o, routing.KubernetesGateway) and o.is_waypoint
                and (o.namespace, o.name) not in waypoints)
            for o in gone
        )
        if full or lost:  # only services and workloads refer to anything
            _check_services(groups["service"].values(), groups["workload"], waypoints)
            _check_workloads(groups["workload"].values(), waypoints)
        else:
            check_references(new, workloads=groups["workload"], waypoints=waypoints)
        contents: dict[str, Any] = {
            "version": update.version,
            "root_namespace": update.root_namespace,
            "workloads": tuple(groups["workload"].values()),
            "services": tuple(groups["service"].values()),
            "authorization_policies": tuple(groups["authorization_policy"].values()),
            "peer_authentications": tuple(groups["peer_authentication"].values()),
            "routing": tuple(groups["routing"].values()),
        }
        if full:
            snapshot = Snapshot(**contents)
        else:
            snapshot = self.snapshot.derive(
                **contents,
                gone_workloads=[o for o in gone if isinstance(o, Workload)],
                new_workloads=[o for o in new if isinstance(o, Workload)],
                gone_services=[o for o in gone if isinstance(o, Service)],
                new_services=[o for o in new if isinstance(o, Service)],
            )
        self._groups = groups
        self.version = update.version
        self.snapshot = snapshot
        return snapshot


# kind -> (its group in UpdateApplier._groups, keyed by (kind, key) rather than key)
_WHERE = {k: ((k, False) if k in _GROUPS else ("routing", True)) for k in KINDS}


def _group(kind: str) -> str:
    if kind not in KINDS:
        raise UpdateRejected(f"unknown resource kind {kind!r} (codec version {CODEC_VERSION})")
    return kind if kind in _GROUPS else "routing"


def _slot(kind: str, key: str) -> Any:
    return key if kind in _GROUPS else (kind, key)


@dataclass
class ClientStatus:
    connected: bool = False
    version: str = ""
    last_error: str = ""
    last_nack: str = ""
    reconnects: int = 0


class ConfigClient:
    """Keeps ``store`` in step with the controller, forever (until cancelled)."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        store: StateStore,
        *,
        node: str,
        kind: str = "agent",
        token: Callable[[], str] | str | None = None,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 30.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if kind not in _NODE_KINDS:
            raise ValueError(f"kind={kind!r}: expected agent or waypoint")
        self._stub = mesh_pb2_grpc.MeshConfigStub(channel)  # type: ignore[no-untyped-call]
        self._store = store
        self._node = node
        self._kind = kind
        self._token = token
        self._backoff_initial = backoff_initial_s
        self._backoff_max = backoff_max_s
        self._rng = rng
        self._applier = UpdateApplier(settle=True)
        self.status = ClientStatus()
        self._synced = asyncio.Event()

    async def wait_synced(self) -> None:
        """Until the first update has been applied."""
        await self._synced.wait()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        token = self._token() if callable(self._token) else self._token
        node = ((NODE_METADATA, self._node),)
        return ((("authorization", f"Bearer {token}"),) if token else ()) + node

    async def run(self) -> None:
        delay = self._backoff_initial
        while True:
            progressed = False
            try:
                progressed = await self._session()
                self.status.last_error = "controller closed the stream"
            except grpc.aio.AioRpcError as exc:
                self.status.last_error = _describe(exc)
            self.status.connected = False
            if progressed:
                delay = self._backoff_initial
            sleep = self._rng() * delay  # full jitter
            _log().warning("config stream down; keeping the last good state",
                         error=self.status.last_error, version=self.status.version,
                         retry_in_s=round(sleep, 3))
            self.status.reconnects += 1
            await asyncio.sleep(sleep)
            delay = min(self._backoff_max, delay * 2)

    async def _session(self) -> bool:
        """One stream, until it ends; True if at least one update arrived."""
        progressed = False
        call = self._stub.Stream(metadata=self._metadata())
        try:
            await call.write(mesh_pb2.AgentMessage(hello=mesh_pb2.Hello(
                node=self._node, kind=_NODE_KINDS[self._kind],
                last_version=self._applier.version, codec_version=CODEC_VERSION,
            )))
            # connected once the controller says it took the stream: a refusal (bad
            # credential, another node's name, a codec mismatch) ends it without that
            metadata = await call.initial_metadata()
            if metadata is not None and ACCEPTED_METADATA in metadata:
                self.status.connected = True
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:  # type: ignore[attr-defined]
                    return progressed
                if not msg.HasField("update"):
                    continue
                self.status.connected = True  # (a controller that predates the metadata)
                progressed = True
                reply = self._handle(WireUpdate.from_proto(msg.update))
                await call.write(reply)
        finally:
            call.cancel()

    def _handle(self, update: WireUpdate) -> Any:
        try:
            snapshot = self._applier.apply(update)
        except UpdateRejected as exc:
            self.status.last_nack = f"{update.version}: {exc}"
            _log().error("refused config update; keeping the last good state",
                       version=update.version, error=str(exc), holding=self._applier.version)
            return mesh_pb2.AgentMessage(nack=mesh_pb2.Nack(version=update.version,
                                                            error=str(exc)))
        self._store.swap(snapshot)
        self.status.version = update.version
        self._synced.set()
        _log().debug("applied config update", version=update.version,
                   full=not update.base_version, upserts=len(update.upserts),
                   removals=len(update.removals))
        return mesh_pb2.AgentMessage(ack=mesh_pb2.Ack(version=update.version))


def _describe(exc: grpc.aio.AioRpcError) -> str:
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"controller unreachable ({exc.details()}); is it running, and the address right?"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"controller refused our credential ({exc.details()}); check the token file"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return f"controller denied access ({exc.details()})"
    return f"{code.name}: {exc.details()}"
