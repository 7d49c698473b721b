"""Kubernetes-shaped objects -> the mesh model. Pure and deterministic.

Both configuration sources (a directory of YAML, the Kubernetes API) hand a
list of ``KubeObject`` to :func:`translate`, which returns the model snapshot
(without a version) and every problem found, each naming where it came from,
the field and a likely fix. A bad object is dropped with a problem; the rest
still applies. Cross-object checks (duplicate IPs, a VirtualService subset no
DestinationRule defines, a use-waypoint label naming no waypoint) are problems
too; ``ztunnel-py analyze`` prints exactly these.

Enrollment and waypoints follow Istio ambient:

* ``istio.io/dataplane-mode``: ``ambient`` on the namespace or the pod enrols
  the pod; the pod's label wins; ``none`` on the pod opts it out. Host-network
  pods are never enrolled.
* ``istio.io/use-waypoint``: on the pod (for a workload) or the service (for a
  service), else on the namespace; ``none`` opts out. The waypoint is a
  Gateway API Gateway of class ``istio-waypoint``; its own pods (labelled
  ``gateway.networking.k8s.io/gateway-name``) are marked ``is_waypoint``.
"""

from __future__ import annotations

import difflib
import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from ztunnel_py.state import routing
from ztunnel_py.state.codec import Issue, Schema
from ztunnel_py.state.model import (
    ENROLL_LABEL,
    WAYPOINT_LABEL,
    WAYPOINT_NAMESPACE_LABEL,
    Action,
    AuthorizationPolicy,
    Condition,
    Endpoint,
    FrozenMap,
    MtlsMode,
    Operation,
    PeerAuthentication,
    PolicyTargetRef,
    Rule,
    Service,
    ServicePort,
    Source,
    WaypointRef,
    Workload,
)
from ztunnel_py.state.snapshot import Snapshot

Severity = Literal["error", "warning"]

GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
_T = TypeVar("_T")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
CLUSTER_DOMAIN = "cluster.local"


@dataclass(frozen=True)
class KubeObject:
    """One Kubernetes object and where it came from ("dir/a.yaml#doc3", "kubernetes:Pod/ns/n")."""

    origin: str
    body: Mapping[str, Any]


@dataclass(frozen=True)
class Problem:
    origin: str
    kind: str
    name: str  # "<namespace>/<name>", or "" when unknown
    field: str  # "spec.http[0].route[0].destination.subset"
    message: str
    hint: str = ""
    severity: Severity = "error"

    def __str__(self) -> str:
        head = " ".join(p for p in (f"{self.severity.capitalize()} [{self.origin}]", self.kind,
                                     self.name, self.field) if p)
        hint = f" (hint: {self.hint})" if self.hint else ""
        return f"{head}: {self.message}{hint}"


ObjectId = tuple[str, str]  # (kind, "<namespace>/<name>"), as in Problem.kind and .name


@dataclass(frozen=True)
class Translation:
    snapshot: Snapshot
    problems: list[Problem] = field(default_factory=list)
    # objects that parsed cleanly, by id, for keeping the last good version of each
    accepted: Mapping[ObjectId, KubeObject] = field(default_factory=dict)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


# -- which kinds we read ---------------------------------------------------------------

_ISTIO_NETWORKING = ("networking.istio.io/v1", "networking.istio.io/v1beta1",
                     "networking.istio.io/v1alpha3")
_ISTIO_SECURITY = ("security.istio.io/v1", "security.istio.io/v1beta1")
_GATEWAY_API = ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1")

KNOWN_KINDS: dict[str, tuple[str, ...]] = {
    "Namespace": ("v1",),
    "Pod": ("v1",),
    "Service": ("v1",),
    "ServiceAccount": ("v1",),
    "EndpointSlice": ("discovery.k8s.io/v1",),
    "VirtualService": _ISTIO_NETWORKING,
    "DestinationRule": _ISTIO_NETWORKING,
    "Gateway": _ISTIO_NETWORKING + _GATEWAY_API,
    "AuthorizationPolicy": _ISTIO_SECURITY,
    "PeerAuthentication": _ISTIO_SECURITY,
    "HTTPRoute": _GATEWAY_API,
}
# Ordinary Kubernetes kinds that carry nothing the mesh needs: silently ignored (as
# istioctl analyze does), so that a directory can hold a whole application.
IGNORED_KINDS = frozenset({
    "ConfigMap", "Secret", "Deployment", "ReplicaSet", "StatefulSet", "DaemonSet", "Job",
    "CronJob", "Endpoints", "Node", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
    "CustomResourceDefinition", "GatewayClass", "NetworkPolicy", "Ingress", "PersistentVolume",
    "PersistentVolumeClaim", "StorageClass", "HorizontalPodAutoscaler", "PodDisruptionBudget",
    "ReferenceGrant",
})
# Istio / Gateway API kinds that ztunnel-py does not implement: ignored with a warning,
# since the user expects them to have an effect.
UNSUPPORTED_KINDS = frozenset({
    "ServiceEntry", "WorkloadEntry", "WorkloadGroup", "Sidecar", "EnvoyFilter", "Telemetry",
    "RequestAuthentication", "ProxyConfig", "WasmPlugin", "GRPCRoute", "TCPRoute", "TLSRoute",
    "UDPRoute",
})
CLUSTER_SCOPED = frozenset({
    "Namespace", "Node", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
    "GatewayClass", "PersistentVolume", "StorageClass",
})

_YAML = Schema(camel_case=True)


# -- wire shapes of the security resources (camelCase via the schema) ------------------


@dataclass(frozen=True)
class _Selector:
    match_labels: FrozenMap[str, str] = field(default_factory=FrozenMap)


@dataclass(frozen=True)
class _From:
    source: Source = field(default_factory=Source)


@dataclass(frozen=True)
class _To:
    operation: Operation = field(default_factory=Operation)


