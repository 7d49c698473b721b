"""Sans-IO bookkeeping of the configuration push: versions, per-agent ACK state,
and what to send to whom.

The gRPC server (``server.py``) feeds events in (``connect``, ``ack``, ``nack``,
``disconnect``, ``publish``) and writes out the ``Outgoing`` updates it gets
back; unit tests drive the same calls without sockets.

Rules:

* a new model is published as a new version only if some resource changed;
  resources are encoded once per version (and reused across versions while the
  object is unchanged), and a delta between two versions is computed once per
  node kind and shared by every agent at the same base;
* each agent has at most one update in flight; when it ACKs and a newer version
  exists it gets the delta from what it ACKed;
* a NACKed delta is followed at once by a full snapshot of the latest version
  (the agent may have diverged); a NACKed full snapshot waits for the next
  version (sending the same content again would fail the same way);
* an agent that reconnects naming a version still in the history gets a delta
  from it; otherwise a full snapshot.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ztunnel_py.state.codec import KINDS, ResourceKey, encode_resource, resources
from ztunnel_py.state.snapshot import Snapshot

NodeKind = Literal["agent", "waypoint"]


@dataclass(frozen=True)
class Published:
    version: str
    root_namespace: str
    resources: Mapping[ResourceKey, bytes]
    snapshot: Snapshot


@dataclass(frozen=True)
class Outgoing:
    """One update for one agent (the server turns it into a protobuf message once)."""

    version: str
    base_version: str  # "" = full snapshot
    root_namespace: str
    upserts: tuple[tuple[str, str, bytes], ...]
    removals: tuple[ResourceKey, ...]
    node_kind: NodeKind

    @property
    def full(self) -> bool:
        return not self.base_version

    @property
    def cache_key(self) -> tuple[str, str, str]:
        return (self.base_version, self.version, self.node_kind)


@dataclass
class AgentState:
    stream_id: int
    node: str
    kind: NodeKind
    peer: str = ""
    connected_at: float = field(default_factory=time.time)
    acked_version: str = ""
    in_flight: Outgoing | None = None
    last_nack: tuple[str, str] | None = None  # (version, error)
    nacks: int = 0
    acks: int = 0
    # a NACKed full snapshot of this version: do not resend it
    refused_version: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "kind": self.kind,
            "peer": self.peer,
            "connected_at": self.connected_at,
            "acked_version": self.acked_version,
            "in_flight_version": self.in_flight.version if self.in_flight else "",
            "acks": self.acks,
            "nacks": self.nacks,
            "last_nack": (
                {"version": self.last_nack[0], "error": self.last_nack[1]}
                if self.last_nack else None
            ),
        }


def _wanted(kind_name: str, node_kind: NodeKind) -> bool:
    return node_kind == "waypoint" or KINDS[kind_name].for_agents


class PushCore:
    def __init__(self, *, epoch: str | None = None, history: int = 16) -> None:
        # Versions are "<epoch>-<n>": unique across controller restarts, so an agent
        # that reconnects to a new controller never mistakes an old version for a new one.
        self._epoch = epoch if epoch is not None else format(int(time.time() * 1000), "x")
        self._counter = 0
        self._history: deque[Published] = deque(maxlen=history)
        self._by_version: dict[str, Published] = {}
        self._agents: dict[int, AgentState] = {}
        self._deltas: OrderedDict[tuple[str, str, str], Outgoing] = OrderedDict()
        self._encoded: dict[int, tuple[Any, bytes]] = {}

    # -- model side ------------------------------------------------------------------

    @property
    def latest(self) -> Published | None:
        return self._history[-1] if self._history else None

    def publish(self, snapshot: Snapshot) -> list[tuple[int, Outgoing]]:
        """Make ``snapshot`` the latest version (if anything changed); what to send now."""
        objs = resources(snapshot)
        # The translator hands unchanged objects back as the same Python objects:
        # encode by identity (no hashing of deep dataclasses), reuse the bytes.
        encoded: dict[int, tuple[Any, bytes]] = {}
        out: dict[ResourceKey, bytes] = {}
        for key, obj in objs.items():
            hit = self._encoded.get(id(obj))
            body = hit[1] if hit is not None and hit[0] is obj else encode_resource(obj)
            encoded[id(obj)] = (obj, body)
            out[key] = body
        self._encoded = encoded
        latest = self.latest
        if latest is not None and latest.resources == out \
                and latest.root_namespace == snapshot.root_namespace:
            return []
        self._counter += 1
        version = f"{self._epoch}-{self._counter}"
        published = Published(version, snapshot.root_namespace, out,
                              snapshot.with_version(version))
        if len(self._history) == self._history.maxlen:
            self._by_version.pop(self._history[0].version, None)
        self._history.append(published)
        self._by_version[version] = published
        sends: list[tuple[int, Outgoing]] = []
        for agent in self._agents.values():
            if agent.in_flight is None:
                update = self._next_for(agent)
                if update is not None:
                    sends.append((agent.stream_id, update))
        return sends

    # -- agent side ------------------------------------------------------------------

    def connect(
        self, stream_id: int, node: str, kind: NodeKind, last_version: str = "", peer: str = ""
    ) -> Outgoing | None:
        agent = AgentState(stream_id, node, kind, peer)
        self._agents[stream_id] = agent
        latest = self.latest
        if last_version and latest is not None and last_version == latest.version:
            agent.acked_version = last_version
            return None
        if last_version in self._by_version:
            agent.acked_version = last_version
        return self._next_for(agent)

    def ack(self, stream_id: int, version: str) -> Outgoing | None:
        agent = self._agents.get(stream_id)
        if agent is None or agent.in_flight is None or agent.in_flight.version != version:
            return None  # a stale or unexpected ACK: ignore
        agent.acked_version = version
        agent.in_flight = None
        agent.acks += 1
        return self._next_for(agent)

    def nack(self, stream_id: int, version: str, error: str) -> Outgoing | None:
        agent = self._agents.get(stream_id)
        if agent is None or agent.in_flight is None or agent.in_flight.version != version:
            return None
        refused = agent.in_flight
        agent.in_flight = None
        agent.nacks += 1
        agent.last_nack = (version, error)
        if refused.full:
            agent.refused_version = version
            return None
        agent.acked_version = ""  # the agent may hold anything: resync in full
        return self._next_for(agent)

    def disconnect(self, stream_id: int) -> None:
        self._agents.pop(stream_id, None)

    def agents(self) -> list[AgentState]:
        return sorted(self._agents.values(), key=lambda a: (a.node, a.stream_id))

    # -- deciding what to send ---------------------------------------------------------

    def _next_for(self, agent: AgentState) -> Outgoing | None:
        latest = self.latest
        if latest is None or agent.acked_version == latest.version:
            return None
        if agent.refused_version == latest.version:
            return None
        update = self.update(agent.acked_version, latest.version, agent.kind)
        agent.in_flight = update
        return update

    def update(self, base_version: str, version: str, node_kind: NodeKind) -> Outgoing:
        """The delta from ``base_version`` (full if unknown or "") to ``version``, cached."""
        if base_version not in self._by_version:
            base_version = ""
        cache_key = (base_version, version, node_kind)
        cached = self._deltas.get(cache_key)
        if cached is not None:
            self._deltas.move_to_end(cache_key)
            return cached
        target = self._by_version[version]
        mine = {k: v for k, v in target.resources.items() if _wanted(k[0], node_kind)}
        if not base_version:
            upserts = tuple((k[0], k[1], body) for k, body in sorted(mine.items()))
            removals: tuple[ResourceKey, ...] = ()
        else:
            base = self._by_version[base_version].resources
            upserts = tuple((k[0], k[1], body) for k, body in sorted(mine.items())
                            if base.get(k) != body)
            removals = tuple(sorted(k for k in base if k not in mine and _wanted(k[0], node_kind)))
        out = Outgoing(version, base_version, target.root_namespace, upserts, removals, node_kind)
        self._deltas[cache_key] = out
        while len(self._deltas) > 64:
            self._deltas.popitem(last=False)
        return out
