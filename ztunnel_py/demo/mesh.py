"""The mesh inside the demo: a controller on node1, one agent per node, the waypoints.

The controller runs in node1's network namespace (a "control-plane node"),
serving gRPC on node1's underlay address; each agent runs in its node's
namespace (its "host network") with eBPF capture, exactly as the DaemonSet
runs on a real node; a waypoint runs in its own pod, bootstrapped with its node's
token. Everything is started through ``DemoRun.start`` so that
``demo down`` kills it by PID.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ztunnel_py.config import CONTROLLER_GRPC_PORT, METRICS_PORT, READINESS_PORT
from ztunnel_py.demo.world import DemoWaypoint
from ztunnel_py.topology import Topology
from ztunnel_py.topology.sweep import bpf_pin_dir

CONTROLLER_NODE = "node1"

Start = Callable[[Topology, str, str, Sequence[str]], None]


class MeshError(Exception):
    """The demo's controller or agents did not come up; the message says where to look."""


def ztunnel(*args: str) -> list[str]:
    """argv running this installation's ``ztunnel-py``."""
    return [sys.executable, "-m", "ztunnel_py", *args]


class DemoMesh:
    def __init__(self, topo: Topology, state_dir: Path, config_dir: Path, logs_dir: Path) -> None:
        self.topo = topo
        self._token_files: dict[str, str] = {}
        self.controller_state = state_dir / "controller"
        self.config_dir = config_dir
        self.logs_dir = logs_dir

    @property
    def controller_address(self) -> str:
        return f"{self.topo.node(CONTROLLER_NODE).underlay_ip}:{CONTROLLER_GRPC_PORT}"

    def start(self, start: Start, timeout: float = 60.0,
              waypoints: Sequence[DemoWaypoint] = ()) -> None:
        """Start the controller, the agents and the waypoints; return once all are ready."""
        nodes = [n.name for n in self.topo.nodes]
        issued = self.topo.run(
            CONTROLLER_NODE,
            ztunnel("controller", "--state-dir", str(self.controller_state),
                    *[a for n in nodes for a in ("--issue-token", n)]),
            timeout=30,
        )
        if issued.returncode != 0:
            raise MeshError(f"issuing bootstrap tokens failed: {issued.stdout}{issued.stderr}")
        token_files = dict(zip(nodes, issued.stdout.split(), strict=True))
        self._token_files = token_files
        host = self.topo.node(CONTROLLER_NODE).underlay_ip
        start(self.topo, CONTROLLER_NODE, "controller", ztunnel(
            "controller", "--config-dir", str(self.config_dir),
            "--state-dir", str(self.controller_state),
            "--grpc-address", self.controller_address, "--tls-san", host,
        ))
        self.topo.wait_listening(CONTROLLER_NODE, CONTROLLER_GRPC_PORT, timeout=30)
        for node in nodes:
            start(self.topo, node, f"agent-{node}", ztunnel(
                "agent", "--node", node, "--controller", self.controller_address,
                "--controller-ca", str(self.controller_state / "roots.pem"),
                "--token-file", token_files[node], "--capture", "ebpf",
                "--bpf-pin-root", str(bpf_pin_dir(self.topo.prefix)),
            ))
        for wp in waypoints:  # alongside the agents: a waypoint needs only the controller
            self.start_waypoint(start, wp)
        self.wait_ready([*nodes, *(wp.pod for wp in waypoints)], timeout)

    def waypoint_argv(self, wp: DemoWaypoint) -> list[str]:
        """``ztunnel-py waypoint`` as it runs in its pod: identity and config from the
        controller, bootstrapped with its node's token (as the node's agent is)."""
        return ztunnel(
            "waypoint", "--name", wp.name, "--namespace", wp.namespace, "--node", wp.node,
            "--controller", self.controller_address,
            "--controller-ca", str(self.controller_state / "roots.pem"),
            "--token-file", self._token_files[wp.node],
        )

    def start_waypoint(self, start: Start, wp: DemoWaypoint) -> None:
        start(self.topo, wp.pod, wp.pod, self.waypoint_argv(wp))  # logs/<pod>.log

    def ready(self, target: str) -> bool:
        """The readiness endpoint of the agent (a node) or a waypoint (its pod)."""
        done = self.topo.run(target, [
            "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2",
            f"http://127.0.0.1:{READINESS_PORT}/healthz/ready",
        ], timeout=10)
        return done.stdout.strip() == "200"

    def wait_ready(self, targets: Sequence[str], timeout: float) -> None:
        """Until every agent (by node) and waypoint (by pod) is ready."""
        deadline = time.monotonic() + timeout
        pending = list(targets)
        while pending:
            pending = [n for n in pending if not self.ready(n)]
            if not pending:
                return
            if time.monotonic() > deadline:
                logs = ", ".join(str(self.logs_dir / f"{self._process_name(n)}.log")
                                 for n in pending)
                raise MeshError(f"{', '.join(pending)} not ready after "
                                f"{timeout:.0f}s; see {logs}")
            time.sleep(0.3)

    def _process_name(self, target: str) -> str:
        """What runs at ``target``, as its log is named: a node's agent, or a waypoint
        (named after its pod)."""
        return f"agent-{target}" if target in {n.name for n in self.topo.nodes} else target

    def metrics(self, target: str) -> str:
        done = self.topo.run(target, ["curl", "-s", "--max-time", "3",
                                    f"http://127.0.0.1:{METRICS_PORT}/metrics"], timeout=10)
        return done.stdout