@dataclass(frozen=True)
class _RuleSpec:
    from_: tuple[_From, ...] = field(default=(), metadata={"wire": "from"})
    to: tuple[_To, ...] = ()
    when: tuple[Condition, ...] = ()


@dataclass(frozen=True)
class _Provider:
    name: str = ""


@dataclass(frozen=True)
class _AuthorizationPolicySpec:
    selector: _Selector | None = None
    target_ref: PolicyTargetRef | None = None
    target_refs: tuple[PolicyTargetRef, ...] = ()
    action: Action | None = None
    provider: _Provider | None = None
    rules: tuple[_RuleSpec, ...] = ()


@dataclass(frozen=True)
class _Mtls:
    mode: MtlsMode = MtlsMode.UNSET


@dataclass(frozen=True)
class _PeerAuthenticationSpec:
    selector: _Selector | None = None
    mtls: _Mtls | None = None
    port_level_mtls: FrozenMap[int, _Mtls] = field(default_factory=FrozenMap)


# -- the per-object reader -----------------------------------------------------------


@dataclass
class _Reader:
    """Collects problems for one object."""

    obj: KubeObject
    kind: str
    name: str
    problems: list[Problem]
    failed: bool = False

    def error(self, fld: str, message: str, hint: str = "") -> None:
        self.failed = True
        self.problems.append(Problem(self.obj.origin, self.kind, self.name, fld, message, hint))

    def warn(self, fld: str, message: str, hint: str = "") -> None:
        self.problems.append(
            Problem(self.obj.origin, self.kind, self.name, fld, message, hint, "warning")
        )

    def issues(self, issues: Iterable[Issue]) -> None:
        for i in issues:
            self.error(i.path, i.message, i.hint)

    def get(self, data: Mapping[str, Any], path: str, typ: type | tuple[type, ...],
            default: Any = None) -> Any:
        """``data[path's last part]`` checked against ``typ``; a problem and default if not."""
        value = data.get(path.rsplit(".", 1)[-1], default)
        if value is None or value is default:
            return default
        if isinstance(value, typ) and not (isinstance(value, bool) and bool not in _types(typ)):
            return value
        wanted = " or ".join(_TYPE_WORDS.get(t, t.__name__) for t in _types(typ))
        self.error(path, f"expected {wanted}, got {type(value).__name__} {value!r}"[:200])
        return default

    def labels(self, data: Mapping[str, Any], path: str) -> FrozenMap[str, str]:
        raw = self.get(data, path, dict, {})
        bad = [k for k, v in raw.items() if not isinstance(k, str) or not isinstance(v, str)]
        for k in bad:
            self.error(f"{path}.{k}", f"label values must be strings, got {raw[k]!r}",
                       f"quote it: '{raw[k]}'")
        return FrozenMap({k: v for k, v in raw.items() if k not in bad})


_TYPE_WORDS: dict[type, str] = {
    str: "a string", int: "an integer", bool: "true or false", dict: "a mapping", list: "a list",
}


class _LazyReader(_Reader):
    """A reader for the resolve pass, whose origin object is only built on a problem."""

    def __init__(self, origin: str, kind: str, name: str, problems: list[Problem]) -> None:
        self.origin, self.kind, self.name, self.problems, self.failed = (
            origin, kind, name, problems, False)

    def error(self, fld: str, message: str, hint: str = "") -> None:
        self.failed = True
        self.problems.append(Problem(self.origin, self.kind, self.name, fld, message, hint))

    def warn(self, fld: str, message: str, hint: str = "") -> None:
        self.problems.append(
            Problem(self.origin, self.kind, self.name, fld, message, hint, "warning"))


def _types(typ: type | tuple[type, ...]) -> tuple[type, ...]:
    return typ if isinstance(typ, tuple) else (typ,)


# -- parsed objects (before cross-object resolution) ------------------------------------


@dataclass
class _Namespace:
    name: str
    labels: FrozenMap[str, str]


@dataclass
class _Pod:
    origin: str
    uid: str
    name: str
    namespace: str
    labels: FrozenMap[str, str]
    node: str
    service_account: str
    ips: tuple[str, ...]
    named_ports: FrozenMap[str, int]
    healthy: bool
    host_network: bool


@dataclass
class _Service:
    origin: str
    name: str
    namespace: str
    labels: FrozenMap[str, str]
    selector: FrozenMap[str, str]
    vips: tuple[str, ...]
    ports: tuple[ServicePort, ...]


@dataclass
class _SliceEndpoint:
    addresses: tuple[str, ...]
    ready: bool
    target: tuple[str, str] | None  # (namespace, pod name) of a targetRef to a Pod
    target_uid: str


@dataclass
class _Slice:
    origin: str
    name: str
    namespace: str
    service: str
    ports: FrozenMap[str, int]  # port name ("" when unnamed) -> port
    endpoints: tuple[_SliceEndpoint, ...]


@dataclass
class _Parsed:
    namespaces: dict[str, _Namespace] = field(default_factory=dict)
    pods: list[_Pod] = field(default_factory=list)
    services: list[_Service] = field(default_factory=list)
    slices: list[_Slice] = field(default_factory=list)
    authz: list[AuthorizationPolicy] = field(default_factory=list)
    peer_authn: list[PeerAuthentication] = field(default_factory=list)
    routing: list[tuple[str, Any]] = field(default_factory=list)  # (origin, object)
    seen: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, ns/name) -> origin
    accepted: dict[ObjectId, KubeObject] = field(default_factory=dict)


def translate(
    objects: Iterable[KubeObject], *, trust_domain: str, root_namespace: str
) -> Translation:
    """The model for ``objects``, and every problem found on the way."""
    return Translator(trust_domain=trust_domain, root_namespace=root_namespace).translate(objects)


