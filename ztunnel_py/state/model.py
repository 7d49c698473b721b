"""The mesh model: frozen dataclasses shared by the controller, agents and waypoints.

Nothing past the translator (``ztunnel_py.controller.translate``) or the wire
codec (``ztunnel_py.state.codec``) sees a dict from YAML or a protobuf message:
only these types. Mappings are stored as ``FrozenMap`` so that every model
object is hashable and safe to share between tasks.
"""

from __future__ import annotations

import enum
from collections.abc import ItemsView, Iterator, KeysView, Mapping, ValuesView
from dataclasses import dataclass, field
from typing import Any, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class FrozenMap(Mapping[K, V]):
    """An immutable, hashable mapping (labels, port maps)."""

    __slots__ = ("_d", "_h")

    def __init__(self, items: Mapping[K, V] | None = None) -> None:
        self._d: dict[K, V] = dict(items or {})
        self._h: int | None = None

    @classmethod
    def adopt(cls, items: dict[K, V]) -> FrozenMap[K, V]:
        """A FrozenMap over ``items`` itself (no copy): the caller hands the dict over
        and never touches it again (the wire codec, with dicts it just parsed)."""
        m = object.__new__(cls)
        m._d = items
        m._h = None
        return m

    def __getitem__(self, key: K) -> V:
        return self._d[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    # fast paths (Mapping's defaults go through __getitem__ and exceptions)
    def __contains__(self, key: object) -> bool:
        return key in self._d

    def get(self, key: K, default: Any = None) -> Any:
        return self._d.get(key, default)

    def items(self) -> ItemsView[K, V]:
        return self._d.items()

    def keys(self) -> KeysView[K]:
        return self._d.keys()

    def values(self) -> ValuesView[V]:
        return self._d.values()

    def __hash__(self) -> int:
        if self._h is None:
            self._h = hash(frozenset(self._d.items()))
        return self._h

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self._d) == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenMap({self._d!r})"


def frozen_map(items: Mapping[Any, Any] | None = None) -> FrozenMap[Any, Any]:
    return FrozenMap(items)


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


# -- workloads and services ---------------------------------------------------

ENROLL_LABEL = "istio.io/dataplane-mode"
WAYPOINT_LABEL = "istio.io/use-waypoint"
WAYPOINT_NAMESPACE_LABEL = "istio.io/use-waypoint-namespace"


@dataclass(frozen=True)
class WaypointRef:
    """A waypoint named by ``istio.io/use-waypoint`` (a Gateway of class istio-waypoint)."""

    name: str
    namespace: str


@dataclass(frozen=True)
class Workload:
    uid: str  # "<namespace>/<pod name>" in directory mode, the pod UID in Kubernetes
    name: str
    namespace: str
    service_account: str
    node: str
    ips: tuple[str, ...]
    trust_domain: str = "cluster.local"
    labels: FrozenMap[str, str] = field(default_factory=FrozenMap)
    enrolled: bool = False
    waypoint: WaypointRef | None = None
    healthy: bool = True
    # Named container ports ("http" -> 8080), for Services whose targetPort is a name.
    named_ports: FrozenMap[str, int] = field(default_factory=FrozenMap)
    # Set on the waypoint proxies' own workloads (a Gateway of class istio-waypoint).
    is_waypoint: bool = False

    @property
    def identity(self) -> str:
        return spiffe_id(self.trust_domain, self.namespace, self.service_account)

    @property
    def canonical_name(self) -> str:
        """Istio's canonical service name: the label, else ``app``, else the pod name."""
        return (
            self.labels.get("service.istio.io/canonical-name")
            or self.labels.get("app.kubernetes.io/name")
            or self.labels.get("app")
            or self.name
        )

    @property
    def canonical_revision(self) -> str:
        return (
            self.labels.get("service.istio.io/canonical-revision")
            or self.labels.get("app.kubernetes.io/version")
            or self.labels.get("version")
            or "latest"
        )


@dataclass(frozen=True)
class ServicePort:
    port: int
    target_port: int | str  # a number, or a container port name
    name: str = ""
    protocol: str = "TCP"
    app_protocol: str = ""


@dataclass(frozen=True)
class Endpoint:
    """One backend of a Service: a workload and the ports it serves (service port → target)."""

    workload_uid: str
    address: str
    ports: FrozenMap[int, int] = field(default_factory=FrozenMap)
    ready: bool = True


@dataclass(frozen=True)
class Service:
    name: str
    namespace: str
    hostname: str  # <name>.<namespace>.svc.cluster.local
    vips: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    endpoints: tuple[Endpoint, ...] = ()
    waypoint: WaypointRef | None = None
    labels: FrozenMap[str, str] = field(default_factory=FrozenMap)
    selector: FrozenMap[str, str] = field(default_factory=FrozenMap)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def port(self, number: int) -> ServicePort | None:
        for p in self.ports:
            if p.port == number:
                return p
        return None


# -- security policy ------------------------------------------------------------


class Action(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"
    CUSTOM = "CUSTOM"


@dataclass(frozen=True)
class Source:
    """``rules[].from[].source`` of an AuthorizationPolicy (Istio field names, snake_case)."""

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Operation:
    """``rules[].to[].operation``."""

    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()
    not_ports: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class Condition:
    """``rules[].when[]``."""

    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    sources: tuple[Source, ...] = ()  # rules[].from[].source
    operations: tuple[Operation, ...] = ()  # rules[].to[].operation
    conditions: tuple[Condition, ...] = ()  # rules[].when


@dataclass(frozen=True)
class PolicyTargetRef:
    kind: str
    name: str
    group: str = ""
    namespace: str = ""


@dataclass(frozen=True)
class AuthorizationPolicy:
    name: str
    namespace: str
    action: Action = Action.ALLOW
    # None: no selector (namespace- or mesh-wide); {} would select everything in scope.
    selector: FrozenMap[str, str] | None = None
    target_refs: tuple[PolicyTargetRef, ...] = ()
    rules: tuple[Rule, ...] = ()
    provider: str = ""  # CUSTOM action's extension provider

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class MtlsMode(enum.Enum):
    UNSET = "UNSET"
    DISABLE = "DISABLE"
    PERMISSIVE = "PERMISSIVE"
    STRICT = "STRICT"


@dataclass(frozen=True)
class PeerAuthentication:
    name: str
    namespace: str
    selector: FrozenMap[str, str] | None = None
    mode: MtlsMode = MtlsMode.UNSET
    port_level: FrozenMap[int, MtlsMode] = field(default_factory=FrozenMap)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"
