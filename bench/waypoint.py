"""The waypoint's L7 path against HAProxy doing the same 90/10 split, same run.

    .venv/bin/python -m bench.waypoint [--duration 10] [--rate 1000] [--connections 16]
        [--repeat 3] [--no-floor]
    .venv/bin/python -m bench.waypoint --instructions 5000   # user-space instructions

Two backends (the demo's HTTP service, one process each) stand for reviews v1
and v2. In front of them, on loopback:

- haproxy (Debian's, ``mode http``, one thread, weighted round robin 90/10);
- the waypoint (one process on uvloop, its per-request modules compiled by mypyc
  when built (``make native``; the table's header says which), a VirtualService
  with a 90/10 weighted route, the plaintext listener: no TLS on either side,
  access log off like HAProxy's).

- for reference, ``py-floor``: the least an HTTP/1.1-aware Python proxy does per
  request on the same runtime (uvloop, llhttp via httptools, asyncio Protocols):
  parse each message to find where it ends, pick v1/v2 by smooth weighted round
  robin, forward the bytes unchanged over a kept-alive upstream connection. No
  routing table, no header handling, no metrics. It is a yardstick, not a proxy
  anyone should run: the distance from it to the waypoint is what the
  waypoint's own per-request work costs; the distance from it to HAProxy is the
  runtime's (``--no-floor`` leaves it out).

Each target gets, in turn:

1. saturation: ``wrk`` with N keep-alive connections -> requests/s (and
   its latency percentiles at saturation), and the proxy process's CPU time
   (utime + stime from /proc) per request over that run;
2. fixed rate: ``h2load --h1 --rps`` at ``--rate`` requests/s over 10
   connections, per-request times from ``--log-file`` -> p50 / p99.

Goals (issue 9): requests/s >= 0.7x HAProxy; p99 at 1,000 requests/s <= 2x.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from ztunnel_py import native

REPO = Path(__file__).resolve().parents[1]
HOST = "reviews:9080"

ROUTING = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bench}
spec:
  hosts: [reviews]
  http:
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v2}, weight: 10}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bench}
spec:
  host: reviews
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, deadline_s: float = 15.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {deadline_s}s")


def _backends(v1: int, v2: int, env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    """reviews v1 and v2: the demo's HTTP service, one process each."""
    return [subprocess.Popen(
        [sys.executable, "-m", "ztunnel_py.demo.httpservice", "--pod", pod, "--version",
         version, "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for pod, version, port in (("reviews-v1", "v1", v1), ("reviews-v2", "v2", v2))]


# -- the waypoint, in a child process ----------------------------------------------------


def serve_waypoint(port: int, v1: int, v2: int) -> None:
    import asyncio
    import random

    import uvloop
    import yaml

    from waypoint.proxy import WaypointProxy
    from waypoint.server import PlainListener
    from waypoint.upstream import TcpConnector, Upstreams
    from ztunnel_py import log
    from ztunnel_py.config import LogConfig
    from ztunnel_py.controller.translate import KubeObject, translate
    from ztunnel_py.state.snapshot import StateStore, settle_heap

    log.configure(LogConfig(level="warning"))
    pods = {"10.1.0.1": v1, "10.1.0.2": v2}
    bodies = [
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": f"reviews-{v}", "namespace": "bench",
                      "labels": {"app": "reviews", "version": v}},
         "spec": {"nodeName": "n1"}, "status": {"podIP": ip}}
        for v, ip in (("v1", "10.1.0.1"), ("v2", "10.1.0.2"))
    ]
    bodies.append({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": "reviews", "namespace": "bench"},
                   "spec": {"selector": {"app": "reviews"}, "clusterIP": "10.96.0.10",
                            "ports": [{"name": "http", "port": 9080, "targetPort": 8080}]}})
    bodies += [d for d in yaml.safe_load_all(ROUTING) if d]
    t = translate([KubeObject(f"b#{i}", b) for i, b in enumerate(bodies)],
                  trust_domain="cluster.local", root_namespace="istio-system")
    if t.errors:
        raise SystemExit("; ".join(map(str, t.errors)))
    settle_heap()  # as the waypoint's ConfigClient does after a full snapshot

    async def main() -> None:
        proxy = WaypointProxy(
            StateStore(t.snapshot), "bench", "waypoint",
            Upstreams(TcpConnector(lambda ep: ("127.0.0.1", pods[ep.address]))),
            rng=random.Random(1),
        )
        listener = PlainListener(proxy, "127.0.0.1", port)
        await listener.start()
        print("ready", flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


# -- the yardstick: a bare HTTP/1.1 forwarder, in a child process --------------------------


def serve_floor(port: int, v1: int, v2: int) -> None:
    import asyncio

    import httptools
    import uvloop

    backends = ((90, v1), (10, v2))

    class Upstream(asyncio.Protocol):
        transport: asyncio.Transport | None
        def __init__(self, down: Downstream) -> None:
            self.down = down
            self.transport = None
            self.parser = httptools.HttpResponseParser(self)

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)

        def data_received(self, data: bytes) -> None:
            if self.down.transport is not None:
                self.down.transport.write(data)
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            self.down.answered()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.down.transport is not None:
                self.down.transport.close()

    class Downstream(asyncio.Protocol):
        transport: asyncio.Transport | None
        def __init__(self) -> None:
            self.transport = None
            self.parser = httptools.HttpRequestParser(self)
            self.pending: list[bytes] = []
            self.queue: list[bytes] = []
            self.busy = False
            self.current = [0] * len(backends)
            self.upstreams: dict[int, Upstream] = {}

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)

        def data_received(self, data: bytes) -> None:
            self.pending.append(data)
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            self.queue.append(b"".join(self.pending))
            self.pending = []
            self.next()

        def next(self) -> None:
            if self.busy or not self.queue:
                return
            self.busy = True
            request = self.queue.pop(0)
            total, best = 0, 0  # smooth weighted round robin (nginx's, as HAProxy's)
            for i, (weight, _) in enumerate(backends):
                self.current[i] += weight
                total += weight
                if self.current[i] > self.current[best]:
                    best = i
            self.current[best] -= total
            up = self.upstreams.get(best)
            if up is not None and up.transport is not None and not up.transport.is_closing():
                up.transport.write(request)
            else:
                asyncio.get_running_loop().create_task(self.dial(best, request))

        async def dial(self, i: int, request: bytes) -> None:
            loop = asyncio.get_running_loop()
            _, up = await loop.create_connection(lambda: Upstream(self), "127.0.0.1",
                                                 backends[i][1])
            self.upstreams[i] = up
            if up.transport is not None:
                up.transport.write(request)

        def answered(self) -> None:
            self.busy = False
            self.next()

        def connection_lost(self, exc: Exception | None) -> None:
            for up in self.upstreams.values():
                if up.transport is not None:
                    up.transport.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(Downstream, "127.0.0.1", port, backlog=4096)
        print("ready", flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


# -- load -------------------------------------------------------------------------------


@dataclass
class Result:
    rps: float = 0.0
    cpu_us: float = 0.0  # the proxy's CPU time per request at saturation
    sat_p50_ms: float = 0.0
    sat_p99_ms: float = 0.0
    fixed_rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    errors: int = 0


def _ms(text: str) -> float:
    for unit, scale in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(port: int, duration: int, connections: int, out: Result, pid: int) -> None:
    cpu0 = cpu_seconds(pid)
    proc = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-H", f"Host: {HOST}",
         f"http://127.0.0.1:{port}/"], capture_output=True, text=True, check=True,
        timeout=duration + 30)
    for line in proc.stdout.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            out.rps = float(parts[1])
        elif parts[:1] == ["50%"]:
            out.sat_p50_ms = _ms(parts[1])
        elif parts[:1] == ["99%"]:
            out.sat_p99_ms = _ms(parts[1])
        elif "Non-2xx" in line or "Socket errors" in line:
            out.errors += sum(int(p.strip(",")) for p in parts if p.strip(",").isdigit())
    if out.rps:
        out.cpu_us = (cpu_seconds(pid) - cpu0) / (out.rps * duration) * 1e6


