"""The agent's handle on eBPF capture: install, reconcile, counters, uninstall.

Layout under the BPF filesystem, one directory per node (several "nodes" may
share one kernel)::

    <pin_root>/<node>/<source hash>/zt_pod_ingress   programs (one per hook)
                                   /zt_pods ...      maps (bpf/include/maps.h)

``install()`` reuses the pins when the sources are unchanged (an agent
restart disturbs nothing: the filters hold the programs, the maps hold the
pods), else compiles in a child and swaps the programs in with ``tc replace``.
Nothing is detached when the agent exits: with the agent's listeners gone,
the programs drop captured packets (fail closed) until it is back.
``uninstall()`` removes every filter, the policy route and the pins.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ztunnel_py import log
from ztunnel_py.config import HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT
from ztunnel_py.redirect import bpfsys
from ztunnel_py.redirect.compile import compile_in_child
from ztunnel_py.redirect.hooks import (
    DEFAULT_BPF_DIR,
    HOOKS,
    POD_HOOKS,
    POD_INGRESS,
    UNDERLAY_INGRESS,
    source_hash,
)
from ztunnel_py.redirect.maps import (
    MAP_NAMES,
    CaptureMaps,
    CaptureSettings,
    ConfigMap,
    NodeIpsMap,
    PodsMap,
    PodStatsMap,
    ReasonsMap,
)
from ztunnel_py.redirect.node import NodeNet, NodeNetApi
from ztunnel_py.redirect.plan import diff, enrolled_pods
from ztunnel_py.redirect.routing import PolicyRoute
from ztunnel_py.state.snapshot import Snapshot

_log = log.get("redirect")

DEFAULT_PIN_ROOT = Path("/sys/fs/bpf/ztunnel-py")
AGENT_MARK = 0x539  # SO_MARK on the agent's own sockets (Istio's ztunnel uses 1337 too)
ROUTE_MARK = 0x5D1  # set by the programs on steered packets
DEFAULT_POLICY_ROUTE = PolicyRoute(mark=ROUTE_MARK, table=1489, priority=1489)
EARLY_DEMUX = "net.ipv4.tcp_early_demux"


class CaptureError(RuntimeError):
    """The capture could not be installed or changed; the message says what to check."""


@dataclass(frozen=True)
class Ports:
    outbound: int = OUTBOUND_PORT
    inbound_plaintext: int = INBOUND_PLAINTEXT_PORT
    hbone: int = HBONE_PORT


@dataclass(frozen=True)
class ReconcileResult:
    enrolled: tuple[str, ...]  # pod IPs captured after this pass
    added: tuple[str, ...]
    removed: tuple[str, ...]
    unresolved: tuple[str, ...]  # enrolled in the snapshot, but no local veth (yet)


def node_dir_name(node: str) -> str:
    """bpffs names allow no dots; Kubernetes node names often have them."""
    if not node:
        raise CaptureError("the capture needs a node name (NODE_NAME)")
    return re.sub(r"[^A-Za-z0-9_-]", "_", node)


@dataclass
class _Loaded:
    maps: CaptureMaps
    prog_fds: dict[str, int]
    fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


class Capture:
    def __init__(
        self,
        node: str,
        *,
        pin_root: Path = DEFAULT_PIN_ROOT,
        ports: Ports = Ports(),
        listen_ip: str = "0.0.0.0",
        agent_mark: int = AGENT_MARK,
        policy_route: PolicyRoute = DEFAULT_POLICY_ROUTE,
        underlay: str | None = None,
        netns: str | None = None,
        bpf_dir: Path = DEFAULT_BPF_DIR,
        net: NodeNetApi | None = None,
        maps: CaptureMaps | None = None,
    ) -> None:
        self.node = node
        self.node_dir = pin_root / node_dir_name(node)
        self.settings = CaptureSettings(
            agent_mark=agent_mark, route_mark=policy_route.mark, listen_ip=listen_ip,
            port_out=ports.outbound, port_in=ports.inbound_plaintext, port_hbone=ports.hbone,
        )
        self.policy_route = policy_route
        self.bpf_dir = bpf_dir
        self._net: NodeNetApi = net if net is not None else NodeNet(netns, underlay)
        self._fake_maps = maps
        self._loaded: _Loaded | None = None
        self._attached: set[int] = set()  # veths carrying the pod programs
        self._uids: dict[str, str] = {}
        self.pin_dir: Path | None = None

    # -- lifecycle -------------------------------------------------------------

    def install(self) -> None:
        """Load (or compile) the programs, write the config, route, attach the underlay."""
        if self._fake_maps is not None:
            self._loaded = _Loaded(self._fake_maps, {h.name: -1 for h in HOOKS})
        else:
            self._loaded = self._load_pins()
        maps = self._loaded.maps
        maps.config.set(self.settings)
        maps.node_ips.replace(self._net.addresses())
        self._net.install_route(self.policy_route)
        # A same-node client's packets are forwarded to the pod's veth, where
        # tc_pod_egress turns them back to the agent. TCP early demux would find
        # the agent's socket first and ip_forward drops packets carrying a socket.
        self._net.sysctl(EARLY_DEMUX, "0")
        underlay = self._net.underlay()
        self._net.attach(underlay, UNDERLAY_INGRESS, self._loaded.prog_fds[UNDERLAY_INGRESS.name])
        # After a restart the kernel is the truth: which veths carry our programs.
        self._attached = self._net.links_with(POD_INGRESS) - {underlay}
        if self._fake_maps is None:
            self._remove_stale_pins()
        _log.info("capture installed", node=self.node, pins=str(self.pin_dir),
                  underlay=underlay, pods=len(maps.pods.items()))

    def reconcile(self, snapshot: Snapshot) -> ReconcileResult:
        """Make maps and attachments equal to the enrolled pods of this node."""
        maps = self._maps()
        wanted = enrolled_pods(snapshot, self.node)
        not_on = {self._net.underlay(), self._net.loopback()}
        desired: dict[str, int] = {}
        unresolved: list[str] = []
        for ip in wanted:
            ifindex = self._net.pod_veth(ip, not_on)
            if ifindex is None:
                unresolved.append(ip)
            else:
                desired[ip] = ifindex
        current = maps.pods.items()
        plan = diff(current, desired, self._attached)
        # Unenroll: detach first, then forget (the programs never see a half state).
        for ifindex in sorted(plan.detach):
            for hook in POD_HOOKS:
                self._net.detach(ifindex, hook)
            self._net.tidy(ifindex)
            self._net.accept_local(ifindex, False)
            self._attached.discard(ifindex)
        for ip in sorted(plan.drop):
            maps.pods.remove(ip)
            maps.pod_stats.remove(ip)
        # Enroll: map entry first, then attach.
        fds = self._loaded.prog_fds if self._loaded else {}
        for ip, ifindex in sorted(plan.put.items()):
            maps.pod_stats.ensure(ip)
            maps.pods.put(ip, ifindex)
            self._net.accept_local(ifindex, True)
            for hook in POD_HOOKS:
                self._net.attach(ifindex, hook, fds[hook.name])
            self._attached.add(ifindex)
        maps.node_ips.replace(self._net.addresses())
        self._uids = {ip: wanted[ip] for ip in desired}
        result = ReconcileResult(
            enrolled=tuple(sorted(desired)),
            added=tuple(sorted(ip for ip in plan.put if ip not in current)),
            removed=tuple(sorted(plan.drop)),
            unresolved=tuple(sorted(unresolved)),
        )
        if not plan.empty or unresolved:
            _log.info("capture reconciled", node=self.node, version=snapshot.version,
                      added=result.added, removed=result.removed, unresolved=result.unresolved)
        return result

    def counters(self) -> dict[str, Any]:
        """{"reasons": {reason: packets}, "pods": {ip: {uid, out_captured, ...}}}."""
        maps = self._maps()
        pods: dict[str, Any] = {}
        for ip, c in maps.pod_stats.items().items():
            pods[ip] = {"uid": self._uids.get(ip, ""), **asdict(c)}
        return {"reasons": maps.reasons.totals(), "pods": pods}

    def enrolled(self) -> dict[str, int]:
        """Pod IP -> veth ifindex, as the kernel map holds it now."""
        return self._maps().pods.items()

    def close(self) -> None:
        """Let go of fds and netlink; everything stays attached (fail closed)."""
        if self._loaded is not None:
            self._loaded.close()
            self._loaded = None
        self._net.close()

    def uninstall(self) -> None:
        """Detach every program of this node, remove the policy route and the pins."""
        for hook in HOOKS:
            for ifindex in self._net.links_with(hook):
                self._net.detach(ifindex, hook)
                self._net.tidy(ifindex)
                if hook in POD_HOOKS:
                    self._net.accept_local(ifindex, False)
        self._net.remove_route(self.policy_route)
        self._net.sysctl(EARLY_DEMUX, "1")  # the kernel's default
        if self._loaded is not None:
            self._loaded.close()
            self._loaded = None
        if self._fake_maps is None:
            shutil.rmtree(self.node_dir, ignore_errors=True)
        self._attached.clear()
        _log.info("capture uninstalled", node=self.node)

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- pins ------------------------------------------------------------------

    def _maps(self) -> CaptureMaps:
        if self._loaded is None:
            raise CaptureError("capture not installed: call install() first")
        return self._loaded.maps

    def _complete(self, pin_dir: Path) -> bool:
        names = {h.name for h in HOOKS} | set(MAP_NAMES)
        return pin_dir.is_dir() and names <= {p.name for p in pin_dir.iterdir()}

    def _load_pins(self) -> _Loaded:
        pin_dir = self.node_dir / source_hash(self.bpf_dir)
        self.pin_dir = pin_dir
        if not self._complete(pin_dir):
            if pin_dir.exists():
                shutil.rmtree(pin_dir)
            pin_dir.parent.mkdir(parents=True, exist_ok=True)
            _log.info("compiling capture programs", node=self.node, pins=str(pin_dir))
            compile_in_child(pin_dir, self.bpf_dir)
        fds: list[int] = []
        try:
            raw = {name: bpfsys.PinnedMap.open(pin_dir / name, percpu=percpu)
                   for name, percpu in MAP_NAMES.items()}
            fds += [m.fd for m in raw.values()]
            progs = {h.name: bpfsys.obj_get(pin_dir / h.name) for h in HOOKS}
            fds += list(progs.values())
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            raise CaptureError(f"cannot open the pinned capture in {pin_dir}: {exc}") from exc
        maps = CaptureMaps(
            ConfigMap(raw["zt_cfg"]), PodsMap(raw["zt_pods"]), NodeIpsMap(raw["zt_nodeips"]),
            ReasonsMap(raw["zt_reasons"]), PodStatsMap(raw["zt_podstats"]),
        )
        return _Loaded(maps, progs, fds)

    def _remove_stale_pins(self) -> None:
        """Pins of older program versions: their programs live on while attached."""
        for entry in self.node_dir.iterdir():
            if self.pin_dir is not None and entry != self.pin_dir:
                shutil.rmtree(entry, ignore_errors=True)


def uninstall(node: str, *, pin_root: Path = DEFAULT_PIN_ROOT, netns: str | None = None,
              policy_route: PolicyRoute = DEFAULT_POLICY_ROUTE) -> None:
    """``ztunnel-py agent --uninstall``: remove what the capture of ``node`` attached."""
    cap = Capture(node, pin_root=pin_root, netns=netns, policy_route=policy_route)
    try:
        cap.uninstall()
    finally:
        cap.close()
