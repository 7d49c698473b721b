"""eBPF capture, for real: tc programs on real veths, real sockets, real curl.

Each test builds its own topology (names carry the test's prefix), installs
the capture of one or two nodes with pins under ``/sys/fs/bpf/<prefix>``, and
stands in for the agent with :class:`Probe`: a transparent listener in the
node's namespace that answers with the addresses it saw. Pins and namespaces
are removed at the end, pass or fail.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tests.conftest import require_root
from ztunnel_py.demo import httpservice, wire
from ztunnel_py.redirect import Capture, uninstall
from ztunnel_py.redirect.capture import DEFAULT_POLICY_ROUTE
from ztunnel_py.redirect.sockets import IP_TRANSPARENT, SO_MARK, marked_socket, transparent_listener
from ztunnel_py.state.model import Workload
from ztunnel_py.state.snapshot import Snapshot
from ztunnel_py.topology import Pod, Topology, TopologySpec

Build = Callable[[TopologySpec], Topology]
T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` with this thread in ``netns`` (sockets it makes stay there)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {netns}")
        return fn()
    finally:
        _libc.setns(own, CLONE_NEWNET)
        os.close(target)
        os.close(own)


class Probe:
    """Stands in for an agent listener: records (local, peer) and answers with them."""

    def __init__(self, netns: str, port: int) -> None:
        self.port = port
        self.sock = in_netns(netns, lambda: transparent_listener("0.0.0.0", port))
        self.sock.settimeout(0.1)
        self.seen: list[tuple[tuple[str, int], tuple[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2.0)
                local = conn.getsockname()
                self.seen.append((local, peer))
                try:
                    conn.recv(4096)
                    body = f"probe:{self.port} local={local[0]}:{local[1]}\n".encode()
                    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(body), body))
                    conn.shutdown(socket.SHUT_WR)
                    conn.recv(1)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def pin_root(netns_prefix: str) -> Iterator[Path]:
    root = Path("/sys/fs/bpf") / netns_prefix
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def probes() -> Iterator[Callable[[str, int], Probe]]:
    made: list[Probe] = []

    def make(netns: str, port: int) -> Probe:
        made.append(Probe(netns, port))
        return made[-1]

    yield make
    for p in made:
        p.close()


def workload(pod: Pod, enrolled: bool = True) -> Workload:
    return Workload(
        uid=f"{pod.namespace}/{pod.name}", name=pod.name, namespace=pod.namespace,
        service_account=pod.service_account, node=pod.node, ips=(pod.ip,), enrolled=enrolled,
    )


def snapshot(*pods: tuple[Pod, bool], version: str = "1") -> Snapshot:
    return Snapshot(version=version, workloads=tuple(workload(p, e) for p, e in pods))


def curl(
    topo: Topology, where: str | Pod, url: str, max_time: float = 3
) -> subprocess.CompletedProcess[str]:
    return topo.run(where, ["curl", "-sS", "--max-time", str(max_time), url], timeout=max_time + 5)


def filters(topo: Topology, node: str, dev: str) -> str:
    out = ""
    for direction in ("ingress", "egress"):
        out += topo.run(node, ["tc", "filter", "show", "dev", dev, direction]).stdout
    return out


def agent_get(netns: str, ip: str, port: int) -> bytes:
    """An HTTP GET from the node namespace on a marked socket, as the agent would."""

    def connect() -> socket.socket:
        s = marked_socket(socket.AF_INET, 0x539)
        s.setblocking(True)
        s.settimeout(3)
        return s

    s = in_netns(netns, connect)
    with s:
        s.connect((ip, port))
        s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        chunks = []
        while chunk := s.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks)


def start_server(topo: Topology, pod: Pod) -> None:
    proc = topo.popen(pod, httpservice.command(pod.name, "v1"), stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
    topo.wait_listening(pod, 8080, proc=proc)


def assert_no_firewall_rules(topo: Topology, node: str) -> None:
    if shutil.which("nft"):
        ruleset = topo.run(node, ["nft", "list", "ruleset"])
        assert ruleset.returncode == 0, ruleset.stderr
        assert ruleset.stdout.strip() == ""
    if shutil.which("iptables-save"):
        saved = topo.run(node, ["iptables-save"]).stdout
        assert not [line for line in saved.splitlines() if line.startswith("-A")]


def test_capture_sockets_are_transparent_and_marked() -> None:
    require_root()
    ln = transparent_listener("127.0.0.1", 0)
    up = marked_socket(socket.AF_INET, 0x539)
    try:
        assert ln.getsockopt(socket.SOL_IP, IP_TRANSPARENT) == 1
        assert ln.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert ln.getblocking() is False
        assert up.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0x539
        assert up.getblocking() is False
    finally:
        ln.close()
        up.close()


def test_outbound_capture_enroll_unenroll_live(
    topology: Build, pin_root: Path, probes: Callable[[str, int], Probe]
) -> None:
    topo = topology(TopologySpec.simple(nodes=2, pods_per_node=2))
    node1 = topo.node("node1")
    client, other, server = topo.pod("node1-pod1"), topo.pod("node1-pod2"), topo.pod("node2-pod1")
    start_server(topo, server)
    outbound = probes(node1.netns, 15001)
    cap = Capture("node1", pin_root=pin_root, netns=node1.netns)
    try:
        cap.install()
        result = cap.reconcile(snapshot((client, True), (other, False)))
        assert result.enrolled == (client.ip,)

        # An unmodified curl in the enrolled pod lands on the transparent listener,
        # with the original destination as the accepted socket's local address.
        got = curl(topo, client, f"http://{server.ip}:8080/")
        assert got.returncode == 0, got.stderr
        assert got.stdout == f"probe:15001 local={server.ip}:8080\n"
        assert outbound.seen[-1][0] == (server.ip, 8080)
        assert outbound.seen[-1][1][0] == client.ip

        # The pod that is not enrolled: no program on its veth, straight to the server.
        assert filters(topo, "node1", other.host_veth).strip() == ""
        assert "zt_pod_ingress" in filters(topo, "node1", client.host_veth)
        direct = curl(topo, other, f"http://{server.ip}:8080/")
        assert "Hello version: v1, instance: node2-pod1" in direct.stdout
        assert len(outbound.seen) == 1

        # Enroll it live: the very next connection is captured.
        cap.reconcile(snapshot((client, True), (other, True), version="2"))
        again = curl(topo, other, f"http://{server.ip}:8080/")
        assert again.stdout == f"probe:15001 local={server.ip}:8080\n"
        # ... and release it: the next connection goes straight to the server again.
        removed = cap.reconcile(snapshot((client, True), (other, False), version="3"))
        assert removed.removed == (other.ip,)
        assert filters(topo, "node1", other.host_veth).strip() == ""
        released = curl(topo, other, f"http://{server.ip}:8080/")
        assert "Hello version: v1, instance: node2-pod1" in released.stdout

        counters = cap.counters()
        assert counters["pods"][client.ip]["out_captured"] == 1
        assert counters["pods"][client.ip]["uid"] == "default/node1-pod1"
        assert other.ip not in counters["pods"]
        assert counters["reasons"]["out_captured"] == 2
        assert_no_firewall_rules(topo, "node1")
    finally:
        cap.close()


def test_inbound_capture_underlay_same_node_and_health_checks(
    topology: Build, pin_root: Path, probes: Callable[[str, int], Probe]
) -> None:
    topo = topology(TopologySpec.simple(nodes=2, pods_per_node=2))
    node2 = topo.node("node2")
    remote, neighbour, target = (
        topo.pod("node1-pod1"), topo.pod("node2-pod2"), topo.pod("node2-pod1"))
    start_server(topo, target)
    hbone = probes(node2.netns, 15008)
    plain = probes(node2.netns, 15006)
    cap = Capture("node2", pin_root=pin_root, netns=node2.netns)
    try:
        cap.install()
        cap.reconcile(snapshot((target, True), (neighbour, False)))

        # From another node, over the underlay: :15008 stays HBONE, the rest is plaintext.
        to_hbone = curl(topo, remote, f"http://{target.ip}:15008/")
        assert to_hbone.stdout == f"probe:15008 local={target.ip}:15008\n", to_hbone.stderr
        to_app = curl(topo, remote, f"http://{target.ip}:8080/")
        assert to_app.stdout == f"probe:15006 local={target.ip}:8080\n", to_app.stderr
        assert plain.seen[-1][1][0] == remote.ip
        # From a pod on the same node (not enrolled itself): the destination is still guarded.
        same = curl(topo, neighbour, f"http://{target.ip}:8080/")
        assert same.stdout == f"probe:15006 local={target.ip}:8080\n", same.stderr
        assert plain.seen[-1][1][0] == neighbour.ip
        # Kubelet-style health check from the node itself reaches the pod directly.
        health = curl(topo, "node2", f"http://{target.ip}:8080/")
        assert "Hello version: v1, instance: node2-pod1" in health.stdout
        # The agent's own (marked) sockets: to the application port they reach the pod
        # (the inbound leg); to :15008 (same-node HBONE) they loop back to the agent.
        assert agent_get(node2.netns, target.ip, 8080).startswith(b"HTTP/1.1 200")
        looped = agent_get(node2.netns, target.ip, 15008)
        assert looped.endswith(f"\r\n\r\nprobe:15008 local={target.ip}:15008\n".encode())
        assert hbone.seen[-1][1][0] != target.ip  # from the node, not from a pod
        assert len(hbone.seen) == 2 and len(plain.seen) == 2

        counters = cap.counters()
        assert counters["pods"][target.ip]["in_captured"] == 4
        assert counters["reasons"]["in_hbone"] == 2
        assert counters["reasons"]["in_plain"] == 2
        assert counters["reasons"]["same_node"] >= 1
        assert counters["reasons"]["pass_local"] >= 1
        assert_no_firewall_rules(topo, "node2")
    finally:
        cap.close()


def test_fail_closed_when_the_agent_is_gone_and_restart_reuses_pins(
    topology: Build, pin_root: Path, probes: Callable[[str, int], Probe], tmp_path: Path
) -> None:
    topo = topology(TopologySpec.simple(nodes=2, pods_per_node=1))
    node1 = topo.node("node1")
    client, server = topo.pod("node1-pod1"), topo.pod("node2-pod1")
    start_server(topo, server)
    cap = Capture("node1", pin_root=pin_root, netns=node1.netns)
    cap.install()
    cap.reconcile(snapshot((client, True)))
    prog_before = filters(topo, "node1", client.host_veth)
    pins = sorted(p.name for p in cap.node_dir.iterdir())
    cap.close()  # the agent exits: everything stays attached

    # Agent down (no listener): the connection fails and nothing leaves the node.
    pcap = tmp_path / "underlay.pcap"
    dump = topo.popen("node1", ["tcpdump", "-i", node1.underlay_iface, "-n", "-U", "-w",
                                str(pcap), "tcp port 8080"], stderr=subprocess.PIPE,
                      stdout=subprocess.DEVNULL)
    try:
        wire.wait_started(dump)
        failed = curl(topo, client, f"http://{server.ip}:8080/marker-7f3a", max_time=1.5)
        assert failed.returncode != 0
        assert "Hello" not in failed.stdout
        time.sleep(0.2)
    finally:
        dump.terminate()
        dump.wait(timeout=5)
    leaked = subprocess.run(["tcpdump", "-n", "-r", str(pcap)], capture_output=True, text=True)
    assert leaked.stdout.strip() == "", leaked.stdout

    # Restart: the pins are reused (same programs attached), the pod stays enrolled,
    # and the drops were counted while the agent was away.
    restarted = Capture("node1", pin_root=pin_root, netns=node1.netns)
    try:
        restarted.install()
        assert sorted(p.name for p in restarted.node_dir.iterdir()) == pins
        assert client.ip in restarted.enrolled()
        assert filters(topo, "node1", client.host_veth) == prog_before
        counters = restarted.counters()
        assert counters["reasons"]["drop_no_listener"] >= 1
        assert counters["pods"][client.ip]["dropped"] >= 1
        # Listener back: works again.
        probes(node1.netns, 15001)
        restarted.reconcile(snapshot((client, True)))
        back = curl(topo, client, f"http://{server.ip}:8080/")
        assert back.stdout == f"probe:15001 local={server.ip}:8080\n", back.stderr
    finally:
        restarted.close()


def test_uninstall_removes_one_node_and_leaves_the_other(
    topology: Build, pin_root: Path
) -> None:
    topo = topology(TopologySpec.simple(nodes=2, pods_per_node=1))
    caps = {}
    for name in ("node1", "node2"):
        node = topo.node(name)
        caps[name] = Capture(name, pin_root=pin_root, netns=node.netns)
        caps[name].install()
        caps[name].reconcile(snapshot((topo.pod(f"{name}-pod1"), True)))
    try:
        assert caps["node1"].pin_dir != caps["node2"].pin_dir
        caps["node1"].close()
        uninstall("node1", pin_root=pin_root, netns=topo.node("node1").netns)

        node1, node2 = topo.node("node1"), topo.node("node2")
        for dev in (topo.pod("node1-pod1").host_veth, node1.underlay_iface):
            assert filters(topo, "node1", dev).strip() == ""
        rules = topo.run("node1", ["ip", "rule", "show"]).stdout
        assert f"lookup {DEFAULT_POLICY_ROUTE.table}" not in rules
        assert not (pin_root / "node1").exists()
        demux = topo.run("node1", ["sysctl", "-n", "net.ipv4.tcp_early_demux"]).stdout
        assert demux.strip() == "1"
        # node2 untouched
        assert "zt_pod_ingress" in filters(topo, "node2", topo.pod("node2-pod1").host_veth)
        assert "zt_underlay_in" in filters(topo, "node2", node2.underlay_iface)
        assert f"lookup {DEFAULT_POLICY_ROUTE.table}" in topo.run("node2", ["ip", "rule"]).stdout
        assert caps["node2"].pin_dir is not None and caps["node2"].pin_dir.is_dir()
        assert topo.pod("node2-pod1").ip in caps["node2"].enrolled()
    finally:
        caps["node2"].close()


def test_changed_programs_are_swapped_in_without_detaching(
    topology: Build, pin_root: Path, probes: Callable[[str, int], Probe], tmp_path: Path
) -> None:
    from ztunnel_py.redirect.hooks import DEFAULT_BPF_DIR

    topo = topology(TopologySpec.simple(nodes=1, pods_per_node=1))
    node, pod = topo.node("node1"), topo.pod("node1-pod1")
    old_src = tmp_path / "bpf"
    shutil.copytree(DEFAULT_BPF_DIR, old_src)
    (old_src / "include" / "types.h").write_text(
        (old_src / "include" / "types.h").read_text() + "\n/* an older release */\n")
    old = Capture("node1", pin_root=pin_root, netns=node.netns, bpf_dir=old_src)
    old.install()
    old.reconcile(snapshot((pod, True)))
    old_dir = old.pin_dir
    old.close()
    before = filters(topo, "node1", pod.host_veth)

    new = Capture("node1", pin_root=pin_root, netns=node.netns)
    try:
        new.install()
        assert new.pin_dir != old_dir and old_dir is not None and not old_dir.exists()
        # The old programs keep capturing until reconcile swaps them (tc replace).
        assert "zt_pod_ingress" in filters(topo, "node1", pod.host_veth)
        new.reconcile(snapshot((pod, True)))
        after = filters(topo, "node1", pod.host_veth)
        assert "zt_pod_ingress" in after and after != before  # new program ids
        probes(node.netns, 15001)
        got = curl(topo, pod, "http://10.99.0.1:80/")
        assert got.stdout == "probe:15001 local=10.99.0.1:80\n", got.stderr
    finally:
        new.close()
