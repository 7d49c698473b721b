"""The story ``demo up`` tells once the mesh runs.

1. Before ambient: a request from ``demo/client`` (node1) to ``helloworld-v1``
   (node2) crosses the underlay in plaintext (a tcpdump sees the marker).
2. ``kubectl label namespace demo istio.io/dataplane-mode=ambient``: the agents
   capture the namespace's pods; the same request, now to the Service VIP,
   crosses as TLS on 15008 only, and the marker never appears on the wire.
3. An AuthorizationPolicy lets only namespace ``demo`` reach helloworld:
   ``demo/client`` is allowed, ``other/visitor`` is refused.
4. The metrics those connections produced (Istio's names and labels).

Steps 5-7 (bookinfo behind a waypoint: L7) are ``bookinfo_story``'s; the
steps of both are numbered by one :class:`Steps`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ztunnel_py.demo import wire
from ztunnel_py.demo.configdir import ref_of, write_objects
from ztunnel_py.demo.mesh import DemoMesh
from ztunnel_py.demo.world import AMBIENT, World
from ztunnel_py.topology import Topology

Say = Callable[[str], None]

POLICY_NAME = "helloworld-allow-demo"
STEPS = 4


class Steps:
    """Prints numbered step titles: ``[n/total] title``."""

    def __init__(self, total: int, say: Say) -> None:
        self.total = total
        self.done = 0
        self.say = say

    def __call__(self, title: str) -> None:
        self.done += 1
        self.say(f"\n[{self.done}/{self.total}] {title}")


def ambient_namespace(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, **AMBIENT}},
    }


def allow_only_namespace(service_ns: str, app: str, allowed_ns: str) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": POLICY_NAME, "namespace": service_ns},
        "spec": {
            "selector": {"matchLabels": {"app": app}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"namespaces": [allowed_ns]}}]}],
        },
    }


@dataclass
class Outcome:
    """What the story observed (the end-to-end test asserts on it)."""

    plaintext_marker_seen: bool = False
    plaintext_ports: set[int] = field(default_factory=set)
    mesh_served_by: str = ""
    mesh_marker_seen: bool = True
    mesh_ports: set[int] = field(default_factory=set)
    allowed_ok: bool = False
    denied_refused: bool = False
    metrics: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.plaintext_marker_seen
            and self.mesh_served_by.count("/") == 2
            and not self.mesh_marker_seen
            and self.mesh_ports == {15008}
            and self.allowed_ok
            and self.denied_refused
        )


def curl(topo: Topology, pod: str, url: str, marker: str) -> tuple[int, str]:
    argv = ["curl", "-sS", "-i", "--max-time", "5", "-H", f"x-demo-marker: {marker}", url]
    done = topo.run(pod, argv, timeout=15)
    return done.returncode, (done.stdout or done.stderr).replace("\r\n", "\n")


def _served_by(response: str) -> str:
    for line in response.splitlines():
        if line.lower().startswith("x-served-by:"):
            return line.split(":", 1)[1].strip()
    return ""


def _retry(fn: Callable[[], tuple[int, str]], ok: Callable[[int, str], bool],
           timeout: float) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    while True:
        rc, out = fn()
        if ok(rc, out) or time.monotonic() > deadline:
            return rc, out
        time.sleep(0.3)


def tell(topo: Topology, mesh: DemoMesh, world: World, config_dir: Any, say: Say,
         step: Say | None = None) -> Outcome:
    """Steps 1-4; ``step`` prints a step's numbered title (default: [n/4])."""
    step = step or Steps(STEPS, say)
    out = Outcome()
    client, server = topo.pod("client"), topo.pod("helloworld-v1")
    svc = next(s for s in world.services if s.name == "helloworld")
    vip_url = f"http://{svc.vip}:{svc.ports[0].port}/headers"

    step("before ambient: namespace demo is not in the mesh")
    marker = "plaintext-" + secrets.token_hex(4)
    with wire.capture(topo) as cap:
        rc, resp = curl(topo, "client", f"http://{server.ip}:8080/headers", marker)
    out.plaintext_marker_seen, out.plaintext_ports = cap.saw(marker), cap.ports
    say(f"  client ({client.node}) -> helloworld-v1 ({server.node}) {server.ip}:8080: "
        f"{'OK, served by ' + _served_by(resp) if rc == 0 else 'FAILED: ' + resp.strip()}")
    say(f"  on the underlay: TCP ports {sorted(cap.ports)}; request marker visible on the "
        f"wire: {'YES (plaintext)' if out.plaintext_marker_seen else 'no'}")

    step("kubectl label namespace demo istio.io/dataplane-mode=ambient")
    write_objects(config_dir, [(ref_of(ns, "demo"), ns) for ns in [ambient_namespace("demo")]])
    started = time.monotonic()
    rc, resp = _retry(lambda: curl(topo, "client", vip_url, "warm-up"),
                      lambda rc, _o: rc == 0, timeout=10)
    say(f"  client -> helloworld.demo (VIP {svc.vip}:80) works "
        f"{time.monotonic() - started:.1f}s after labelling (no kube-proxy here: the agent "
        "resolves the VIP)" if rc == 0 else f"  FAILED: {resp.strip()}")
    marker = "encrypted-" + secrets.token_hex(4)
    served: list[str] = []
    with wire.capture(topo) as cap:
        for _ in range(2):  # round robin: one to each endpoint, one of them across nodes
            rc, resp = curl(topo, "client", vip_url, marker)
            if rc == 0:
                served.append(_served_by(resp))
    out.mesh_served_by = ", ".join(served)
    out.mesh_marker_seen, out.mesh_ports = cap.saw(marker), cap.ports
    say(f"  two requests to the VIP, served by: {out.mesh_served_by or 'none (FAILED)'}")
    say(f"  on the underlay: TCP ports {sorted(out.mesh_ports)} (HBONE: TLS 1.3 + HTTP/2 "
        f"CONNECT); request marker visible on the wire: {'YES' if out.mesh_marker_seen else 'no'}")

    step(f"AuthorizationPolicy demo/{POLICY_NAME}: only namespace demo may reach helloworld")
    policy = allow_only_namespace("demo", "helloworld", "demo")
    write_objects(config_dir, [(ref_of(policy, "demo"), policy)])
    time.sleep(1.0)  # debounce + push + swap
    rc, resp = _retry(lambda: curl(topo, "client", vip_url, "allowed"),
                      lambda rc, _o: rc == 0, timeout=5)
    out.allowed_ok = rc == 0
    verdict = "allowed, served by " + _served_by(resp) if rc == 0 else "FAILED: " + resp.strip()
    say(f"  demo/client  -> helloworld: {verdict}")
    rc, resp = _retry(lambda: curl(topo, "visitor", vip_url, "denied"),
                      lambda rc, _o: rc != 0, timeout=5)
    out.denied_refused = rc != 0
    say(f"  other/visitor -> helloworld: "
        f"{'refused (' + resp.strip().splitlines()[-1] + ')' if rc != 0 else 'NOT refused'}")

    step("metrics: istio_tcp_connections_opened_total on each node's agent")
    for node in (n.name for n in topo.nodes):
        for line in mesh.metrics(node).splitlines():
            if line.startswith("istio_tcp_connections_opened_total{"):
                out.metrics.append(f"{node}: {line}")
                say(f"  {node}: {short_metric(line, TCP_LABELS_SHOWN)}")
    return out


TCP_LABELS_SHOWN = ("reporter", "source_workload", "destination_workload",
                    "connection_security_policy", "response_flags")


def short_metric(line: str, keep: tuple[str, ...]) -> str:
    """A Prometheus sample line with only the ``keep`` labels."""
    head, _, rest = line.partition("{")
    labels, _, value = rest.rpartition("}")
    parts = [p for p in labels.split(",") if p.partition("=")[0] in keep]
    return f"{head}{{{','.join(parts)}}}{value}"
