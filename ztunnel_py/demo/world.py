"""The demo's world: which pods run where, which services front them.

Pure: the world turns into a :class:`TopologySpec` (what to build) and, once
the topology's addresses are known, into Kubernetes-shaped objects (what the
controller reads from the demo's config directory, exactly as it would read
them from a cluster). Directory mode has no IPAM, so each Pod carries its IP in
``status.podIP``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ztunnel_py.config import HBONE_PORT
from ztunnel_py.topology import Layout, NodeSpec, PodSpec, TopologySpec

AMBIENT = MappingProxyType({"istio.io/dataplane-mode": "ambient"})
APP_PORT = 8080
BOOKINFO_PORT = 9080
HTTPSERVICE, BOOKINFO = "httpservice", "bookinfo"  # what a pod runs (ztunnel_py.demo.<it>)
BOOKINFO_NS, BOOKINFO_WAYPOINT = "bookinfo", "waypoint"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
_UID_NAMESPACE = uuid.UUID("6f1d0b0e-3c55-4a8e-9a57-2a7e5b0c9d11")


@dataclass(frozen=True)
class DemoPod:
    name: str
    namespace: str
    node: str
    app: str
    version: str
    service_account: str
    port: int = APP_PORT
    program: str = HTTPSERVICE  # the demo module the pod runs: HTTPSERVICE or BOOKINFO
    calls: tuple[str, ...] = ()  # services (same namespace) whose VIP the pod is told


@dataclass(frozen=True)
class ServicePortDef:
    name: str
    port: int
    target_port: int
    protocol: str = "TCP"


@dataclass(frozen=True)
class DemoService:
    name: str
    namespace: str
    vip: str
    selector: Mapping[str, str] = field(hash=False)
    ports: tuple[ServicePortDef, ...]


@dataclass(frozen=True)
class DemoWaypoint:
    """A namespace's waypoint: a Gateway of class istio-waypoint and one pod running it.

    The pod carries the Gateway's name label (how the controller finds it and keeps the
    agents' capture off it) and runs ``ztunnel-py waypoint`` as service account ``name``.
    Whatever should use it says so with ``istio.io/use-waypoint: <name>``.
    """

    name: str
    namespace: str
    node: str

    @property
    def pod(self) -> str:
        return f"waypoint-{self.namespace}-{self.name}"

    @property
    def service_account(self) -> str:
        return self.name


@dataclass(frozen=True)
class World:
    namespaces: Mapping[str, Mapping[str, str]] = field(hash=False)  # name -> labels
    nodes: tuple[str, ...]
    pods: tuple[DemoPod, ...]
    services: tuple[DemoService, ...]
    waypoints: tuple[DemoWaypoint, ...] = ()

    def pod(self, name: str) -> DemoPod:
        for p in self.pods:
            if p.name == name:
                return p
        raise KeyError(name)

    def service(self, name: str, namespace: str) -> DemoService:
        for s in self.services:
            if (s.name, s.namespace) == (name, namespace):
                return s
        raise KeyError(f"{namespace}/{name}")

    def address_book(self, pod: DemoPod) -> dict[str, str]:
        """What ``pod`` is told about the services it calls: name -> "VIP:port"."""
        book = {}
        for name in pod.calls:
            svc = self.service(name, pod.namespace)
            book[name] = f"{svc.vip}:{svc.ports[0].port}"
        return book

    def waypoint(self, name: str, namespace: str) -> DemoWaypoint:
        for w in self.waypoints:
            if (w.name, w.namespace) == (name, namespace):
                return w
        raise KeyError(f"{namespace}/{name}")


def _http_service(name: str, namespace: str, vip: str, port: int, target_port: int
                  ) -> DemoService:
    return DemoService(name, namespace, vip, MappingProxyType({"app": name}),
                       (ServicePortDef("http", port, target_port),))


def _bookinfo(name: str, node: str, app: str, version: str, *calls: str) -> DemoPod:
    return DemoPod(name, BOOKINFO_NS, node, app, version, f"bookinfo-{app}",
                   port=BOOKINFO_PORT, program=BOOKINFO, calls=calls)


# Istio's bookinfo, in small, behind its namespace's waypoint (ztunnel_py.demo.bookinfo).
DEFAULT_WORLD = World(
    # `demo` starts outside the mesh; `demo up` labels it ambient as part of the story.
    namespaces=MappingProxyType({
        "demo": MappingProxyType({}),
        "other": AMBIENT,
        BOOKINFO_NS: MappingProxyType({**AMBIENT, "istio.io/use-waypoint": BOOKINFO_WAYPOINT}),
    }),
    nodes=("node1", "node2"),
    pods=(
        DemoPod("client", "demo", "node1", "client", "v1", "client"),
        DemoPod("helloworld-v1", "demo", "node2", "helloworld", "v1", "helloworld"),
        DemoPod("helloworld-v2", "demo", "node1", "helloworld", "v2", "helloworld"),
        DemoPod("visitor", "other", "node2", "visitor", "v1", "visitor"),
        _bookinfo("productpage-v1", "node1", "productpage", "v1", "reviews"),
        _bookinfo("reviews-v1", "node2", "reviews", "v1"),
        _bookinfo("reviews-v2", "node1", "reviews", "v2", "ratings"),
        _bookinfo("reviews-v3", "node2", "reviews", "v3", "ratings"),
        _bookinfo("ratings-v1", "node1", "ratings", "v1"),
    ),
    services=(
        _http_service("helloworld", "demo", "10.96.0.10", 80, APP_PORT),
        _http_service("visitor", "other", "10.96.0.11", 80, APP_PORT),
        _http_service("productpage", BOOKINFO_NS, "10.96.0.20", BOOKINFO_PORT, BOOKINFO_PORT),
        _http_service("reviews", BOOKINFO_NS, "10.96.0.21", BOOKINFO_PORT, BOOKINFO_PORT),
        _http_service("ratings", BOOKINFO_NS, "10.96.0.22", BOOKINFO_PORT, BOOKINFO_PORT),
    ),
    waypoints=(DemoWaypoint(BOOKINFO_WAYPOINT, BOOKINFO_NS, "node2"),),
)

# The request `demo up` shows: a pod on node1 to a pod on node2.
DEMO_CLIENT, DEMO_SERVER = "client", "helloworld-v1"


def topology_spec(world: World, prefix: str) -> TopologySpec:
    return TopologySpec(
        tuple(
            NodeSpec(
                node,
                tuple(
                    PodSpec(
                        p.name,
                        namespace=p.namespace,
                        service_account=p.service_account,
                        app=p.app,
                        version=p.version,
                    )
                    for p in world.pods
                    if p.node == node
                )
                + tuple(
                    PodSpec(
                        w.pod,
                        namespace=w.namespace,
                        service_account=w.service_account,
                        labels={GATEWAY_NAME_LABEL: w.name},
                    )
                    for w in world.waypoints
                    if w.node == node
                ),
            )
            for node in world.nodes
        ),
        prefix=prefix,
    )


def _uid(prefix: str, *parts: str) -> str:
    return str(uuid.uuid5(_UID_NAMESPACE, "/".join((prefix, *parts))))


def manifests(world: World, layout: Layout) -> list[dict[str, Any]]:
    """Kubernetes-shaped objects for the world as built (IPs from ``layout``)."""
    objs: list[dict[str, Any]] = []
    for ns, labels in world.namespaces.items():
        objs.append(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns, **labels}},
            }
        )
    for node in layout.nodes:
        objs.append(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name}},
                "spec": {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr]},
                "status": {"addresses": [{"type": "InternalIP", "address": node.underlay_ip}]},
            }
        )
    accounts = {(p.namespace, p.service_account) for p in world.pods}
    accounts |= {(w.namespace, w.service_account) for w in world.waypoints}
    for ns, sa in sorted(accounts):
        objs.append(
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": sa, "namespace": ns},
            }
        )
    containers = [(p.name, p.namespace, p.service_account, f"ztunnel-py/demo-{p.program}",
                   ("http", p.port)) for p in world.pods]
    containers += [(w.pod, w.namespace, w.service_account, "ztunnel-py", ("hbone", HBONE_PORT))
                   for w in world.waypoints]
    for name, namespace, account, image, (port_name, port) in containers:
        built = layout.pod(name)
        node = layout.node(built.node)
        objs.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "uid": _uid(layout.prefix, "pod", namespace, name),
                    "labels": dict(built.labels),
                },
                "spec": {
                    "nodeName": built.node,
                    "serviceAccountName": account,
                    "containers": [
                        {
                            "name": "app",
                            "image": image,
                            "ports": [{"name": port_name, "containerPort": port,
                                       "protocol": "TCP"}],
                        }
                    ],
                },
                "status": {
                    "phase": "Running",
                    "hostIP": node.underlay_ip,
                    "podIP": built.ip,
                    "podIPs": [{"ip": built.ip}],
                },
            }
        )
    for w in world.waypoints:
        objs.append(
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "metadata": {"name": w.name, "namespace": w.namespace,
                             "labels": {"istio.io/waypoint-for": "service"}},
                "spec": {
                    "gatewayClassName": "istio-waypoint",
                    "listeners": [{"name": "mesh", "port": HBONE_PORT, "protocol": "HBONE"}],
                },
            }
        )
    for s in world.services:
        objs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": s.name,
                    "namespace": s.namespace,
                    "uid": _uid(layout.prefix, "service", s.namespace, s.name),
                    "labels": {"app": s.name},
                },
                "spec": {
                    "type": "ClusterIP",
                    "clusterIP": s.vip,
                    "clusterIPs": [s.vip],
                    "selector": dict(s.selector),
                    "ports": [
                        {
                            "name": sp.name,
                            "port": sp.port,
                            "targetPort": sp.target_port,
                            "protocol": sp.protocol,
                        }
                        for sp in s.ports
                    ],
                },
            }
        )
    return objs
