"""One demo run: its state directory, its topology, its processes.

The state directory (``$ZTUNNEL_DEMO_DIR``, default ``/run/ztunnel-py/demo``)
holds ``state.json`` (prefix, topology facts, the PIDs this run started),
``config/`` (Kubernetes-shaped YAML of the demo's world, which the controller
reads) and ``logs/`` (one file per process). Processes are detached from the
CLI (own session) and killed by PID, checked against their start time, on
``down``.

The prefix is written to ``state.json`` before anything is built, so a run that
crashes half-way is still found and swept by the next ``up`` or ``down``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ztunnel_py.config import HBONE_PORT
from ztunnel_py.demo import bookinfo, httpservice
from ztunnel_py.demo.configdir import ObjectRef, ref_of, write_objects
from ztunnel_py.demo.mesh import DemoMesh
from ztunnel_py.demo.world import (
    BOOKINFO,
    DEFAULT_WORLD,
    DEMO_CLIENT,
    DEMO_SERVER,
    DemoPod,
    World,
    manifests,
)
from ztunnel_py.demo.world import topology_spec as world_topology_spec
from ztunnel_py.topology import (
    Topology,
    TopologyError,
    leftovers,
    new_prefix,
    sweep,
)

DEFAULT_STATE_DIR = Path("/run/ztunnel-py/demo")
STATE_FILE = "state.json"

Say = Callable[[str], None]


class DemoError(Exception):
    """The demo can't do what was asked; the message says what to do instead."""


class AlreadyUp(DemoError):
    pass


def state_dir_from_env() -> Path:
    return Path(os.environ.get("ZTUNNEL_DEMO_DIR") or DEFAULT_STATE_DIR)


def pod_command(world: World, pod: DemoPod) -> list[str]:
    """What ``pod`` runs: the helloworld service, or its part of bookinfo with its address book."""
    if pod.program == BOOKINFO:
        return bookinfo.command(pod.app, pod.name, pod.version, pod.port,
                                world.address_book(pod))
    return httpservice.command(pod.name, pod.version, pod.port)