def run_fixed_rate(port: int, duration: int, rate: int, out: Result) -> None:
    clients = 10
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "h2load.log"
        subprocess.run(
            ["h2load", "--h1", f"-c{clients}", f"--rps={max(1, rate // clients)}",
             f"-D{duration}", "--warm-up-time=1", f"--log-file={log}",
             f"--connect-to=127.0.0.1:{port}", f"http://{HOST}/"],
            capture_output=True, text=True, check=True, timeout=duration + 30)
        rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    times = sorted(int(r[2]) / 1000.0 for r in rows)
    out.errors += sum(1 for r in rows if not r[1].startswith("2"))
    if times:
        q = statistics.quantiles(times, n=100, method="inclusive")
        out.p50_ms, out.p99_ms = q[49], q[98]
        out.fixed_rps = len(times) / duration


def median_result(rounds: list[Result]) -> Result:
    """Each figure's median over the rounds (errors: summed)."""
    out = Result()
    for f in ("rps", "cpu_us", "sat_p50_ms", "sat_p99_ms", "fixed_rps", "p50_ms", "p99_ms"):
        setattr(out, f, statistics.median(getattr(r, f) for r in rounds))
    out.errors = sum(r.errors for r in rounds)
    return out


# -- instructions per request (callgrind): a steadier yardstick than CPU time -----------