def translate_keeping_last_good(
    objects: Iterable[KubeObject],
    last_good: Mapping[ObjectId, KubeObject],
    *,
    trust_domain: str,
    root_namespace: str,
) -> Translation:
    """Like :func:`translate`, but an object whose new version is refused keeps its
    last good version (from ``last_good``, a previous ``Translation.accepted``).

    Bad input never wipes good state: an edit that breaks a Pod leaves the Pod as
    it was, with the problem reported.
    """
    return Translator(trust_domain=trust_domain, root_namespace=root_namespace) \
        .translate_keeping_last_good(objects, last_good)


@dataclass(frozen=True)
class _One:
    """What one object contributes, before cross-object resolution (cached per object)."""

    problems: tuple[Problem, ...]
    seen_key: tuple[str, str] | None  # for duplicate detection; None if the object failed
    object_id: ObjectId | None
    bucket: str  # the _Parsed attribute the item goes to ("" for none)
    item: Any


def _endpoint_key(ep: Endpoint) -> tuple[Any, ...]:
    return (ep.workload_uid, ep.address, tuple(sorted(ep.ports.items())), ep.ready)


class Translator:
    """:func:`translate` with a memory, for a source that hands the same objects again.

    Results are a pure function of the input; the memory only saves work: an
    object handed again *as the same Python object* (the directory source keeps
    the objects of unchanged files, the Kubernetes source those of unchanged
    resources) is not parsed again, and an unchanged workload, endpoint or
    service comes out as the same model object, so that the push encodes only
    what changed. Bodies must not be mutated after they are handed in.
    """

    def __init__(self, *, trust_domain: str, root_namespace: str) -> None:
        self.trust_domain = trust_domain
        self.root_namespace = root_namespace
        self._parsed: dict[int, tuple[KubeObject, _One]] = {}
        self._refused: list[KubeObject] = []
        self._memo = _Memo()

    def translate(self, objects: Iterable[KubeObject]) -> Translation:
        problems: list[Problem] = []
        parsed = _Parsed()
        cache: dict[int, tuple[KubeObject, _One]] = {}
        self._refused = []
        for obj in sorted(_expand_lists(objects, problems), key=lambda o: o.origin):
            hit = self._parsed.get(id(obj))
            one = hit[1] if hit is not None and hit[0] is obj else _parse_object(obj)
            cache[id(obj)] = (obj, one)
            if not _merge(obj, one, parsed, problems):
                self._refused.append(obj)
        self._parsed = cache
        memo = _Memo(self._memo)
        snapshot = _resolve(parsed, problems, self.trust_domain, self.root_namespace, memo)
        memo.done()
        self._memo = memo
        problems.sort(key=lambda p: (p.origin, p.kind, p.name, p.field))
        return Translation(snapshot, problems, parsed.accepted)

    def translate_keeping_last_good(
        self, objects: Iterable[KubeObject], last_good: Mapping[ObjectId, KubeObject]
    ) -> Translation:
        objects = list(objects)
        first = self.translate(objects)
        broken = {_object_id(o.body) for o in self._refused} - set(first.accepted)
        revive = [last_good[oid] for oid in sorted(broken & set(last_good))]
        if not revive:
            return first
        second = self.translate(objects + revive)
        notes = [
            Problem(o.origin, oid[0], oid[1], "", "the new version is refused; keeping the last "
                    "good version", "fix the problems reported above", "warning")
            for oid, o in ((_object_id(o.body), o) for o in revive)
        ]
        problems = sorted(set(second.problems) | set(notes),
                          key=lambda p: (p.origin, p.kind, p.name, p.field))
        return Translation(second.snapshot, problems, second.accepted)


class _Memo:
    """Model objects of the previous translation, reused when their inputs are identical."""

    def __init__(self, previous: _Memo | None = None) -> None:
        self.workloads: dict[tuple[Any, ...], tuple[_Pod, Workload]] = {}
        self.endpoints: dict[tuple[Any, ...], Endpoint] = {}
        self.services: dict[tuple[Any, ...], tuple[_Service, tuple[Endpoint, ...], Service]] = {}
        self.selections: dict[tuple[Any, ...], tuple[_Service, tuple[Workload, ...],
                                                     tuple[Endpoint, ...]]] = {}
        self._previous = previous

    def done(self) -> None:
        self._previous = None

    def workload(self, pod: _Pod, key: tuple[Any, ...], build: Any) -> Workload:
        full = (id(pod), *key)
        prev = self._previous.workloads.get(full) if self._previous else None
        wl = prev[1] if prev is not None and prev[0] is pod else build()
        self.workloads[full] = (pod, wl)
        return wl

    def endpoint(self, uid: str, address: str, ports: dict[int, int], ready: bool) -> Endpoint:
        key = (uid, address, tuple(sorted(ports.items())), ready)  # == _endpoint_key
        ep = self._previous.endpoints.get(key) if self._previous else None
        if ep is None:
            ep = Endpoint(uid, address, FrozenMap(ports), ready)
        self.endpoints[key] = ep
        return ep

    def selected(self, svc: _Service, candidates: tuple[Workload, ...],
                 build: Any) -> tuple[Endpoint, ...]:
        """A selector service's endpoints: the same if the service and the candidate
        workloads are the same objects as last time."""
        key = (id(svc), tuple(map(id, candidates)))
        prev = self._previous.selections.get(key) if self._previous else None
        if prev is not None and prev[0] is svc and all(
                a is b for a, b in zip(prev[1], candidates, strict=True)):
            out: tuple[Endpoint, ...] = prev[2]
            for ep in out:  # keep them in this run's endpoint memo
                self.endpoints[_endpoint_key(ep)] = ep
        else:
            out = build()
        self.selections[key] = (svc, candidates, out)
        return out

    def service(self, svc: _Service, endpoints: tuple[Endpoint, ...], waypoint: Any,
                build: Any) -> Service:
        key = (id(svc), tuple(map(id, endpoints)), waypoint)
        prev = self._previous.services.get(key) if self._previous else None
        out = prev[2] if prev is not None and prev[0] is svc and prev[1] == endpoints else build()
        self.services[key] = (svc, endpoints, out)
        return out