class DemoRun:
    def __init__(self, state_dir: Path, world: World = DEFAULT_WORLD) -> None:
        self.state_dir = state_dir
        self.world = world

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    @property
    def config_dir(self) -> Path:
        return self.state_dir / "config"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    # -- state ------------------------------------------------------------------

    def load(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise DemoError(
                f"{self.state_file} is unreadable ({exc}); remove it and any leftovers with "
                "`ztunnel-py demo down`"
            ) from exc
        return data

    def _save(self, data: dict[str, Any]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.state_file)

    def _save_topology(self, topo: Topology, phase: str) -> None:
        self._save(
            {
                "prefix": topo.prefix,
                "phase": phase,
                "config_dir": str(self.config_dir),
                "topology": topo.to_dict(),
            }
        )

    def is_up(self) -> bool:
        data = self.load()
        return bool(data and data.get("phase") == "up" and leftovers(data["prefix"]))

    # -- up -----------------------------------------------------------------------

    def mesh(self, topo: Topology) -> DemoMesh:
        return DemoMesh(topo, self.state_dir, self.config_dir, self.logs_dir)

    def up(self, say: Say = print, *, mesh: bool = True) -> Topology:
        """Build the world, start its services, write its config; returns the topology."""
        data = self.load()
        if data is not None:
            if self.is_up():
                raise AlreadyUp(
                    f"the demo is already up (prefix {data['prefix']}, state in "
                    f"{self.state_dir}); see `ztunnel-py demo status`, or "
                    "`ztunnel-py demo down` first"
                )
            say(f"removing what an earlier demo run left behind (prefix {data.get('prefix')})")
            self.down(say=lambda _: None)
        prefix = new_prefix("zd")
        self._save({"prefix": prefix, "phase": "building", "config_dir": str(self.config_dir)})
        say(f"building nodes {', '.join(self.world.nodes)} and their pods (prefix {prefix})")
        topo = Topology.build(world_topology_spec(self.world, prefix))
        self._save_topology(topo, "building")
        try:
            self._start_services(topo)
            self._write_config(topo)
            if mesh:
                waypoints = ", ".join(f"{w.namespace}/{w.name} on {w.node}"
                                      for w in self.world.waypoints)
                say("starting the controller on node1, an agent (eBPF capture) per node"
                    + (f" and the waypoint(s) {waypoints}" if waypoints else ""))
                self.mesh(topo).start(self.start, waypoints=self.world.waypoints)
            self._save_topology(topo, "up")
        except BaseException:
            self._save_topology(topo, "failed")
            raise
        say(f"state in {self.state_dir}; config (Kubernetes YAML) in {self.config_dir}")
        return topo

    def start(self, topo: Topology, target: str, name: str, argv: Sequence[str]) -> None:
        """Start a detached process in a pod or node, logged to ``logs/<name>.log``."""
        topo.popen(target, argv, log=self.logs_dir / f"{name}.log", detach=True)
        self._save_topology(topo, "building")

    def _start_services(self, topo: Topology) -> None:
        for p in self.world.pods:
            self.start(topo, p.name, p.name, pod_command(self.world, p))
        for p in self.world.pods:
            topo.wait_listening(p.name, p.port, timeout=15)

    def _write_config(self, topo: Topology) -> None:
        objs = manifests(self.world, topo.layout)
        write_objects(self.config_dir, [(ref_of(o, "demo world"), o) for o in objs])

    def world_refs(self, topo: Topology) -> list[ObjectRef]:
        return [ref_of(o, "demo world") for o in manifests(self.world, topo.layout)]

    def topology(self) -> Topology:
        data = self.load()
        if data is None or "topology" not in data:
            raise DemoError(f"no demo is up (no state in {self.state_dir}); `ztunnel-py demo up`")
        return Topology.attach(data["topology"])

    # -- the request it shows -------------------------------------------------------

    def show_request(self, topo: Topology, say: Say = print, attempts: int = 3) -> bool:
        client, server = topo.pod(DEMO_CLIENT), topo.pod(DEMO_SERVER)
        port = self.world.pod(DEMO_SERVER).port
        argv = ["curl", "-sS", "-i", "--max-time", "5", f"http://{server.ip}:{port}/"]
        say(
            f"\n$ # in pod {client.namespace}/{client.name} on {client.node}, "
            f"to {server.namespace}/{server.name} on {server.node}:\n$ {' '.join(argv)}"
        )
        for attempt in range(attempts):
            done = topo.run(client, argv, timeout=10)
            if done.returncode == 0:
                say(done.stdout.replace("\r\n", "\n").rstrip())
                say(f"\ncross-node request OK: {client.node} -> {server.node}")
                return True
            if attempt + 1 < attempts:
                time.sleep(0.5)
        say(f"cross-node request FAILED (curl exit {done.returncode}): {done.stderr.strip()}")
        return False

    # -- status ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        data = self.load()
        if data is None:
            return {"up": False, "state_dir": str(self.state_dir)}
        out: dict[str, Any] = {
            "up": self.is_up(),
            "phase": data.get("phase"),
            "prefix": data["prefix"],
            "state_dir": str(self.state_dir),
            "config_dir": data.get("config_dir", str(self.config_dir)),
        }
        if "topology" not in data:
            return out
        topo = Topology.attach(data["topology"])
        lay = topo.layout
        ports = {p.name: p.port for p in self.world.pods}
        ports |= {w.pod: HBONE_PORT for w in self.world.waypoints}
        out["underlay"] = {
            "netns": lay.underlay.netns,
            "bridge": lay.underlay.bridge,
            "cidr": lay.underlay.cidr,
        }
        out["nodes"] = [
            {
                "name": n.name,
                "netns": n.netns,
                "ip": n.underlay_ip,
                "underlay_iface": n.underlay_iface,
                "pod_cidr": n.pod_cidr,
                "pod_gateway": n.pod_gateway,
                "cgroup": str(topo.cgroup_of(n)),
            }
            for n in lay.nodes
        ]
        out["pods"] = [
            {
                "name": p.name,
                "namespace": p.namespace,
                "service_account": p.service_account,
                "labels": dict(p.labels),
                "node": p.node,
                "netns": p.netns,
                "ip": p.ip,
                "iface": p.iface,
                "host_veth": p.host_veth,
                "cgroup": str(topo.cgroup_of(p)),
                "ports": [ports[p.name]] if p.name in ports else [],
            }
            for p in lay.pods
        ]
        out["services"] = [
            {
                "name": s.name,
                "namespace": s.namespace,
                "vip": s.vip,
                "selector": dict(s.selector),
                "ports": [
                    {"name": sp.name, "port": sp.port, "target_port": sp.target_port,
                     "protocol": sp.protocol}
                    for sp in s.ports
                ],
            }
            for s in self.world.services
        ]  # fmt: skip
        out["waypoints"] = [
            {"name": w.name, "namespace": w.namespace, "node": w.node, "pod": w.pod,
             "service_account": w.service_account, "ip": lay.pod(w.pod).ip,
             "hbone_port": HBONE_PORT,
             "used_by": sorted(ns for ns, labels in self.world.namespaces.items()
                               if labels.get("istio.io/use-waypoint") == w.name
                               and ns == w.namespace)}
            for w in self.world.waypoints
        ]  # fmt: skip
        out["processes"] = [
            {"pid": r.pid, "start": r.start, "target": r.target, "argv": list(r.argv),
             "log": r.log, "alive": r.alive()}
            for r in topo.processes
        ]  # fmt: skip
        return out

    # -- down -----------------------------------------------------------------------

    def down(self, say: Say = print) -> list[str]:
        """Kill the run's processes, remove its namespaces, cgroups and state; errors."""
        data = self.load()
        if data is None:
            say(f"no demo state in {self.state_dir}; nothing to tear down")
            return []
        prefix = data["prefix"]
        errors: list[str] = []
        if "topology" in data:
            try:
                Topology.attach(data["topology"]).teardown()
            except TopologyError as exc:
                errors.append(str(exc))
        errors += sweep(prefix)
        left = leftovers(prefix)
        if left:
            errors.append("still present: " + ", ".join(left))
            say(f"demo {prefix}: could not remove everything; state kept for a retry")
            return errors
        for sub in (self.config_dir, self.logs_dir):
            shutil.rmtree(sub, ignore_errors=True)
        self.state_file.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty (someone else's files) or gone
            self.state_dir.rmdir()
        say(f"demo {prefix} is down: processes, namespaces, links and cgroups removed")
        return errors
