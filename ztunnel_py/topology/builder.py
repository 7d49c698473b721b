"""Build a topology of network namespaces, run processes in it, tear it down.

    spec = TopologySpec.simple(nodes=2, pods_per_node=2, prefix=prefix_for(test_id))
    with Topology.build(spec) as topo:
        topo.popen("node2-pod1", [sys.executable, "-m", "ztunnel_py.demo.httpservice", ...])
        topo.wait_listening("node2-pod1", 8080)
        topo.run("node1-pod1", ["curl", "-s", f"http://{topo.pod('node2-pod1').ip}:8080/"])

See :mod:`ztunnel_py.topology.spec` for the names and the addressing.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from ztunnel_py.topology import host
from ztunnel_py.topology.host import ProcessRecord, TopologyError
from ztunnel_py.topology.spec import (
    Layout,
    Node,
    Pod,
    PodSpec,
    TopologySpec,
    Underlay,
    plan,
    with_pod,
    without_pod,
)
from ztunnel_py.topology.sweep import leftovers, sweep

Target = str | Pod | Node


class TeardownError(TopologyError):
    def __init__(self, prefix: str, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__(
            f"teardown of {prefix} left things behind ({len(errors)} error(s)); "
            f"`ztunnel-py demo down` or topology.sweep({prefix!r}) retries:\n  "
            + "\n  ".join(errors)
        )


class Topology:
    """A built topology: facts (:class:`Layout`) plus the processes started in it."""

    def __init__(
        self,
        layout: Layout,
        cgroup_root: Path,
        processes: Sequence[ProcessRecord] = (),
    ) -> None:
        self.layout = layout
        self.cgroup_root = cgroup_root
        self._records: list[ProcessRecord] = list(processes)
        self._popens: list[tuple[str, subprocess.Popen[Any]]] = []  # (target, process)

    # -- building ---------------------------------------------------------------

    @classmethod
    def build(cls, spec: TopologySpec, *, sweep_first: bool = True) -> Topology:
        """Make every namespace, link, address, route and cgroup of ``spec``.

        On failure whatever was made is removed before the error propagates.
        """
        layout = plan(spec)
        if sweep_first:
            sweep(layout.prefix)
        topo = cls(layout, host.cgroup2_root())
        try:
            topo._make()
        except BaseException:
            with contextlib.suppress(TopologyError):
                topo.teardown()
            raise
        return topo

    @classmethod
    def attach(cls, saved: Mapping[str, Any]) -> Topology:
        """The topology saved by :meth:`to_dict` (possibly by another process)."""
        layout = Layout.from_dict(saved["layout"])
        records = [
            ProcessRecord(
                pid=int(r["pid"]),
                start=r.get("start"),
                target=str(r["target"]),
                argv=tuple(r["argv"]),
                log=r.get("log"),
            )
            for r in saved.get("processes", [])
        ]
        return cls(layout, Path(saved["cgroup_root"]), records)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout.to_dict(),
            "cgroup_root": str(self.cgroup_root),
            "processes": [
                {
                    "pid": r.pid,
                    "start": r.start,
                    "target": r.target,
                    "argv": list(r.argv),
                    "log": r.log,
                }
                for r in self._records
            ],
        }

    def _make(self) -> None:
        lay = self.layout
        (self.cgroup_root / lay.prefix).mkdir()
        ul = lay.underlay
        self._netns(ul.netns)
        host.ip("link", "add", ul.bridge, "type", "bridge", netns=ul.netns)
        host.ip("link", "set", ul.bridge, "up", netns=ul.netns)
        for node in lay.nodes:
            self._make_node(node)
        for node in lay.nodes:
            for other in lay.nodes:
                if other is not node:
                    host.ip(
                        "route", "add", other.pod_cidr, "via", other.underlay_ip,
                        "dev", node.underlay_iface, netns=node.netns,
                    )  # fmt: skip
        for pod in lay.pods:
            self._make_pod(pod, lay.node(pod.node))

    def _netns(self, name: str) -> None:
        host.ip("netns", "add", name)
        host.ip("link", "set", "lo", "up", netns=name)

    def _make_node(self, node: Node) -> None:
        ul = self.layout.underlay
        self._netns(node.netns)
        host.sysctl(
            node.netns,
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        )
        (self.cgroup_root / node.cgroup).mkdir()
        host.ip(
            "link", "add", node.underlay_iface, "netns", node.netns,
            "type", "veth", "peer", "name", node.underlay_peer, "netns", ul.netns,
        )  # fmt: skip
        host.ip("link", "set", node.underlay_peer, "master", ul.bridge, "up", netns=ul.netns)
        host.ip(
            "addr", "add", f"{node.underlay_ip}/{node.underlay_prefixlen}",
            "dev", node.underlay_iface, netns=node.netns,
        )  # fmt: skip
        host.ip("link", "set", node.underlay_iface, "up", netns=node.netns)
        host.ip("addr", "add", f"{node.pod_gateway}/32", "dev", "lo", netns=node.netns)

    def _make_pod(self, pod: Pod, node: Node) -> None:
        self._netns(pod.netns)
        (self.cgroup_root / pod.cgroup).mkdir()
        host.ip(
            "link", "add", pod.iface, "netns", pod.netns,
            "type", "veth", "peer", "name", pod.host_veth, "netns", node.netns,
        )  # fmt: skip
        host.ip("link", "set", pod.host_veth, "up", netns=node.netns)
        host.ip(
            "route", "add", f"{pod.ip}/32", "dev", pod.host_veth, "scope", "link",
            "src", node.pod_gateway, netns=node.netns,
        )  # fmt: skip
        host.ip("addr", "add", f"{pod.ip}/32", "dev", pod.iface, netns=pod.netns)
        host.ip("link", "set", pod.iface, "up", netns=pod.netns)
        host.ip(
            "route", "add", node.pod_gateway, "dev", pod.iface, "scope", "link",
            netns=pod.netns,
        )  # fmt: skip
        host.ip(
            "route", "add", "default", "via", node.pod_gateway, "dev", pod.iface,
            "src", pod.ip, netns=pod.netns,
        )  # fmt: skip

    # -- pods come and go ---------------------------------------------------------

    def add_pod(self, node: str | Node, spec: PodSpec) -> Pod:
        """Make one more pod on ``node`` after the build (the next free IP)."""
        layout = with_pod(self.layout, node.name if isinstance(node, Node) else node, spec)
        pod = layout.pods[-1]
        try:
            self._make_pod(pod, layout.node(pod.node))
        except BaseException:
            self._remove_pod_objects(pod)
            raise
        self.layout = layout
        return pod

    def remove_pod(self, name: str | Pod) -> None:
        """Kill the pod's processes, delete its netns (and so its veth) and cgroup."""
        pod = self.layout.pod(name.name if isinstance(name, Pod) else name)
        errors = host.kill_pids([r for r in self._records if r.target == pod.name])
        self._records = [r for r in self._records if r.target != pod.name]
        errors += self._reap(pod.name)
        errors += self._remove_pod_objects(pod)
        self.layout = without_pod(self.layout, pod.name)
        if errors:
            raise TeardownError(self.prefix, errors)

    def _reap(self, target: str | None) -> list[str]:
        """Wait for (and close the pipes of) our killed children: all, or one target's."""
        errors: list[str] = []
        keep: list[tuple[str, subprocess.Popen[Any]]] = []
        for name, p in self._popens:
            if target is not None and name != target:
                keep.append((name, p))
                continue
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                errors.append(f"process {p.pid} in {name} did not exit")
            for stream in (p.stdin, p.stdout, p.stderr):
                if stream is not None:
                    stream.close()
        self._popens = keep
        return errors

    def _remove_pod_objects(self, pod: Pod) -> list[str]:
        errors: list[str] = []
        cgroup = self.cgroup_root / pod.cgroup
        host.kill_unrecorded(host.cgroup_pids(cgroup) + host.netns_pids(pod.netns))
        if pod.netns in host.list_netns():
            try:
                host.ip("netns", "del", pod.netns)
            except TopologyError as exc:
                errors.append(str(exc))
        try:
            host.remove_cgroup_tree(cgroup)
        except TopologyError as exc:
            errors.append(str(exc))
        return errors

    # -- facts ----------------------------------------------------------------

    @property
    def prefix(self) -> str:
        return self.layout.prefix

    @property
    def underlay(self) -> Underlay:
        return self.layout.underlay

    @property
    def nodes(self) -> tuple[Node, ...]:
        return self.layout.nodes

    @property
    def pods(self) -> tuple[Pod, ...]:
        return self.layout.pods

    def node(self, name: str) -> Node:
        return self.layout.node(name)

    def pod(self, name: str) -> Pod:
        return self.layout.pod(name)

    def node_of(self, pod: str | Pod) -> Node:
        return self.layout.node(pod.node if isinstance(pod, Pod) else self.layout.pod(pod).node)

    def pods_on(self, node: str | Node) -> tuple[Pod, ...]:
        return self.layout.pods_on(node.name if isinstance(node, Node) else node)

    def _resolve(self, target: Target) -> Pod | Node:
        if isinstance(target, (Pod, Node)):
            return target
        for n in self.layout.nodes:
            if n.name == target:
                return n
        for p in self.layout.pods:
            if p.name == target:
                return p
        raise KeyError(f"no pod or node named {target!r} in topology {self.prefix}")

    def netns_of(self, target: Target) -> str:
        return self._resolve(target).netns

    def cgroup_of(self, target: Target) -> Path:
        """The absolute cgroup v2 directory of a pod or node."""
        return self.cgroup_root / self._resolve(target).cgroup

    @property
    def processes(self) -> tuple[ProcessRecord, ...]:
        return tuple(self._records)

    # -- processes ------------------------------------------------------------

    def argv_in(self, target: Target, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside the target's network namespace."""
        return host.in_netns(self.netns_of(target), argv)

    def run(
        self,
        target: Target,
        argv: Sequence[str],
        *,
        check: bool = False,
        timeout: float = 30.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to completion inside the target's netns and cgroup."""
        t = self._resolve(target)
        return subprocess.run(
            host.in_cgroup(self.cgroup_root / t.cgroup, host.in_netns(t.netns, argv)),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            input=input,
            env=dict(env) if env is not None else None,
        )

    def popen(
        self,
        target: Target,
        argv: Sequence[str],
        *,
        log: Path | None = None,
        detach: bool = False,
        env: Mapping[str, str] | None = None,
        **popen_kwargs: Any,
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` in the background inside the target's netns and cgroup.

        Tracked by PID (and start time): :meth:`teardown` kills exactly it.
        ``log`` sends stdout and stderr to a file; ``detach`` puts it in its own
        session so that it outlives the calling process (the demo).
        """
        t = self._resolve(target)
        out: IO[bytes] | None = None
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            out = open(log, "ab")  # noqa: SIM115 - handed to the child, closed below
            popen_kwargs.setdefault("stdout", out)
            popen_kwargs.setdefault("stderr", subprocess.STDOUT)
        if detach:
            popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        try:
            proc: subprocess.Popen[Any] = subprocess.Popen(
                host.in_cgroup(self.cgroup_root / t.cgroup, host.in_netns(t.netns, argv)),
                env=dict(env) if env is not None else None,
                start_new_session=detach,
                **popen_kwargs,
            )
        finally:
            if out is not None:
                out.close()
        self._records.append(
            ProcessRecord(
                proc.pid,
                host.start_ticks(proc.pid),
                t.name,
                tuple(argv),
                str(log) if log else None,
            )
        )
        self._popens.append((t.name, proc))
        return proc

    def wait_listening(
        self,
        target: Target,
        port: int,
        *,
        timeout: float = 10.0,
        proc: subprocess.Popen[Any] | None = None,
        udp: bool = False,
    ) -> None:
        """Wait until something listens on ``port`` in the target's netns."""
        netns = self.netns_of(target)
        argv = host.in_netns(netns, ["ss", "-H", "-uln" if udp else "-tln", f"sport = :{port}"])
        deadline = time.monotonic() + timeout
        while True:
            if host.cmd(argv, check=False).strip():
                return
            if proc is not None and proc.poll() is not None:
                raise TopologyError(
                    f"process {proc.pid} in {netns} exited ({proc.returncode}) "
                    f"before listening on port {port}"
                )
            if time.monotonic() > deadline:
                raise TopologyError(f"nothing listens on port {port} in {netns} after {timeout}s")
            time.sleep(0.05)

    # -- teardown -------------------------------------------------------------

    def teardown(self) -> None:
        """Remove every process, namespace, link and cgroup of this run.

        Every step runs even when an earlier one fails; the errors are raised
        together as :class:`TeardownError` at the end.
        """
        errors = host.kill_pids(self._records)
        errors += self._reap(None)
        errors += sweep(self.prefix)
        remaining = leftovers(self.prefix)
        if remaining:
            errors.append("still present: " + ", ".join(remaining))
        if errors:
            raise TeardownError(self.prefix, errors)

    def __enter__(self) -> Topology:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.teardown()
            return
        with contextlib.suppress(TopologyError):
            self.teardown()  # don't hide the test's own failure behind a teardown error