def _object_id(body: Any) -> ObjectId:
    if not isinstance(body, Mapping):
        return ("", "")
    meta = body.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    kind, name = str(body.get("kind", "")), str(meta.get("name", ""))
    if kind in CLUSTER_SCOPED:
        return (kind, name)
    return (kind, f"{meta.get('namespace') or 'default'}/{name}")


def _expand_lists(objects: Iterable[KubeObject], problems: list[Problem]) -> list[KubeObject]:
    out: list[KubeObject] = []
    for obj in objects:
        body = obj.body
        if isinstance(body, Mapping) and body.get("kind") == "List":
            items = body.get("items")
            if not isinstance(items, list):
                problems.append(Problem(obj.origin, "List", "", "items", "expected a list"))
                continue
            out += [KubeObject(f"{obj.origin}/items[{i}]", it) for i, it in enumerate(items)]
        else:
            out.append(obj)
    return out


def _parse_object(obj: KubeObject) -> _One:
    problems: list[Problem] = []
    body = obj.body
    if not isinstance(body, Mapping):
        problems.append(Problem(obj.origin, "", "", "", f"expected a Kubernetes object (a "
                                f"mapping), got {type(body).__name__}",
                                "each YAML document must be one object with apiVersion and kind"))
        return _One(tuple(problems), None, None, "", None)
    kind, api = body.get("kind"), body.get("apiVersion")
    if not isinstance(kind, str) or not kind:
        problems.append(Problem(obj.origin, "", "", "kind", "missing kind",
                                "every object needs apiVersion and kind"))
        return _One(tuple(problems), None, None, "", None)
    meta = body.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    namespace = (meta.get("namespace") if isinstance(meta, Mapping) else None) or "default"
    display = f"{namespace}/{name}" if kind not in CLUSTER_SCOPED and name else str(name or "")
    if kind not in KNOWN_KINDS:
        if kind in IGNORED_KINDS:  # ordinary Kubernetes objects: nothing to say
            return _One((), None, None, "", None)
        if kind in UNSUPPORTED_KINDS:
            problems.append(Problem(obj.origin, kind, display, "kind",
                                    f"{kind} is not supported by ztunnel-py; ignored",
                                    "see the supported kinds in the README", "warning"))
            return _One(tuple(problems), None, None, "", None)
        close = difflib.get_close_matches(kind, list(KNOWN_KINDS), n=1)
        problems.append(Problem(obj.origin, kind, display, "kind", f"unknown kind {kind!r}",
                                f"did you mean {close[0]!r}?" if close
                                else "supported: " + ", ".join(sorted(KNOWN_KINDS))))
        return _One(tuple(problems), None, None, "", None)
    r = _Reader(obj, kind, display, problems)
    if api not in KNOWN_KINDS[kind]:
        r.error("apiVersion", f"unsupported apiVersion {api!r} for {kind}",
                "use one of " + ", ".join(KNOWN_KINDS[kind]))
        return _One(tuple(problems), None, None, "", None)
    if not isinstance(meta, Mapping):
        r.error("metadata", "missing metadata", "add metadata.name")
        return _One(tuple(problems), None, None, "", None)
    if not isinstance(name, str) or not name:
        r.error("metadata.name", "missing or non-string metadata.name")
        return _One(tuple(problems), None, None, "", None)
    if not isinstance(namespace, str):
        r.error("metadata.namespace", f"expected a string, got {namespace!r}")
        return _One(tuple(problems), None, None, "", None)
    seen_kind = kind if kind != "Gateway" else f"Gateway/{api.split('/')[0]}"
    local = _Parsed()
    _HANDLERS[kind](r, body, name, namespace, api, local)
    if r.failed:
        return _One(tuple(problems), None, None, "", None)
    for bucket in ("pods", "services", "slices", "authz", "peer_authn", "routing"):
        items = getattr(local, bucket)
        if items:
            return _One(tuple(problems), (seen_kind, display), (kind, display), bucket, items[0])
    if local.namespaces:
        return _One(tuple(problems), (seen_kind, display), (kind, display), "namespaces",
                    next(iter(local.namespaces.values())))
    return _One(tuple(problems), (seen_kind, display), (kind, display), "", None)


def _merge(obj: KubeObject, one: _One, parsed: _Parsed, problems: list[Problem]) -> bool:
    """Add what ``obj`` contributes; False if it is refused."""
    problems.extend(one.problems)
    if one.seen_key is None or one.object_id is None:
        return False
    previous = parsed.seen.get(one.seen_key)
    if previous is not None:
        kind, display = one.object_id
        problems.append(Problem(obj.origin, kind, display, "metadata.name",
                                f"duplicate {kind} {display} (first defined in {previous})",
                                "each object must be defined once; remove or rename one"))
        return False
    parsed.seen[one.seen_key] = obj.origin
    parsed.accepted[one.object_id] = obj
    if one.bucket == "namespaces":
        parsed.namespaces[one.item.name] = one.item
    elif one.bucket:
        getattr(parsed, one.bucket).append(one.item)
    return True


def _spec(r: _Reader, body: Mapping[str, Any]) -> Mapping[str, Any]:
    spec = body.get("spec", {})
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        r.error("spec", f"expected a mapping, got {type(spec).__name__}")
        return {}
    return spec


def _decode_spec(r: _Reader, body: Mapping[str, Any], cls: type[_T],
                 given: Mapping[str, Any] | None = None) -> _T | None:
    """The object's ``spec`` decoded as ``cls``; None (the problems reported) if it fails."""
    issues: list[Issue] = []
    value = _YAML.decode_fields(cls, _spec(r, body), "spec", issues, given=given)
    r.issues(issues)
    if r.failed:
        return None
    assert isinstance(value, cls)
    return value


