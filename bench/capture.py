"""What eBPF capture costs: latency it adds, and the agent's memory with it active.

    .venv/bin/python -m bench.capture [--connections 300]

Builds a one-node topology (its own prefix, removed at the end), installs the
capture with the pod enrolled, and runs one listener in the node namespace
(:15001, IP_TRANSPARENT, an echo). From inside the pod, alternately:

- captured: connect to a remote address; tc steers it to the listener;
- direct:   connect to the node's own address on :15001 (never captured).

Each sample is connect time and one 1-byte round trip. Then RSS: a bare
interpreter; a process holding the pinned capture (what the agent does:
``Capture.install`` + ``reconcile`` + ``counters``, no bcc); a process that
compiles the same programs with bcc in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CAPTURED_DST = ("10.99.0.1", 80)  # nowhere: only capture can answer


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


# -- roles run in child processes ----------------------------------------------


def serve(port: int) -> None:
    from ztunnel_py.redirect.sockets import transparent_listener

    ln = transparent_listener("0.0.0.0", port)
    ln.setblocking(True)
    print("ready", flush=True)

    def echo(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:
                pass

    while True:
        conn, _ = ln.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def client(captured: tuple[str, int], direct: tuple[str, int], n: int) -> None:
    out: dict[str, dict[str, list[float]]] = {
        "captured": {"connect": [], "rtt": []}, "direct": {"connect": [], "rtt": []}}
    for i in range(2 * n):
        kind = "captured" if i % 2 == 0 else "direct"
        addr = captured if kind == "captured" else direct
        t0 = time.perf_counter()
        s = socket.create_connection(addr, timeout=5)
        t1 = time.perf_counter()
        s.sendall(b"x")
        s.recv(1)
        t2 = time.perf_counter()
        s.close()
        out[kind]["connect"].append((t1 - t0) * 1e6)
        out[kind]["rtt"].append((t2 - t1) * 1e6)
    print(json.dumps(out))


def rss_bare() -> None:
    print(json.dumps({"rss_kib": _rss_kib()}))


def rss_pinned(node: str, pin_root: str) -> None:
    from ztunnel_py.redirect import Capture
    from ztunnel_py.state.model import Workload
    from ztunnel_py.state.snapshot import Snapshot

    pod_ip = os.environ["BENCH_POD_IP"]
    cap = Capture(node, pin_root=Path(pin_root))
    cap.install()
    cap.reconcile(Snapshot(workloads=(Workload(
        uid="bench/pod", name="pod", namespace="bench", service_account="default", node=node,
        ips=(pod_ip,), enrolled=True),)))
    cap.counters()
    print(json.dumps({"rss_kib": _rss_kib(), "bcc_loaded": "bcc" in sys.modules}))
    cap.close()


def rss_compile(pin_dir: str) -> None:
    from bcc import BPF

    from ztunnel_py.redirect.hooks import DEFAULT_BPF_DIR, HOOKS, expand

    Path(pin_dir).mkdir(parents=True)
    modules = []
    for hook in HOOKS:
        text = expand(DEFAULT_BPF_DIR / hook.source, DEFAULT_BPF_DIR / "include")
        m = BPF(text=text.encode(), cflags=[f'-DZT_PIN_DIR="{pin_dir}"'])
        m.load_func(hook.name.encode(), BPF.SCHED_CLS)
        modules.append(m)
    print(json.dumps({"rss_kib": _rss_kib()}))


# -- orchestration -----------------------------------------------------------------


def _child(topo: object, where: str | None, argv: list[str],
           env: dict[str, str] | None = None) -> dict[str, object]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    cmd = [sys.executable, "-m", "bench.capture", *argv]
    if where is None:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=300,
                              cwd=REPO, check=False)
    else:
        proc = topo.run(where, cmd, env=full_env, timeout=300)  # type: ignore[attr-defined]
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _row(name: str, samples: list[float], base: list[float]) -> str:
    med, bmed = statistics.median(samples), statistics.median(base)
    p99 = sorted(samples)[max(0, int(len(samples) * 0.99) - 1)]
    return (f"{name:<22} {med:>9.1f} {p99:>9.1f} {statistics.fmean(samples):>9.1f} "
            f"{med / bmed:>7.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.capture")
    parser.add_argument("--connections", type=int, default=300)
    sub = parser.add_subparsers(dest="role")
    sub.add_parser("serve").add_argument("port", type=int)
    c = sub.add_parser("client")
    c.add_argument("direct_ip")
    c.add_argument("n", type=int)
    sub.add_parser("rss-bare")
    p = sub.add_parser("rss-pinned")
    p.add_argument("node")
    p.add_argument("pin_root")
    sub.add_parser("rss-compile").add_argument("pin_dir")
    args = parser.parse_args()
    if args.role == "serve":
        serve(args.port)
        return 0
    if args.role == "client":
        client(CAPTURED_DST, (args.direct_ip, 15001), args.n)
        return 0
    if args.role == "rss-bare":
        rss_bare()
        return 0
    if args.role == "rss-pinned":
        rss_pinned(args.node, args.pin_root)
        return 0
    if args.role == "rss-compile":
        rss_compile(args.pin_dir)
        return 0
    return run(args.connections)


def run(n: int) -> int:
    from ztunnel_py.redirect import Capture
    from ztunnel_py.redirect.compile import DEFAULT_KERNEL_HEADERS
    from ztunnel_py.state.model import Workload
    from ztunnel_py.state.snapshot import Snapshot
    from ztunnel_py.topology import Topology, TopologySpec, new_prefix

    prefix = new_prefix("zb")
    pin_root = Path("/sys/fs/bpf") / prefix
    topo = Topology.build(TopologySpec.simple(1, 1, prefix=prefix))
    try:
        node, pod = topo.node("node1"), topo.pod("node1-pod1")
        t0 = time.perf_counter()
        cap = Capture("node1", pin_root=pin_root, netns=node.netns)
        cap.install()
        compile_s = time.perf_counter() - t0
        cap.reconcile(Snapshot(workloads=(Workload(
            uid="bench/pod", name=pod.name, namespace="bench", service_account="default",
            node="node1", ips=(pod.ip,), enrolled=True),)))
        server = topo.popen(node, [sys.executable, "-m", "bench.capture", "serve", "15001"],
                            stdout=subprocess.PIPE, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
        assert server.stdout is not None
        server.stdout.readline()
        lat = _child(topo, pod.name, ["client", node.pod_gateway, str(n)])
        counters = cap.counters()
        cap.close()
        server.terminate()
        server.wait(timeout=5)

        bare = _child(topo, node.name, ["rss-bare"])
        pinned = _child(topo, node.name, ["rss-pinned", "node1", str(pin_root)],
                        env={"BENCH_POD_IP": pod.ip})
        compiled = _child(topo, node.name, ["rss-compile", str(pin_root / "inproc")],
                          env={"BCC_KERNEL_SOURCE": os.environ.get(
                              "BCC_KERNEL_SOURCE", str(DEFAULT_KERNEL_HEADERS))})
    finally:
        topo.teardown()
        shutil.rmtree(pin_root, ignore_errors=True)

    cap_d, dir_d = lat["captured"], lat["direct"]
    assert isinstance(cap_d, dict) and isinstance(dir_d, dict)
    print(f"capture latency: {n} connections each, alternating; microseconds")
    print(f"{'':<22} {'median':>9} {'p99':>9} {'mean':>9} {'vs direct':>8}")
    print(_row("direct connect", dir_d["connect"], dir_d["connect"]))
    print(_row("captured connect", cap_d["connect"], dir_d["connect"]))
    print(_row("direct 1-byte rtt", dir_d["rtt"], dir_d["rtt"]))
    print(_row("captured 1-byte rtt", cap_d["rtt"], dir_d["rtt"]))
    print(f"(captured connections counted by the programs: "
          f"{counters['reasons']['out_captured']})")
    print()
    print("process RSS (MiB)")
    b = int(bare["rss_kib"])  # type: ignore[call-overload]
    for name, d in (("bare python", bare), ("holding pinned capture", pinned),
                    ("bcc compile in-process", compiled)):
        kib = int(d["rss_kib"])  # type: ignore[call-overload]
        print(f"{name:<26} {kib / 1024:>8.1f}  {kib / b:>5.2f}x")
    print(f"(bcc imported by the pinned holder: {pinned['bcc_loaded']}; "
          f"first install incl. child compile: {compile_s:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
