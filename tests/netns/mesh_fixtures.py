"""Real meshes for the network-namespace tests: a controller and one agent per node, as processes.

A test (or a module) describes its world — which pods run on which node, in
which Kubernetes namespace, behind which Service — and gets it built and
running, through the same launcher as ``ztunnel-py demo`` (controller on
``node1`` in directory mode, an agent per node with ``--capture ebpf`` and
its BPF pins under ``/sys/fs/bpf/<prefix>``)::

    with running_mesh(request.node.nodeid, world, tmp_path) as mesh:
        mesh.curl("client", mesh.vip_url("server"), marker="m-1")
        mesh.apply(authorization_policy(...)); mesh.wait_policy("node2", name)
        mesh.kill_agent("node1"); mesh.start_agent("node1")
        mesh.access_log("node2").wait_for(mark, match, count=1)

Every pod runs the demo HTTP service on :8080 (``/headers`` echoes the
request's headers) and a TCP "echo twice" server on :9000 (each byte comes
back twice, so request and response byte counts differ and their direction
can be checked). Agents log JSON (``LOG_FORMAT=json``) to ``logs/agent-<node>.log``,
which is where the access-log lines are read from. The end removes the
topology (processes by PID, namespaces, cgroups, pins), pass or fail.

Run as a module, this file is also the small TCP tools the tests start in pods
(``python -m tests.netns.mesh_fixtures echo-twice|send|hold``); it imports
nothing heavy at the top for that reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ztunnel_py.config import ADMIN_PORT, METRICS_PORT
from ztunnel_py.demo import httpservice
from ztunnel_py.demo.configdir import ObjectRef, delete_objects, ref_of, write_objects
from ztunnel_py.demo.mesh import DemoMesh
from ztunnel_py.demo.world import (
    AMBIENT,
    DemoPod,
    DemoService,
    DemoWaypoint,
    World,
    manifests,
    topology_spec,
)
from ztunnel_py.topology import Pod, Topology, leftovers, prefix_for, sweep

REPO = Path(__file__).resolve().parents[2]
HTTP_PORT = 8080
ECHO_PORT = 9000
TRUST_DOMAIN = "cluster.local"
READY_TIMEOUT = 60.0


class MeshTestError(AssertionError):
    """The mesh under test did not do what a step waited for; the message says where to look."""


def principal(namespace: str, service_account: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"


def eventually(check: Callable[[], bool], timeout: float, what: str, period: float = 0.1) -> float:
    """Poll ``check`` until it holds; the seconds it took. Bounded: fails after ``timeout``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise MeshTestError(f"{what}: not true after {timeout:.1f}s")
        time.sleep(period)
    return time.monotonic() - started


def first_success(attempt: Callable[[], bool], timeout: float, what: str,
                  period: float = 0.05) -> float:
    """Seconds from now to the *start* of the first attempt that succeeded.

    For "the next connection after t works": an attempt that began at 1.1 s and
    took 0.5 s (a TLS handshake, a fresh certificate) counts as 1.1 s, not 1.6 s.
    """
    t0 = time.monotonic()
    while True:
        began = time.monotonic() - t0
        if attempt():
            return began
        if time.monotonic() - t0 > timeout:
            raise MeshTestError(f"{what}: no success within {timeout:.1f}s")
        time.sleep(period)


# -- Kubernetes-shaped objects the tests apply -----------------------------------------


def namespace_object(name: str, ambient: bool) -> dict[str, Any]:
    labels = {"kubernetes.io/metadata.name": name, **(AMBIENT if ambient else {})}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def authorization_policy(
    name: str, namespace: str, app: str, action: str, source: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": {"app": app}},
            "action": action,
            "rules": [{"from": [{"source": dict(source)}]}],
        },
    }


def peer_authentication(name: str, namespace: str, mode: str) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"mtls": {"mode": mode}},
    }


# -- what the agents tell -----------------------------------------------------------------