def _parse_namespace(r: _Reader, body: Mapping[str, Any], name: str, _ns: str, _api: str,
                     parsed: _Parsed) -> None:
    labels = r.labels(body["metadata"], "metadata.labels")
    if not r.failed:
        parsed.namespaces[name] = _Namespace(name, labels)


def _ip(r: _Reader, path: str, value: Any) -> str | None:
    if not isinstance(value, str):
        r.error(path, f"expected an IP address string, got {value!r}")
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        r.error(path, f"{value!r} is not an IP address", "write an IPv4 or IPv6 address")
        return None


def _port_number(r: _Reader, path: str, value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    r.error(path, f"expected a port number 1-65535, got {value!r}")
    return None


def _parse_pod(r: _Reader, body: Mapping[str, Any], name: str, ns: str, _api: str,
               parsed: _Parsed) -> None:
    meta = body["metadata"]
    labels = r.labels(meta, "metadata.labels")
    uid = r.get(meta, "metadata.uid", str, "") or f"{ns}/{name}"
    spec = _spec(r, body)
    status = r.get(body, "status", dict, {})
    node = r.get(spec, "spec.nodeName", str, "")
    sa = r.get(spec, "spec.serviceAccountName", str, "") or "default"
    host_network = bool(r.get(spec, "spec.hostNetwork", bool, False))
    named: dict[str, int] = {}
    for ci, c in enumerate(r.get(spec, "spec.containers", list, [])):
        cpath = f"spec.containers[{ci}]"
        if not isinstance(c, Mapping):
            r.error(cpath, "expected a mapping")
            continue
        for pi, p in enumerate(r.get(c, f"{cpath}.ports", list, [])):
            ppath = f"{cpath}.ports[{pi}]"
            if not isinstance(p, Mapping):
                r.error(ppath, "expected a mapping")
                continue
            number = _port_number(r, f"{ppath}.containerPort", p.get("containerPort"))
            pname = r.get(p, f"{ppath}.name", str, "")
            if number is not None and pname:
                named[pname] = number
    ips: list[str] = []
    primary = status.get("podIP")
    if primary is not None:
        ip = _ip(r, "status.podIP", primary)
        if ip:
            ips.append(ip)
    for i, entry in enumerate(r.get(status, "status.podIPs", list, [])):
        raw = entry.get("ip") if isinstance(entry, Mapping) else None
        ip = _ip(r, f"status.podIPs[{i}].ip", raw)
        if ip and ip not in ips:
            ips.append(ip)
    if not ips and not r.failed:
        r.warn("status.podIP", "pod has no IP address yet; it cannot be reached",
               "in directory mode, set status.podIP (and status.podIPs for dual stack)")
    if not node and not r.failed:
        r.warn("spec.nodeName", "pod is not scheduled on a node; no agent will serve it",
               "set spec.nodeName to the node's name")
    healthy = True
    for i, cond in enumerate(r.get(status, "status.conditions", list, [])):
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            healthy = cond.get("status") == "True"
        elif not isinstance(cond, Mapping):
            r.error(f"status.conditions[{i}]", "expected a mapping")
    phase = status.get("phase")
    if phase in ("Succeeded", "Failed") or meta.get("deletionTimestamp"):
        healthy = False
    if r.failed:
        return
    parsed.pods.append(_Pod(r.obj.origin, uid, name, ns, labels, node, sa, tuple(ips),
                            FrozenMap(named), healthy, host_network))


def _parse_service(r: _Reader, body: Mapping[str, Any], name: str, ns: str, _api: str,
                   parsed: _Parsed) -> None:
    labels = r.labels(body["metadata"], "metadata.labels")
    spec = _spec(r, body)
    selector = r.labels(spec, "spec.selector")
    vips: list[str] = []
    raw_ips = list(r.get(spec, "spec.clusterIPs", list, []))
    cluster_ip = spec.get("clusterIP")
    if cluster_ip is not None and cluster_ip not in raw_ips:
        raw_ips.insert(0, cluster_ip)
    for i, raw in enumerate(raw_ips):
        if raw in ("None", ""):
            continue  # headless
        ip = _ip(r, f"spec.clusterIPs[{i}]" if "clusterIPs" in spec else "spec.clusterIP", raw)
        if ip and ip not in vips:
            vips.append(ip)
    ports: list[ServicePort] = []
    for i, p in enumerate(r.get(spec, "spec.ports", list, [])):
        path = f"spec.ports[{i}]"
        if not isinstance(p, Mapping):
            r.error(path, "expected a mapping")
            continue
        number = _port_number(r, f"{path}.port", p.get("port"))
        target: Any = p.get("targetPort", number)
        if isinstance(target, str) and target.isdigit():
            target = int(target)
        if isinstance(target, int) and not isinstance(target, bool):
            _port_number(r, f"{path}.targetPort", target)
        elif not isinstance(target, str) or not target:
            r.error(f"{path}.targetPort", f"expected a port number or a port name, got {target!r}")
        if number is None:
            continue
        ports.append(ServicePort(
            port=number,
            target_port=target,
            name=r.get(p, f"{path}.name", str, ""),
            protocol=r.get(p, f"{path}.protocol", str, "TCP"),
            app_protocol=r.get(p, f"{path}.appProtocol", str, ""),
        ))
    if not vips and not r.failed:
        r.warn("spec.clusterIP", "service has no cluster IP (headless, or not set)",
               "in directory mode, set spec.clusterIP to reach the service by a virtual IP")
    if r.failed:
        return
    parsed.services.append(_Service(r.obj.origin, name, ns, labels, selector, tuple(vips),
                                    tuple(ports)))


def _parse_endpoint_slice(r: _Reader, body: Mapping[str, Any], name: str, ns: str, _api: str,
                          parsed: _Parsed) -> None:
    labels = r.labels(body["metadata"], "metadata.labels")
    service = labels.get(SERVICE_NAME_LABEL, "")
    if not service:
        r.warn(f"metadata.labels.{SERVICE_NAME_LABEL}", "EndpointSlice names no service; ignored",
               f"label it {SERVICE_NAME_LABEL}: <service name>")
        return
    ports: dict[str, int] = {}
    for i, p in enumerate(r.get(body, "ports", list, [])):
        if not isinstance(p, Mapping):
            r.error(f"ports[{i}]", "expected a mapping")
            continue
        number = _port_number(r, f"ports[{i}].port", p.get("port"))
        if number is not None:
            ports[r.get(p, f"ports[{i}].name", str, "")] = number
    endpoints: list[_SliceEndpoint] = []
    for i, e in enumerate(r.get(body, "endpoints", list, [])):
        path = f"endpoints[{i}]"
        if not isinstance(e, Mapping):
            r.error(path, "expected a mapping")
            continue
        addrs = [_ip(r, f"{path}.addresses[{j}]", a)
                 for j, a in enumerate(r.get(e, f"{path}.addresses", list, []))]
        conditions = r.get(e, f"{path}.conditions", dict, {})
        ready = conditions.get("ready", True) is not False
        ref = r.get(e, f"{path}.targetRef", dict, {})
        target = None
        if ref.get("kind", "Pod") == "Pod" and isinstance(ref.get("name"), str):
            target = (str(ref.get("namespace") or ns), ref["name"])
        uid = ref.get("uid") if isinstance(ref.get("uid"), str) else ""
        endpoints.append(_SliceEndpoint(tuple(a for a in addrs if a), ready, target, uid))
    if r.failed:
        return
    parsed.slices.append(_Slice(r.obj.origin, name, ns, service, FrozenMap(ports),
                                tuple(endpoints)))


def _parse_service_account(r: _Reader, body: Mapping[str, Any], _name: str, _ns: str, _api: str,
                           _parsed: _Parsed) -> None:
    r.labels(body["metadata"], "metadata.labels")


def _parse_authorization_policy(r: _Reader, body: Mapping[str, Any], name: str, ns: str,
                                _api: str, parsed: _Parsed) -> None:
    spec = _decode_spec(r, body, _AuthorizationPolicySpec)
    if spec is None:
        return
    action = spec.action or Action.ALLOW
    if action is Action.CUSTOM and not (spec.provider and spec.provider.name):
        r.error("spec.provider", "action CUSTOM needs a provider", "set spec.provider.name")
    if spec.selector is not None and (spec.target_ref or spec.target_refs):
        r.error("spec.targetRefs", "selector and targetRef(s) cannot be used together",
                "keep one of them")
    if r.failed:
        return
    refs = spec.target_refs + ((spec.target_ref,) if spec.target_ref else ())
    rules = tuple(
        Rule(
            sources=tuple(f.source for f in rule.from_),
            operations=tuple(t.operation for t in rule.to),
            conditions=rule.when,
        )
        for rule in spec.rules
    )
    parsed.authz.append(AuthorizationPolicy(
        name=name,
        namespace=ns,
        action=action,
        selector=spec.selector.match_labels if spec.selector is not None else None,
        target_refs=refs,
        rules=rules,
        provider=spec.provider.name if spec.provider else "",
    ))


def _parse_peer_authentication(r: _Reader, body: Mapping[str, Any], name: str, ns: str,
                               _api: str, parsed: _Parsed) -> None:
    spec = _decode_spec(r, body, _PeerAuthenticationSpec)
    if spec is None:
        return
    if spec.port_level_mtls and spec.selector is None:
        r.error("spec.portLevelMtls", "portLevelMtls needs a workload selector",
                "add spec.selector.matchLabels")
        return
    parsed.peer_authn.append(PeerAuthentication(
        name=name,
        namespace=ns,
        selector=spec.selector.match_labels if spec.selector is not None else None,
        mode=spec.mtls.mode if spec.mtls else MtlsMode.UNSET,
        port_level=FrozenMap({p: m.mode for p, m in spec.port_level_mtls.items()}),
    ))


def _routing_parser(cls: type) -> Any:
    def parse(r: _Reader, body: Mapping[str, Any], name: str, ns: str, _api: str,
              parsed: _Parsed) -> None:
        given: dict[str, Any] = {"name": name, "namespace": ns}
        if cls is routing.KubernetesGateway:
            given["labels"] = r.labels(body["metadata"], "metadata.labels")
        value = _decode_spec(r, body, cls, given)
        if value is not None:
            parsed.routing.append((r.obj.origin, value))

    return parse


def _parse_gateway(r: _Reader, body: Mapping[str, Any], name: str, ns: str, api: str,
                   parsed: _Parsed) -> None:
    cls = routing.KubernetesGateway if api in _GATEWAY_API else routing.Gateway
    _routing_parser(cls)(r, body, name, ns, api, parsed)


_HANDLERS: dict[str, Any] = {
    "Namespace": _parse_namespace,
    "Pod": _parse_pod,
    "Service": _parse_service,
    "ServiceAccount": _parse_service_account,
    "EndpointSlice": _parse_endpoint_slice,
    "AuthorizationPolicy": _parse_authorization_policy,
    "PeerAuthentication": _parse_peer_authentication,
    "VirtualService": _routing_parser(routing.VirtualService),
    "DestinationRule": _routing_parser(routing.DestinationRule),
    "Gateway": _parse_gateway,
    "HTTPRoute": _routing_parser(routing.KubernetesHTTPRoute),
}


# -- cross-object resolution -----------------------------------------------------------


def _waypoint_for(
    own: Mapping[str, str],
    namespace: _Namespace | None,
    ns: str,
    waypoints: set[tuple[str, str]],
    report: _Reader,
) -> WaypointRef | None:
    """The use-waypoint label of the object, else of its namespace; ``none`` opts out."""
    source: Mapping[str, str] = own
    where = "metadata.labels"
    if WAYPOINT_LABEL not in own:
        source = namespace.labels if namespace else {}
        where = f"Namespace {ns} label"
    name = source.get(WAYPOINT_LABEL, "")
    if not name or name == "none":
        return None
    wp_ns = source.get(WAYPOINT_NAMESPACE_LABEL) or ns
    if (wp_ns, name) not in waypoints:
        report.error(f"{where}.{WAYPOINT_LABEL}" if where == "metadata.labels" else where,
                     f"{WAYPOINT_LABEL}={name} names no waypoint in namespace {wp_ns}; "
                     "traffic will not go through a waypoint",
                     f"create a Gateway {wp_ns}/{name} with gatewayClassName: "
                     f"{routing.WAYPOINT_GATEWAY_CLASS}, or fix the label")
        return None
    return WaypointRef(name, wp_ns)


def _enrolled(pod: _Pod, namespace: _Namespace | None, r: _Reader) -> bool:
    if pod.host_network:
        return False
    mode = pod.labels.get(ENROLL_LABEL)
    if mode is not None and mode not in ("ambient", "none"):
        r.warn(f"metadata.labels.{ENROLL_LABEL}", f"unknown dataplane mode {mode!r}; ignored",
               "use ambient or none")
        mode = None
    if mode is not None:
        return bool(mode == "ambient")
    return namespace is not None and namespace.labels.get(ENROLL_LABEL) == "ambient"


def _matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _same_family(a: str, b: str) -> bool:
    return (":" in a) == (":" in b)


def _resolve(
    parsed: _Parsed, problems: list[Problem], trust_domain: str, root_namespace: str,
    memo: _Memo,
) -> Snapshot:
    gateways = [obj for _o, obj in parsed.routing if isinstance(obj, routing.KubernetesGateway)]
    waypoints = {(g.namespace, g.name) for g in gateways if g.is_waypoint}

    # workloads, first come (by origin) first served for duplicate IPs
    workloads: dict[str, Workload] = {}
    ip_owner: dict[str, _Pod] = {}
    pods_by_name: dict[tuple[str, str], Workload] = {}
    for pod in parsed.pods:
        r = _LazyReader(pod.origin, "Pod", f"{pod.namespace}/{pod.name}", problems)
        ns = parsed.namespaces.get(pod.namespace)
        is_wp = (pod.namespace, pod.labels.get(GATEWAY_NAME_LABEL, "")) in waypoints
        clash = [ip for ip in pod.ips if ip in ip_owner]
        if clash:
            owner = _owner(ip_owner[clash[0]])
            r.error("status.podIP", f"IP {clash[0]} is already used by {owner}; pod dropped",
                    "every pod needs its own IP address")
            continue
        if pod.uid in workloads:
            r.error("metadata.uid", f"uid {pod.uid} is already used; pod dropped")
            continue
        enrolled = _enrolled(pod, ns, r)
        waypoint = None if is_wp else _waypoint_for(pod.labels, ns, pod.namespace, waypoints, r)
        wl = memo.workload(pod, (enrolled, waypoint, is_wp), lambda pod=pod, enrolled=enrolled,
                           waypoint=waypoint, is_wp=is_wp: Workload(
            uid=pod.uid,
            name=pod.name,
            namespace=pod.namespace,
            service_account=pod.service_account,
            node=pod.node,
            ips=pod.ips,
            trust_domain=trust_domain,
            labels=pod.labels,
            enrolled=enrolled,
            waypoint=waypoint,
            healthy=pod.healthy,
            named_ports=pod.named_ports,
            is_waypoint=is_wp,
        ))
        workloads[wl.uid] = wl
        pods_by_name[(pod.namespace, pod.name)] = wl
        for ip in pod.ips:
            ip_owner[ip] = pod

    slices_by_service: dict[tuple[str, str], list[_Slice]] = defaultdict(list)
    for sl in parsed.slices:
        slices_by_service[(sl.namespace, sl.service)].append(sl)
    by_ip = {ip: wl for wl in workloads.values() for ip in wl.ips}
    # (namespace, label key, label value) -> workloads, in uid order: selectors look up
    # their rarest label instead of scanning the namespace
    by_label: dict[tuple[str, str, str], list[Workload]] = defaultdict(list)
    for wl in sorted(workloads.values(), key=lambda w: w.uid):
        if not wl.is_waypoint:
            for k, v in wl.labels.items():
                by_label[(wl.namespace, k, v)].append(wl)

    services: list[Service] = []
    vip_owner: dict[str, _Service] = {}
    for svc in parsed.services:
        r = _LazyReader(svc.origin, "Service", f"{svc.namespace}/{svc.name}", problems)
        clash = [ip for ip in svc.vips if ip in vip_owner or ip in ip_owner]
        if clash:
            owner = _owner(vip_owner.get(clash[0]) or ip_owner[clash[0]])
            r.error("spec.clusterIP", f"IP {clash[0]} is already used by {owner}; "
                    "service dropped", "every service needs its own cluster IP")
            continue
        for vip in svc.vips:
            vip_owner[vip] = svc
        slices = slices_by_service.get((svc.namespace, svc.name))
        if slices:
            endpoints = _slice_endpoints(svc, slices, workloads, pods_by_name, by_ip, problems,
                                         memo)
        else:
            endpoints = _selector_endpoints(svc, by_label, memo)
        waypoint = _waypoint_for(svc.labels, parsed.namespaces.get(svc.namespace),
                                 svc.namespace, waypoints, r)
        services.append(memo.service(svc, endpoints, waypoint, lambda svc=svc,
                                     endpoints=endpoints, waypoint=waypoint: Service(
            name=svc.name,
            namespace=svc.namespace,
            hostname=f"{svc.name}.{svc.namespace}.svc.{CLUSTER_DOMAIN}",
            vips=svc.vips,
            ports=svc.ports,
            endpoints=endpoints,
            waypoint=waypoint,
            labels=svc.labels,
            selector=svc.selector,
        )))

    for (sl_ns, name), slices in sorted(slices_by_service.items()):
        if not any(s.namespace == sl_ns and s.name == name for s in parsed.services):
            for sl in slices:
                problems.append(Problem(sl.origin, "EndpointSlice", f"{sl_ns}/{sl.name}",
                                        f"metadata.labels.{SERVICE_NAME_LABEL}",
                                        f"names service {sl_ns}/{name}, which does not exist",
                                        severity="warning"))

    routing_objs = [obj for _o, obj in parsed.routing]
    _check_subsets(parsed, problems)
    return Snapshot(
        workloads=tuple(sorted(workloads.values(), key=lambda w: w.uid)),
        services=tuple(sorted(services, key=lambda s: s.key)),
        authorization_policies=tuple(sorted(parsed.authz, key=lambda p: p.key)),
        peer_authentications=tuple(sorted(parsed.peer_authn, key=lambda p: p.key)),
        routing=tuple(sorted(routing_objs, key=lambda o: (type(o).__name__, o.key))),
        root_namespace=root_namespace,
    )


def _owner(item: _Pod | _Service) -> str:
    kind = "Pod" if isinstance(item, _Pod) else "Service"
    return f"{kind} {item.namespace}/{item.name} ({item.origin})"


def _port_map(svc: _Service, wl: Workload) -> dict[int, int]:
    out: dict[int, int] = {}
    for p in svc.ports:
        if isinstance(p.target_port, int):
            out[p.port] = p.target_port
        elif p.target_port in wl.named_ports:
            out[p.port] = wl.named_ports[p.target_port]
    return out


def _endpoint_ips(svc: _Service, ips: Iterable[str]) -> list[str]:
    """The addresses whose family one of the service's VIPs shares (all when headless)."""
    return [ip for ip in ips if not svc.vips or any(_same_family(ip, v) for v in svc.vips)]


def _selector_endpoints(
    svc: _Service, by_label: Mapping[tuple[str, str, str], list[Workload]], memo: _Memo
) -> tuple[Endpoint, ...]:
    if not svc.selector:
        return ()
    rarest: list[Workload] | None = None
    for k, v in svc.selector.items():
        found = by_label.get((svc.namespace, k, v), [])
        if rarest is None or len(found) < len(rarest):
            rarest = found
    candidates = tuple(rarest or ())
    return memo.selected(svc, candidates, lambda: tuple(
        memo.endpoint(wl.uid, ip, _port_map(svc, wl), wl.healthy)
        for wl in candidates if _matches(svc.selector, wl.labels)
        for ip in _endpoint_ips(svc, wl.ips)
    ))


def _slice_endpoints(
    svc: _Service,
    slices: list[_Slice],
    workloads: Mapping[str, Workload],
    pods_by_name: Mapping[tuple[str, str], Workload],
    by_ip: Mapping[str, Workload],
    problems: list[Problem],
    memo: _Memo,
) -> tuple[Endpoint, ...]:
    out: list[Endpoint] = []
    for sl in slices:
        ports: dict[int, int] = {}
        for p in svc.ports:
            if p.name in sl.ports:
                ports[p.port] = sl.ports[p.name]
            elif len(svc.ports) == 1 and len(sl.ports) == 1:
                ports[p.port] = next(iter(sl.ports.values()))
        for i, e in enumerate(sl.endpoints):
            for addr in _endpoint_ips(svc, e.addresses):
                wl = (workloads.get(e.target_uid) if e.target_uid else None) or (
                    pods_by_name.get(e.target) if e.target else None) or by_ip.get(addr)
                if wl is None:
                    problems.append(Problem(
                        sl.origin, "EndpointSlice", f"{sl.namespace}/{sl.name}",
                        f"endpoints[{i}]", f"address {addr} belongs to no known pod; skipped",
                        "the mesh only routes to pods it knows (add the Pod, or fix targetRef)",
                        "warning"))
                    continue
                out.append(memo.endpoint(wl.uid, addr, ports, e.ready and wl.healthy))
    return tuple(sorted(out, key=lambda e: (e.workload_uid, e.address)))


def _fqdn(host: str, namespace: str) -> str:
    if "." not in host and host != "*":
        return f"{host}.{namespace}.svc.{CLUSTER_DOMAIN}"
    return host


def _check_subsets(parsed: _Parsed, problems: list[Problem]) -> None:
    subsets: dict[str, set[str]] = defaultdict(set)
    for _origin, obj in parsed.routing:
        if isinstance(obj, routing.DestinationRule):
            subsets[_fqdn(obj.host, obj.namespace)] |= {s.name for s in obj.subsets}
    for origin, obj in parsed.routing:
        if not isinstance(obj, routing.VirtualService):
            continue
        refs: list[tuple[str, routing.Destination]] = []
        for i, http in enumerate(obj.http):
            refs += [(f"spec.http[{i}].route[{j}].destination", d.destination)
                     for j, d in enumerate(http.route)]
            if http.mirror:
                refs.append((f"spec.http[{i}].mirror", http.mirror))
            refs += [(f"spec.http[{i}].mirrors[{j}].destination", m.destination)
                     for j, m in enumerate(http.mirrors)]
        for i, tcp in enumerate(obj.tcp):
            refs += [(f"spec.tcp[{i}].route[{j}].destination", d.destination)
                     for j, d in enumerate(tcp.route)]
        for i, tls in enumerate(obj.tls):
            refs += [(f"spec.tls[{i}].route[{j}].destination", d.destination)
                     for j, d in enumerate(tls.route)]
        for path, dest in refs:
            if dest.subset is None:
                continue
            host = _fqdn(dest.host, obj.namespace)
            if dest.subset not in subsets.get(host, set()):
                problems.append(Problem(
                    origin, "VirtualService", obj.key, f"{path}.subset",
                    f"subset {dest.subset!r} of host {host} is not defined by any "
                    "DestinationRule",
                    f"add subset {dest.subset!r} to a DestinationRule for host {dest.host}, "
                    "or fix the name"))