WARM_UP_REQUESTS = 3000


def count_instructions(requests: int) -> int:
    """The waypoint's user-space instructions per proxied request: the waypoint under
    ``valgrind --tool=callgrind``, its counters zeroed after a warm-up, then ``requests``
    requests by ``h2load --h1 -c 16`` and a dump. Deterministic to a fraction of a
    percent, where CPU time on a shared box moves by 10-15 %: for comparing two
    builds (run it in each checkout). The kernel's part is not counted."""
    for tool in ("valgrind", "callgrind_control", "h2load"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (apt-get install valgrind nghttp2-client)")
            return 2
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            v1, v2, wp_port = (_free_port() for _ in range(3))
            procs += _backends(v1, v2, env)
            out = Path(tmp) / "callgrind.out"
            waypoint = subprocess.Popen(
                ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                 sys.executable, "-m", "bench.waypoint", "--serve-waypoint", str(wp_port),
                 str(v1), str(v2)],
                env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(waypoint)
            for port in (v1, v2):
                _wait_port(port)
            _wait_port(wp_port, deadline_s=300.0)  # (an interpreter under valgrind)
            load = ["h2load", "--h1", "-c", "16", "-H", f"Host: {HOST}",
                    f"http://127.0.0.1:{wp_port}/"]
            subprocess.run([*load, "-n", str(WARM_UP_REQUESTS)], capture_output=True,
                           check=True, timeout=600)
            subprocess.run(["callgrind_control", "--zero", str(waypoint.pid)],
                           capture_output=True, check=True, timeout=60)
            ran = subprocess.run([*load, "-n", str(requests)], capture_output=True, text=True,
                                 check=True, timeout=1800)
            subprocess.run(["callgrind_control", "--dump", str(waypoint.pid)],
                           capture_output=True, check=True, timeout=60)
            dumps = sorted(Path(tmp).glob("callgrind.out.*"))
            total = next(int(line.split()[1]) for line in dumps[-1].read_text().splitlines()
                         if line.startswith(("summary:", "totals:")))
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
    done = next((line.strip() for line in ran.stdout.splitlines()
                 if line.startswith("requests:")), "")
    print(f"waypoint ({native.describe()}): {total / requests:,.0f} instructions per request "
          f"(user space, callgrind; {requests} requests by h2load --h1 -c 16 after "
          f"{WARM_UP_REQUESTS} to warm up)\nh2load {done}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    p.add_argument("--rate", type=int, default=1000, help="fixed request rate (requests/s)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds (haproxy and waypoint alternating); the table shows medians")
    p.add_argument("--no-floor", action="store_true",
                   help="leave out the py-floor yardstick (a bare Python forwarder)")
    p.add_argument("--instructions", type=int, metavar="REQUESTS",
                   help="instead: count the waypoint's instructions per request over "
                        "REQUESTS requests under callgrind (steady, for comparing builds)")
    p.add_argument("--serve-waypoint", nargs=3, type=int, metavar=("PORT", "V1", "V2"),
                   help=argparse.SUPPRESS)
    p.add_argument("--serve-floor", nargs=3, type=int, metavar=("PORT", "V1", "V2"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_waypoint:
        serve_waypoint(*args.serve_waypoint)
        return 0
    if args.serve_floor:
        serve_floor(*args.serve_floor)
        return 0
    if args.instructions:
        return count_instructions(args.instructions)
    for tool in ("wrk", "h2load", "haproxy"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (apt-get install wrk nghttp2-client haproxy)")
            return 2
    procs: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    tmp = tempfile.TemporaryDirectory()
    try:
        v1, v2, wp_port, ha_port, floor_port = (_free_port() for _ in range(5))
        procs += _backends(v1, v2, env)
        waypoint = subprocess.Popen(
            [sys.executable, "-m", "bench.waypoint", "--serve-waypoint", str(wp_port), str(v1),
             str(v2)], env=env, stdout=subprocess.DEVNULL, cwd=REPO)
        procs.append(waypoint)
        targets = [("haproxy", ha_port), ("waypoint", wp_port)]
        if not args.no_floor:
            floor = subprocess.Popen(
                [sys.executable, "-m", "bench.waypoint", "--serve-floor", str(floor_port),
                 str(v1), str(v2)], env=env, stdout=subprocess.DEVNULL, cwd=REPO)
            procs.append(floor)
            targets.append(("py-floor", floor_port))
        cfg = Path(tmp.name) / "haproxy.cfg"
        cfg.write_text(f"""global
  maxconn 4096
  nbthread 1
defaults
  mode http
  option http-keep-alive
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend fe
  bind 127.0.0.1:{ha_port}
  default_backend be
backend be
  balance roundrobin
  server v1 127.0.0.1:{v1} weight 90
  server v2 127.0.0.1:{v2} weight 10
""")
        haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(haproxy)
        pids = {"haproxy": haproxy.pid, "waypoint": waypoint.pid}
        if not args.no_floor:
            pids["py-floor"] = floor.pid
        for port in (v1, v2, *(p for _, p in targets)):
            _wait_port(port)
        rounds: dict[str, list[Result]] = {name: [] for name, _ in targets}
        for _ in range(max(1, args.repeat)):
            for name, port in targets:
                pid = pids[name]
                r = Result()
                run_wrk(port, args.duration, args.connections, r, pid)
                run_fixed_rate(port, args.duration, args.rate, r)
                rounds[name].append(r)
        results = {name: median_result(rs) for name, rs in rounds.items()}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        tmp.cleanup()
    ha, wp = results["haproxy"], results["waypoint"]
    print(f"\nwaypoint vs haproxy, 90/10 split, HTTP/1.1 keep-alive on loopback, "
          f"{args.duration}s per run, {args.repeat} round(s) (medians), {os.cpu_count()} CPUs; "
          f"haproxy: nbthread 1; "
          f"waypoint: 1 process (uvloop, {native.describe()}); wrk -t1 -c{args.connections}")
    head = (f"{'target':10} {'req/s (max)':>12} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>11} "
            f"{'@rate req/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        print(f"{name:10} {r.rps:12.0f} {r.sat_p50_ms:8.2f} {r.sat_p99_ms:8.2f} {r.cpu_us:11.1f} "
              f"{r.fixed_rps:12.0f} {r.p50_ms:8.2f} {r.p99_ms:8.2f} {r.errors:7d}")

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "n/a"

    def ratio_row(label: str, x: Result) -> None:
        print(f"{label:10} {ratio(x.rps, ha.rps):>12} {ratio(x.sat_p50_ms, ha.sat_p50_ms):>8} "
              f"{ratio(x.sat_p99_ms, ha.sat_p99_ms):>8} {ratio(x.cpu_us, ha.cpu_us):>11} "
              f"{'':>12} {ratio(x.p50_ms, ha.p50_ms):>8} {ratio(x.p99_ms, ha.p99_ms):>8}")

    ratio_row("ratio", wp)
    if "py-floor" in results:
        ratio_row("floor/hap", results["py-floor"])
        print("(py-floor: a bare Python forwarder on the same runtime, no routing, headers or "
              "metrics; a yardstick, not a goal)")
    print(f"\ngoals: req/s >= 0.70x haproxy (got {ratio(wp.rps, ha.rps)}); "
          f"p99 at {args.rate} req/s <= 2x haproxy (got {ratio(wp.p99_ms, ha.p99_ms)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