@dataclass
class AccessLog:
    """An agent's log file (JSON lines); access-log lines are ``component=access``."""

    path: Path

    def mark(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def lines(self, since: int = 0) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(since)
            data = f.read()
        out = []
        for raw in data.splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue  # a partial last line, or a non-JSON line (a crash)
            if isinstance(line, dict) and line.get("component") == "access":
                out.append(line)
        return out

    def wait_for(self, since: int, match: Callable[[dict[str, Any]], bool], count: int,
                 timeout: float = 5.0, settle: float = 0.3) -> list[dict[str, Any]]:
        """The matching lines once ``count`` are there (and ``settle`` s showed no more)."""
        found: list[dict[str, Any]] = []

        def enough() -> bool:
            found[:] = [x for x in self.lines(since) if match(x)]
            return len(found) >= count

        eventually(enough, timeout, f"{count} access-log line(s) in {self.path}")
        time.sleep(settle)
        return [x for x in self.lines(since) if match(x)]


@dataclass(frozen=True)
class CurlResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def status(self) -> int | None:
        first = self.stdout.split("\n", 1)[0].split()
        return int(first[1]) if len(first) >= 2 and first[1].isdigit() else None

    def header(self, name: str) -> str | None:
        head = self.stdout.replace("\r\n", "\n").split("\n\n", 1)[0]
        for line in head.split("\n")[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == name.lower():
                return v.strip()
        return None


# -- the mesh -------------------------------------------------------------------------------


@dataclass
class Mesh:
    topo: Topology
    world: World
    workdir: Path
    agents: dict[str, subprocess.Popen[Any]] = field(default_factory=dict)
    _agent_argv: dict[str, Sequence[str]] = field(default_factory=dict)

    @property
    def config_dir(self) -> Path:
        return self.workdir / "config"

    @property
    def logs_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def launcher(self) -> DemoMesh:
        """The demo's launcher: controller on node1, an agent per node, readiness."""
        return DemoMesh(self.topo, self.workdir, self.config_dir, self.logs_dir)

    def pod(self, name: str) -> Pod:
        return self.topo.pod(name)

    def vip_url(self, service: str, path: str = "/headers") -> str:
        svc = next(s for s in self.world.services if s.name == service)
        return f"http://{svc.vip}:{svc.ports[0].port}{path}"

    def pod_url(self, pod: str, path: str = "/headers") -> str:
        return f"http://{self.pod(pod).ip}:{HTTP_PORT}{path}"

    def vip(self, service: str, port: int) -> tuple[str, int]:
        svc = next(s for s in self.world.services if s.name == service)
        assert any(p.port == port for p in svc.ports), f"{service} has no port {port}"
        return svc.vip, port

    # -- starting ------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        return {**os.environ, "LOG_FORMAT": "json", "PYTHONPATH": str(REPO)}

    def start(self) -> None:
        for p in self.world.pods:
            self.topo.popen(p.name, httpservice.command(p.name, p.version, HTTP_PORT),
                            log=self.logs_dir / f"{p.name}.log")
            self.topo.popen(p.name, tool("echo-twice", str(ECHO_PORT)), env=self._env(),
                            log=self.logs_dir / f"{p.name}-echo.log")
        for p in self.world.pods:
            self.topo.wait_listening(p.name, HTTP_PORT, timeout=15)
            self.topo.wait_listening(p.name, ECHO_PORT, timeout=15)
        objs = manifests(self.world, self.topo.layout)
        write_objects(self.config_dir, [(ref_of(o, "world"), o) for o in objs])
        self.launcher.start(self._launch, timeout=READY_TIMEOUT, waypoints=self.world.waypoints)

    def _launch(self, topo: Topology, target: str, name: str, argv: Sequence[str]) -> None:
        """DemoMesh's process starter: JSON logs to ``logs/<name>.log``; agents remembered."""
        proc = topo.popen(target, argv, env=self._env(), log=self.logs_dir / f"{name}.log")
        if name.startswith("agent-"):
            self.agents[target] = proc
            self._agent_argv[target] = argv

    def start_agent(self, node: str) -> subprocess.Popen[Any]:
        """The node's agent again, exactly as the launcher started it."""
        self._launch(self.topo, node, f"agent-{node}", self._agent_argv[node])
        return self.agents[node]

    def agent_rss_kib(self, node: str) -> int:
        status = Path(f"/proc/{self.agents[node].pid}/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines()
                    if line.startswith("VmRSS:"))

    def kill_agent(self, node: str) -> None:
        """SIGKILL, by PID: no drain, no goodbye (a crash or an OOM kill)."""
        proc = self.agents.pop(node)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    # -- the cluster's configuration ----------------------------------------------------

    def apply(self, obj: dict[str, Any]) -> ObjectRef:
        ref = ref_of(obj, "test")
        write_objects(self.config_dir, [(ref, obj)])
        return ref

    def delete(self, ref: ObjectRef) -> None:
        delete_objects(self.config_dir, [ref])

    def config_dump(self, node: str) -> dict[str, Any]:
        done = self.topo.run(node, ["curl", "-sS", "--max-time", "3",
                                    f"http://127.0.0.1:{ADMIN_PORT}/config_dump"], timeout=10)
        if done.returncode != 0:
            raise MeshTestError(f"/config_dump on {node}: {done.stderr.strip()}")
        dump: dict[str, Any] = json.loads(done.stdout)
        return dump

    def has_policy(self, node: str, name: str) -> bool:
        dump = self.config_dump(node)
        return any(isinstance(obj, dict) and obj.get("name") == name
                   for key in ("authorization_policy", "peer_authentication")
                   for obj in dump.get(key, []))

    def wait_policy(self, node: str, name: str, present: bool = True,
                    timeout: float = 5.0) -> float:
        return eventually(lambda: self.has_policy(node, name) is present, timeout,
                          f"policy {name} {'on' if present else 'gone from'} agent {node}")

    # -- traffic --------------------------------------------------------------------------

    def curl(self, pod: str, url: str, marker: str = "", max_time: float = 3.0,
             extra: Sequence[str] = ()) -> CurlResult:
        """One request with curl from ``pod``; ``extra`` are more curl arguments."""
        argv = ["curl", "-sS", "-i", "--max-time", str(max_time), *extra]
        if marker:
            argv += ["-H", f"x-test-marker: {marker}"]
        done = self.topo.run(pod, [*argv, url], timeout=max_time + 10)
        return CurlResult(done.returncode, done.stdout, done.stderr)

    def curl_each(self, pod: str, urls: Sequence[str], write_out: str,
                  extra: Sequence[str] = (), timeout: float = 60.0) -> list[str]:
        """One curl for many URLs (``[1-N]`` globs too): one keep-alive connection, or
        parallel ones with ``-Z`` in ``extra``; each transfer's ``-w write_out`` line."""
        argv = ["curl", "-sS", "--max-time", "10", "-w", f"\\n@@{write_out}\\n", *extra, *urls]
        done = self.topo.run(pod, argv, timeout=timeout)
        lines = [line[2:] for line in done.stdout.splitlines() if line.startswith("@@")]
        if not lines:
            raise MeshTestError(f"curl from {pod} answered nothing: {done.stderr.strip()}")
        return lines

    def start_tool(self, pod: str, argv: Sequence[str], name: str,
                   ports: Sequence[int]) -> subprocess.Popen[Any]:
        """A server in ``pod`` (output to ``logs/<name>.log``), once it listens on ``ports``;
        stopped by PID with the topology."""
        proc = self.topo.popen(pod, argv, env=self._env(), log=self.logs_dir / f"{name}.log")
        for port in ports:
            self.topo.wait_listening(pod, port, timeout=15, proc=proc)
        return proc

    def run_tool(self, pod: str, argv: Sequence[str],
                 timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """A client tool run to completion in ``pod`` (its output captured)."""
        return self.topo.run(pod, argv, env=self._env(), timeout=timeout)

    def send(self, pod: str, address: tuple[str, int], nbytes: int) -> int:
        """One TCP connection: ``nbytes`` out, half-close, read to EOF; bytes read back."""
        done = self.topo.run(pod, tool("send", address[0], str(address[1]), str(nbytes)),
                             env=self._env(), timeout=15)
        if done.returncode != 0:
            raise MeshTestError(f"send from {pod} to {address}: {done.stderr.strip()}")
        return int(done.stdout.strip())

    def hold(self, pod: str, address: tuple[str, int]) -> Held:
        """A long TCP connection from ``pod``: a byte every 50 ms, each echoed back."""
        proc = self.topo.popen(pod, tool("hold", address[0], str(address[1])),
                               env=self._env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return Held(proc)

    # -- what the agents say ----------------------------------------------------------------

    def access_log(self, node: str) -> AccessLog:
        return AccessLog(self.logs_dir / f"agent-{node}.log")

    def metrics_text(self, node: str) -> str:
        done = self.topo.run(node, ["curl", "-sS", "--max-time", "3",
                                    f"http://127.0.0.1:{METRICS_PORT}/metrics"], timeout=10)
        if done.returncode != 0:
            raise MeshTestError(f"/metrics on {node}: {done.stderr.strip()}")
        return done.stdout

    def tc_filters(self, node: str, dev: str) -> str:
        return self.topo.run(node, ["tc", "filter", "show", "dev", dev, "ingress"],
                             timeout=10).stdout


def metric_sum(text: str, sample: str, **labels: str) -> float:
    """The sum of the ``sample`` series (e.g. ``istio_requests_total``) in a Prometheus
    text page whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


class Held:
    """A long connection running in a pod (``tool hold``): says ``open``, then ``closed <t>``."""

    def __init__(self, proc: subprocess.Popen[Any]) -> None:
        self.proc = proc
        assert proc.stdout is not None
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._lines.append(raw.decode().strip())

    def wait_open(self, timeout: float = 5.0) -> None:
        eventually(lambda: "open" in self._lines or self.proc.poll() is not None, timeout,
                   "the held connection opened")
        if "open" not in self._lines:
            raise MeshTestError(f"held connection never opened: {self.stderr()}")

    def closed_at(self, timeout: float) -> float | None:
        """CLOCK_MONOTONIC time at which the pod saw the connection end (None: still open)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self._lines):
                if line.startswith("closed "):
                    return float(line.split()[1])
            time.sleep(0.05)
        return None

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        data: bytes = self.proc.stderr.read()
        return data.decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=5)
        self._reader.join(timeout=2)
        for s in (self.proc.stdout, self.proc.stderr):
            if s is not None:
                s.close()


@contextlib.contextmanager
def running_mesh(key: str, world: World, workdir: Path) -> Iterator[Mesh]:
    """Build ``world`` under a prefix derived from ``key``, run its mesh, remove it all.

    Teardown (processes by PID, namespaces, cgroups, the run's BPF pins) runs
    pass or fail; whatever it could not remove fails the test.
    """
    prefix = prefix_for(key)
    topo = Topology.build(topology_spec(world, prefix))
    mesh = Mesh(topo, world, workdir)
    try:
        mesh.start()
        yield mesh
    finally:
        errors: list[str] = []
        try:
            topo.teardown()
        except Exception as exc:
            errors.append(str(exc))
            errors += sweep(prefix)
        left = leftovers(prefix)
        if left:
            errors.append(f"{prefix}: left behind {left}")
        if errors:
            raise MeshTestError("mesh teardown: " + "; ".join(errors))


def world_of(namespaces: Mapping[str, bool | Mapping[str, str]], pods: Sequence[DemoPod],
             services: Sequence[DemoService], waypoints: Sequence[DemoWaypoint] = ()) -> World:
    """A World (nodes in the order the pods name them; ``node1`` runs the controller).

    A namespace is ambient (True), not (False), or has exactly the labels given.
    """
    return World(
        namespaces=MappingProxyType({
            ns: (MappingProxyType(dict(on)) if not isinstance(on, bool)
                 else AMBIENT if on else MappingProxyType({}))
            for ns, on in namespaces.items()}),
        nodes=tuple(dict.fromkeys([*(p.node for p in pods), *(w.node for w in waypoints)])),
        pods=tuple(pods),
        services=tuple(services),
        waypoints=tuple(waypoints),
    )


# -- the wire: a pcap read back, TLS records checked ------------------------------------------


@dataclass(frozen=True)
class Segment:
    src: tuple[str, int]
    dst: tuple[str, int]
    seq: int
    flags: int
    payload: bytes

    @property
    def syn(self) -> bool:
        return bool(self.flags & 0x02)


def read_pcap(data: bytes) -> list[Segment]:
    """The TCP/IPv4 segments of a classic pcap file (Ethernet link type), in capture order."""
    if len(data) < 24:
        return []
    magic = data[:4]
    endian = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">",
              b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\x3c\x4d": ">"}.get(magic)
    if endian is None:
        raise ValueError(f"not a classic pcap file (magic {magic.hex()})")
    (linktype,) = struct.unpack(endian + "I", data[20:24])
    if linktype != 1:
        raise ValueError(f"link type {linktype}, expected Ethernet (1)")
    out: list[Segment] = []
    pos = 24
    while pos + 16 <= len(data):
        _ts, _us, incl, _orig = struct.unpack(endian + "IIII", data[pos:pos + 16])
        frame = data[pos + 16:pos + 16 + incl]
        pos += 16 + incl
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        if ip[9] != 6:
            continue
        tcp = ip[ihl:total]
        sport, dport, seq = struct.unpack("!HHI", tcp[:8])
        offset = (tcp[12] >> 4) * 4
        src = socket.inet_ntoa(ip[12:16])
        dst = socket.inet_ntoa(ip[16:20])
        out.append(Segment((src, sport), (dst, dport), seq, tcp[13], bytes(tcp[offset:])))
    return out


def tcp_streams(segments: Sequence[Segment]) -> dict[tuple[tuple[str, int], tuple[str, int]],
                                                     bytes]:
    """Each direction's byte stream, for flows whose SYN was captured (so it starts at 0)."""
    isn: dict[tuple[tuple[str, int], tuple[str, int]], int] = {}
    parts: dict[tuple[tuple[str, int], tuple[str, int]], dict[int, bytes]] = {}
    for s in segments:
        key = (s.src, s.dst)
        if s.syn:
            isn[key] = s.seq + 1
        elif key in isn and s.payload:
            parts.setdefault(key, {})[(s.seq - isn[key]) % 2**32] = s.payload
    streams = {}
    for key, chunks in parts.items():
        buf = bytearray()
        for off in sorted(chunks):
            if off > len(buf):
                break  # a hole (a lost packet in the capture): stop there
            buf += chunks[off][len(buf) - off:]
        streams[key] = bytes(buf)
    return streams


TLS_CONTENT_TYPES = {0x14: "change_cipher_spec", 0x15: "alert", 0x16: "handshake",
                     0x17: "application_data"}


def tls_records(stream: bytes) -> list[tuple[int, int, int]]:
    """(content type, version, length) of each TLS record in ``stream``; ValueError if any
    byte of it is not inside a well-formed record (a truncated last record is allowed)."""
    records = []
    pos = 0
    while pos + 5 <= len(stream):
        ctype, version, length = struct.unpack("!BHH", stream[pos:pos + 5])
        if ctype not in TLS_CONTENT_TYPES or version not in (0x0301, 0x0303) \
                or length > 2**14 + 256:
            raise ValueError(f"no TLS record at byte {pos}: {stream[pos:pos + 8].hex()}")
        records.append((ctype, version, length))
        pos += 5 + length
    return records


# -- the TCP tools the tests run in pods ----------------------------------------------------------


def tool(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.netns.mesh_fixtures", *args]


def _echo_twice(port: int) -> None:
    """Each byte received comes back twice; the connection is closed at the peer's EOF."""
    sel = selectors.DefaultSelector()
    lsock = socket.create_server(("0.0.0.0", port), reuse_port=False)
    lsock.setblocking(False)
    sel.register(lsock, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is lsock:
                conn, _ = lsock.accept()
                conn.setblocking(True)
                sel.register(conn, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(65536)
                if data:
                    sock.sendall(data + data)
                    continue
            except OSError:
                pass
            sel.unregister(sock)
            sock.close()


def _send(host: str, port: int, nbytes: int) -> None:
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"m" * nbytes)
        s.shutdown(socket.SHUT_WR)
        got = 0
        while chunk := s.recv(65536):
            got += len(chunk)
    print(got)


def _hold(host: str, port: int) -> None:
    s = socket.create_connection((host, port), timeout=5)
    s.settimeout(1.0)
    said_open = False
    try:
        while True:
            s.sendall(b"h")
            if not s.recv(16):
                break
            if not said_open:
                print("open", flush=True)
                said_open = True
            time.sleep(0.05)
    except OSError as exc:
        print(f"error {exc}", file=sys.stderr, flush=True)
    print(f"closed {time.monotonic():.6f}", flush=True)
    s.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mesh_fixtures", description="TCP tools for mesh tests")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("echo-twice").add_argument("port", type=int)
    for name in ("send", "hold"):
        sp = sub.add_parser(name)
        sp.add_argument("host")
        sp.add_argument("port", type=int)
        if name == "send":
            sp.add_argument("nbytes", type=int)
    args = p.parse_args(argv)
    if args.cmd == "echo-twice":
        _echo_twice(args.port)
    elif args.cmd == "send":
        _send(args.host, args.port, args.nbytes)
    else:
        _hold(args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
