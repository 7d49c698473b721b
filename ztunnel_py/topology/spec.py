"""What a topology is: the spec you ask for, and the facts it turns into.

Pure: :func:`plan` maps a :class:`TopologySpec` to a :class:`Layout` (every
name and address decided up front) without touching the host, so the naming
and addressing rules are unit-testable and other parts can know a pod's IP or
its node's host-side veth before anything exists.

Addressing (like Calico): a pod holds its IP as a /32 on ``eth0`` with a
default route via its node's gateway address (``10.244.<n>.1``, held on the
node's ``lo``; the node answers ARP for it on every host veth). The node has a
/32 route per local pod on the pod's host-side veth, ``ip_forward`` on, and a
route per other node's pod CIDR via that node's underlay IP. Every packet a pod
sends therefore enters its node through the host-side veth, which is where tc
capture attaches.

Names: netns ``<prefix>-<node>``, ``<prefix>-<pod>``, ``<prefix>-ul``; in the
underlay netns the bridge ``<prefix>br`` and node ports ``<prefix>b<n>``; in a
node netns its underlay-facing veth ``<prefix>u<n>`` and one host-side veth per
pod ``<prefix>p<k>`` (k counts pods across the topology); ``eth0`` in a pod.
Cgroups (v2): ``<cgroup2 mount>/<prefix>/<pod>`` and ``<prefix>/<node>``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

IFNAMSIZ = 15  # usable characters in a Linux interface name
POD_IFACE = "eth0"

_PREFIX = re.compile(r"^[a-z][a-z0-9]{1,9}$")
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
# Suffixes this module gives interfaces after the prefix (used by the sweep).
IFACE_SUFFIX = re.compile(r"^(br|b\d+|u\d+|p\d+)$")


class SpecError(ValueError):
    """The requested topology cannot be built as written; the message says why."""


def new_prefix(stem: str = "zt") -> str:
    """A fresh random run prefix, e.g. ``zt3f9a1c``."""
    return check_prefix(stem + secrets.token_hex(3))


def prefix_for(key: str, stem: str = "zt") -> str:
    """A stable prefix derived from ``key`` (a test's node id): same test, same prefix.

    Re-running a test after a crash therefore finds, and sweeps, its own leftovers.
    """
    return check_prefix(stem + hashlib.sha256(key.encode()).hexdigest()[:6])


def check_prefix(prefix: str) -> str:
    if not _PREFIX.match(prefix):
        raise SpecError(
            f"prefix {prefix!r}: expected 2-10 characters, a lowercase letter then "
            "lowercase letters or digits (it starts every interface name, max 15 chars)"
        )
    return prefix


# -- what you ask for ---------------------------------------------------------


def _frozen_labels(labels: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(labels or {}))


@dataclass(frozen=True)
class PodSpec:
    name: str
    namespace: str = "default"
    service_account: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    app: str | None = None
    version: str | None = None

    def effective_labels(self) -> Mapping[str, str]:
        merged = dict(self.labels)
        if self.app is not None:
            merged.setdefault("app", self.app)
        if self.version is not None:
            merged.setdefault("version", self.version)
        return _frozen_labels(merged)


@dataclass(frozen=True)
class NodeSpec:
    name: str
    pods: tuple[PodSpec, ...] = ()


@dataclass(frozen=True)
class TopologySpec:
    nodes: tuple[NodeSpec, ...]
    prefix: str = field(default_factory=new_prefix)
    underlay_cidr: str = "172.30.0.0/24"
    first_node_host: int = 10  # node n (1-based) gets host address first_node_host + n
    pod_cidr_base: str = "10.244.0.0/16"  # node n gets the /24 number n inside it

    @staticmethod
    def simple(
        nodes: int, pods_per_node: int, *, prefix: str | None = None, namespace: str = "default"
    ) -> TopologySpec:
        """``nodes`` nodes named node1.., each with pods named ``<node>-pod<j>``."""
        specs = tuple(
            NodeSpec(
                f"node{n}",
                tuple(
                    PodSpec(f"node{n}-pod{j}", namespace=namespace, app=f"node{n}-pod{j}")
                    for j in range(1, pods_per_node + 1)
                ),
            )
            for n in range(1, nodes + 1)
        )
        return TopologySpec(specs, prefix=prefix or new_prefix())


# -- what you get (plain frozen facts) ----------------------------------------


@dataclass(frozen=True)
class Underlay:
    netns: str
    bridge: str
    cidr: str


@dataclass(frozen=True)
class Node:
    name: str
    index: int  # 1-based
    netns: str
    underlay_ip: str
    underlay_prefixlen: int
    underlay_iface: str  # in the node netns, facing the underlay bridge
    underlay_peer: str  # its peer, a port of the bridge in the underlay netns
    pod_cidr: str
    pod_gateway: str  # held by the node (on lo); pods' default route
    cgroup: str  # relative to the cgroup2 mount


@dataclass(frozen=True)
class Pod:
    name: str
    node: str
    netns: str
    ip: str
    iface: str  # in the pod netns
    host_veth: str  # its peer, in the node netns
    namespace: str  # Kubernetes namespace
    service_account: str
    labels: Mapping[str, str] = field(hash=False)
    cgroup: str  # relative to the cgroup2 mount

    @property
    def app(self) -> str | None:
        return self.labels.get("app")

    @property
    def version(self) -> str | None:
        return self.labels.get("version")


@dataclass(frozen=True)
class Layout:
    """Every name and address of one topology, decided before anything is made."""

    prefix: str
    underlay: Underlay
    nodes: tuple[Node, ...]
    pods: tuple[Pod, ...]

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node {name!r} (nodes: {', '.join(n.name for n in self.nodes)})")

    def pod(self, name: str) -> Pod:
        for p in self.pods:
            if p.name == name:
                return p
        raise KeyError(f"no pod {name!r} (pods: {', '.join(p.name for p in self.pods)})")

    def pods_on(self, node: str) -> tuple[Pod, ...]:
        return tuple(p for p in self.pods if p.node == node)

    def node_of(self, pod: str) -> Node:
        return self.node(self.pod(pod).node)

    def netns_names(self) -> tuple[str, ...]:
        """Pods first, then nodes, then the underlay: the order to delete them in."""
        return (
            *(p.netns for p in self.pods),
            *(n.netns for n in self.nodes),
            self.underlay.netns,
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "prefix": self.prefix,
            "underlay": vars(self.underlay).copy(),
            "nodes": [vars(n).copy() for n in self.nodes],
            "pods": [{**vars(p), "labels": dict(p.labels)} for p in self.pods],
        }

    @staticmethod
    def from_dict(data: Mapping[str, object]) -> Layout:
        try:
            underlay = Underlay(**data["underlay"])  # type: ignore[arg-type]
            nodes = tuple(Node(**n) for n in data["nodes"])  # type: ignore[attr-defined]
            pods = tuple(
                Pod(**{**p, "labels": _frozen_labels(p["labels"])})
                for p in data["pods"]  # type: ignore[attr-defined]
            )
            return Layout(str(data["prefix"]), underlay, nodes, pods)
        except (KeyError, TypeError) as exc:
            raise SpecError(f"not a saved topology layout: {exc}") from exc


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name):
        raise SpecError(
            f"{kind} name {name!r}: expected lowercase letters, digits and '-', "
            "at most 40 characters (it becomes part of a network namespace name)"
        )


def _iface(prefix: str, suffix: str) -> str:
    name = prefix + suffix
    if len(name) > IFNAMSIZ:
        raise SpecError(
            f"interface name {name!r} is longer than {IFNAMSIZ} characters; use a shorter prefix"
        )
    return name


def _unique(kind: str, names: Iterable[str]) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise SpecError(f"{kind} name {n!r} is used twice; names must be unique")
        seen.add(n)


def plan(spec: TopologySpec) -> Layout:
    """Decide every name and address of ``spec``; raises :class:`SpecError` if it can't."""
    prefix = check_prefix(spec.prefix)
    if not spec.nodes:
        raise SpecError("a topology needs at least one node")
    names = [ns.name for ns in spec.nodes] + [ps.name for ns in spec.nodes for ps in ns.pods]
    for node_spec in spec.nodes:
        _check_name("node", node_spec.name)
        for pod_spec in node_spec.pods:
            _check_name("pod", pod_spec.name)
    _unique("node/pod", [*names, "ul"])

    underlay_net = ipaddress.ip_network(spec.underlay_cidr)
    pod_base = ipaddress.ip_network(spec.pod_cidr_base)
    if pod_base.prefixlen > 16 or len(spec.nodes) > 250:
        raise SpecError("pod_cidr_base must be a /16 or wider and there can be at most 250 nodes")
    underlay = Underlay(netns=f"{prefix}-ul", bridge=_iface(prefix, "br"), cidr=str(underlay_net))

    nodes: list[Node] = []
    pods: list[Pod] = []
    k = 0
    for n, ns in enumerate(spec.nodes, start=1):
        host = spec.first_node_host + n
        if host >= underlay_net.num_addresses - 1:
            raise SpecError(f"underlay {underlay_net} has no room for node {n}")
        pod_cidr = ipaddress.ip_network(f"{pod_base.network_address + (n << 8)}/24")
        if len(ns.pods) > 250:
            raise SpecError(f"node {ns.name}: at most 250 pods per node")
        nodes.append(
            Node(
                name=ns.name,
                index=n,
                netns=f"{prefix}-{ns.name}",
                underlay_ip=str(underlay_net.network_address + host),
                underlay_prefixlen=underlay_net.prefixlen,
                underlay_iface=_iface(prefix, f"u{n}"),
                underlay_peer=_iface(prefix, f"b{n}"),
                pod_cidr=str(pod_cidr),
                pod_gateway=str(pod_cidr.network_address + 1),
                cgroup=f"{prefix}/{ns.name}",
            )
        )
        for j, ps in enumerate(ns.pods, start=2):
            pods.append(
                Pod(
                    name=ps.name,
                    node=ns.name,
                    netns=f"{prefix}-{ps.name}",
                    ip=str(pod_cidr.network_address + j),
                    iface=POD_IFACE,
                    host_veth=_iface(prefix, f"p{k}"),
                    namespace=ps.namespace,
                    service_account=ps.service_account,
                    labels=ps.effective_labels(),
                    cgroup=f"{prefix}/{ps.name}",
                )
            )
            k += 1
    return Layout(prefix, underlay, tuple(nodes), tuple(pods))


def with_pod(layout: Layout, node: str, spec: PodSpec) -> Layout:
    """``layout`` plus one more pod on ``node`` (the next free IP and veth number)."""
    _check_name("pod", spec.name)
    taken = {n.name for n in layout.nodes} | {p.name for p in layout.pods} | {"ul"}
    if spec.name in taken:
        raise SpecError(f"pod name {spec.name!r} is already used in topology {layout.prefix}")
    n = layout.node(node)
    net = ipaddress.ip_network(n.pod_cidr)
    used = {p.ip for p in layout.pods if p.node == node} | {n.pod_gateway}
    free = next((str(a) for a in list(net.hosts())[1:] if str(a) not in used), None)
    if free is None:
        raise SpecError(f"node {node}: no free address left in {net}")
    k = 1 + max((int(p.host_veth[len(layout.prefix) + 1 :]) for p in layout.pods), default=-1)
    pod = Pod(
        name=spec.name,
        node=node,
        netns=f"{layout.prefix}-{spec.name}",
        ip=free,
        iface=POD_IFACE,
        host_veth=_iface(layout.prefix, f"p{k}"),
        namespace=spec.namespace,
        service_account=spec.service_account,
        labels=spec.effective_labels(),
        cgroup=f"{layout.prefix}/{spec.name}",
    )
    return replace(layout, pods=(*layout.pods, pod))


def without_pod(layout: Layout, name: str) -> Layout:
    layout.pod(name)  # KeyError with the known names if absent
    return replace(layout, pods=tuple(p for p in layout.pods if p.name != name))
