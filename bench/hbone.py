"""HBONE data-path benchmark: direct vs two agents vs two HAProxy mTLS (TCP mode).

    sudo .venv/bin/python -m bench.hbone [--duration 10] [--rate 2000] [--repeat 3]
        [--only latency] [--path agents --path haproxy] [--hops]
    sudo .venv/bin/python -m bench.hbone --instructions 1000

One namespace topology (``ztunnel_py.topology``): node1 with a client pod,
node2 with a server pod, joined by the underlay. The server pod runs iperf3
and an HAProxy HTTP responder (a fixed 200, so that the app is never the
bottleneck). The same client tools run in the client pod against three paths:

* direct   - client pod -> server pod (routed through the nodes, no proxy);
* agents   - client pod -> agent on node1 (outbound) == HBONE (mTLS, HTTP/2
  CONNECT, pooled) ==> agent on node2 (inbound :15008) -> server pod;
* haproxy  - client pod -> HAProxy on node1 == TLS 1.3 mTLS, TCP mode, one
  backend connection per client connection ==> HAProxy on node2 -> server pod.
  Each HAProxy runs ``nbthread 1``: the same CPU budget as an agent (one
  single-threaded Python process). The ratios are against this pair.
* haproxy-mt - the same with HAProxy's default threads (one per CPU), for
  reference (``--no-haproxy-mt`` skips it).

Capture is not part of this benchmark (the eBPF issue owns it). Clients
address the node1 proxies directly, and the original destination comes
through the agent's seam: each outbound listener port has a *fixed
destination* (``DstTable.by_listen_port``), and the HBONE dial seam sends
``<server pod>:15008`` to node2's underlay address, where agent2's inbound
listener maps it back to the pod for certificate selection. Everything else
(pool, TLS, identity checks, relay) is the production code path, and the
agents run the production telemetry too: Prometheus metrics (with the process
collector) and a JSON access-log line per connection, at level info, as the
DaemonSet configures ``ztunnel-py agent``.

Measurements: iperf3 throughput with 1 and 4 streams; wrk requests/s at 16
keep-alive connections; wrk with ``Connection: close`` (one request per
connection: new connections/s); and p50/p99 latency at a fixed request rate
from an open-loop client paced to the microsecond (latency counted from the
scheduled send time, so queueing is not hidden). The paths take turns within
one run at the fixed rate (0.2 s each) and for new connections/s (2 s of wrk
each), so that their figures come from the same seconds of a machine whose
speed drifts; throughput and requests/s run on every path back to back. The
order of the paths flips every round (``--repeat``: the medians of the rounds,
and each round's ratios printed beneath). The CPU table beside it charges
each proxy pair's CPU time to the work done; its last row (CPU per request during
the fixed-rate run, where requests come one at a time) is the one that tracks
latency: there every request pays its own wakeups and syscalls, which saturation
amortizes.

``--instructions N`` replaces the tables with a yardstick for comparing builds: both
agents and both HAProxy instances under callgrind, and their user-space instructions per
kept-alive request and per new connection (N of each, one at a time), repeatable to a
fraction of a percent where CPU time here moves by 10-15 % between runs. The kernel's
part is not counted. How fast the instructions run is shown by proxy: callgrind's
simulated L1 cache misses for the same work (a Python process runs the same count
slower, because more of its time goes to memory).

``--hops`` explains the latency figure: tcpdump on both nodes during each
fixed-rate run, and a table of the p50 time each hop adds (node1's proxy, the
underlay, node2's proxy, the app, and back), per path.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztunnel_py import native

REPO = Path(__file__).resolve().parent.parent

IPERF_PORT = 5201
HTTP_PORT = 8080
AGENT_PORTS = {IPERF_PORT: 15101, HTTP_PORT: 15102}
HAPROXY_FRONT = {IPERF_PORT: 16101, HTTP_PORT: 16102}
HAPROXY_BACK = {IPERF_PORT: 16201, HTTP_PORT: 16202}
HAPROXY_MT_OFFSET = 1000  # the default-threads pair listens 1000 ports higher
SLICE_S = 0.2  # the fixed-rate run's turn per path: 400 requests at 2000/s
TURN_S = 2  # new connections/s: each path's turn of wrk (whole seconds)
CLIENT_SA, SERVER_SA = "bench-client", "bench-server"


# -- the agent process (runs inside a node's netns) ----------------------------------


def run_agent(config_path: str) -> int:
    """``python -m bench.hbone agent <json>``: one agent with a static snapshot."""
    import uvloop

    from ztunnel_py import log
    from ztunnel_py.config import HboneConfig, LogConfig
    from ztunnel_py.identity.certs import WorkloadCertificate
    from ztunnel_py.proxy.server import Proxy
    from ztunnel_py.proxy.testing import DstTable
    from ztunnel_py.state.model import Workload
    from ztunnel_py.state.snapshot import Snapshot, StateStore, settle_heap
    from ztunnel_py.telemetry.accesslog import AccessLog
    from ztunnel_py.telemetry.metrics import Metrics

    cfg = json.loads(Path(config_path).read_text())
    # The same telemetry as ``ztunnel-py agent`` in its DaemonSet (LOG_FORMAT=json, the
    # default level info): Istio's TCP metrics with the process collector, and one JSON
    # access-log line per connection on each side (to the agent's log file here).
    log.configure(LogConfig(format="json", level="info"))
    metrics = Metrics(process=True)
    access_log = AccessLog()
    metrics.attach()
    access_log.attach()

    class StaticCertificates:
        def __init__(self, certs: dict[str, WorkloadCertificate]) -> None:
            self.certs = certs

        async def fetch(self, identity: str) -> WorkloadCertificate:
            return self.certs[identity]

    certs = {
        c["identity"]: WorkloadCertificate.from_pem(
            c["chain"].encode(), c["key"].encode(), c["roots"].encode()
        )
        for c in cfg["certs"]
    }
    workloads = tuple(
        Workload(uid=f"default/{w['name']}", name=w["name"], namespace="default",
                 service_account=w["sa"], node=w["node"], ips=(w["ip"],), enrolled=True)
        for w in cfg["workloads"]
    )
    dst = DstTable()
    dst.by_listen_port = {int(k): (v[0], int(v[1])) for k, v in cfg["fixed_dst"].items()}
    dial = {(k.rsplit(":", 1)[0], int(k.rsplit(":", 1)[1])): (v[0], int(v[1]))
            for k, v in cfg["dial"].items()}

    async def main() -> None:
        proxy = Proxy(
            HboneConfig(), StateStore(Snapshot(version="bench", workloads=workloads)),
            cfg["node"], StaticCertificates(certs),
            original_dst=dst,
            outbound=[tuple(a) for a in cfg["outbound"]],
            inbound=[tuple(a) for a in cfg["inbound"]],
            inbound_plaintext=(),
            hbone_dial=lambda a: dial.get(a, a),
        )
        await proxy.start()
        settle_heap()  # as ``ztunnel-py agent`` does after its first full snapshot
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        print("ready", flush=True)
        await stop.wait()
        await proxy.drain(1.0)

    profile_dir = os.environ.get("BENCH_HBONE_PROFILE")
    if profile_dir:  # cProfile the agent; stats land in <dir>/agent-<node>.prof
        import cProfile

        with cProfile.Profile() as prof:
            uvloop.run(main())
        prof.dump_stats(str(Path(profile_dir) / f"agent-{cfg['node']}.prof"))
    else:
        uvloop.run(main())
    return 0


# -- the fixed-rate latency client (runs inside the client pod) ------------------------


def run_latency(targets: list[tuple[str, int]], rate: float, duration: float, conns: int,
                slice_s: float = SLICE_S) -> int:
    """Open-loop HTTP/1.1 GETs at ``rate``/s to each of ``targets`` in turn, ``slice_s``
    seconds each, until each has had ``duration`` seconds of them; over ``conns`` keep-alive
    connections per target (in turn; a request whose connection is still busy waits for
    it), latency counted from each request's scheduled time. Prints one JSON line: a
    figure set per target, in order (why turns: ``_in_turns``).

    Paced with microsecond timers (``select()``, timer slack 1 us): an event loop's
    timers have millisecond resolution (uvloop's), which sent the requests in bursts
    and added up to a millisecond of the client's own lateness to every figure."""
    import ctypes
    import select
    import socket
    from collections import deque

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(29, 1000)  # PR_SET_TIMERSLACK: 1 us
    now = time.perf_counter
    requests = [f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode() for host, _ in targets]
    socks: list[list[socket.socket]] = []
    target_of: dict[socket.socket, int] = {}
    for n, (host, port) in enumerate(targets):
        socks.append([])
        for _ in range(conns):
            s = socket.create_connection((host, port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            socks[n].append(s)
            target_of[s] = n
    inflight: dict[socket.socket, float] = {}  # one request at a time per connection
    queued: dict[socket.socket, deque[float]] = {s: deque() for s in target_of}
    bufs: dict[socket.socket, bytes] = dict.fromkeys(target_of, b"")
    latencies: list[list[float]] = [[] for _ in targets]
    errors = [0] * len(targets)
    sent = [0] * len(targets)
    per_slice = max(1, round(rate * slice_s))
    total = int(rate * duration) * len(targets)
    time.sleep(0.2)
    start = now() + 0.05
    deadline = start + len(targets) * duration + 10
    i = 0
    while (i < total or inflight) and now() < deadline:
        t = now()
        while i < total and start + i / rate <= t:
            n, at = (i // per_slice) % len(targets), start + i / rate
            s = socks[n][sent[n] % conns]
            i += 1
            sent[n] += 1
            if s in inflight:
                queued[s].append(at)
            else:
                s.send(requests[n])
                inflight[s] = at
        timeout = max(0.0, start + i / rate - now()) if i < total else 0.5
        readable, _, _ = select.select(list(inflight), [], [], timeout)
        for s in readable:
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if not data:
                errors[target_of[s]] += 1
                inflight.pop(s, None)
                continue
            buf = bufs[s] + data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                bufs[s] = buf
                continue
            m = re.search(rb"(?i)content-length:\s*(\d+)", buf[:end])
            size = end + 4 + (int(m.group(1)) if m else 0)
            if len(buf) < size:
                bufs[s] = buf
                continue
            bufs[s] = buf[size:]
            latencies[target_of[s]].append(now() - inflight.pop(s))
            if queued[s]:
                s.send(requests[target_of[s]])
                inflight[s] = queued[s].popleft()
    for s in target_of:
        s.close()

    def figures(lat: list[float], errs: int) -> dict[str, float]:
        lat.sort()

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

        return {"p50_ms": pct(0.50), "p99_ms": pct(0.99), "count": len(lat), "errors": errs,
                "mean_ms": statistics.fmean(lat) * 1000 if lat else float("nan")}

    print(json.dumps([figures(lat, e) for lat, e in zip(latencies, errors, strict=True)]),
          flush=True)
    return 0


# -- instructions per request / connection (callgrind, --instructions) -----------------

WARM_UP = 2000  # requests (and half as many connections) before the counters are zeroed


def run_count(host: str, port: int, requests: int, close: bool, conns: int) -> int:
    """``requests`` HTTP/1.1 GETs, one at a time: in turn over ``conns`` kept-alive
    connections, or each on a connection of its own (``close``: ``Connection: close``,
    read to the end). Prints how many got their response."""
    import socket

    def exchange(s: socket.socket, request: bytes) -> bool:
        s.sendall(request)
        buf = b""
        while True:
            data = s.recv(65536)
            if not data:
                return close and b"\r\n\r\n" in buf
            buf += data
            end = buf.find(b"\r\n\r\n")
            if end >= 0 and not close:
                m = re.search(rb"(?i)content-length:\s*(\d+)", buf[:end])
                if len(buf) >= end + 4 + (int(m.group(1)) if m else 0):
                    return True

    header = "Connection: close\r\n" if close else ""
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\n{header}\r\n".encode()
    ok = 0
    if close:
        for _ in range(requests):
            with socket.create_connection((host, port), timeout=60) as s:
                ok += exchange(s, request)
    else:
        socks = [socket.create_connection((host, port), timeout=60) for _ in range(conns)]
        for i in range(requests):
            ok += exchange(socks[i % conns], request)
        for s in socks:
            s.close()
    print(json.dumps({"ok": ok}), flush=True)
    return 0 if ok == requests else 1


def _count(topo: Any, host: str, port: int, requests: int, close: bool) -> None:
    argv = [sys.executable, "-m", "bench.hbone", "count", host, str(port),
            "--requests", str(requests)] + (["--close"] if close else [])
    res = topo.run("client", argv, timeout=3600, env={**os.environ, "PYTHONPATH": str(REPO)})
    if res.returncode != 0:
        raise RuntimeError(f"count client to {host}:{port}: {res.stdout}{res.stderr}")


def _valgrind(workdir: Path, name: str) -> list[str]:
    """The command prefix that runs a proxy under callgrind with its cache simulation
    (dumps: callgrind-NAME.out.N)."""
    return ["valgrind", "--tool=callgrind", "--cache-sim=yes",
            f"--callgrind-out-file={workdir}/callgrind-{name}.out"]


def callgrind_totals(dump: str) -> dict[str, int]:
    """A callgrind dump's event totals by name (``Ir``, ``I1mr``, ``D1mr``, ...): its
    ``events:`` line names the columns of its ``summary:`` (or ``totals:``) line, which
    leaves out trailing zeros."""
    lines = dump.splitlines()
    names = next(line.split()[1:] for line in lines if line.startswith("events:"))
    counts = next(line.split()[1:] for line in lines
                  if line.startswith(("summary:", "totals:")))
    values = [int(c) for c in counts] + [0] * (len(names) - len(counts))
    return dict(zip(names, values, strict=True))


def _callgrind(command: str, pid: int) -> None:
    subprocess.run(["callgrind_control", f"--{command}", str(pid)], capture_output=True,
                   check=True, timeout=120)


def count_instructions(topo: Any, workdir: Path, paths: dict[str, tuple[dict[str, int], int]],
                       host: str, requests: int) -> None:
    """Each proxy's user-space instructions per request on a kept-alive connection (one
    request at a time, as at the fixed rate) and per new connection (one request each):
    every proxy of each path (``paths``: name -> ({node: pid}, port)) under ``valgrind
    --tool=callgrind``, counters zeroed after a warm-up, dumped after ``requests`` of each
    kind. Deterministic to a fraction of a percent, where CPU time on a shared box moves by
    10-15 %: for comparing two builds, and the agents with HAProxy's pair."""
    labels = (("per request (keep-alive)", False), ("per new connection", True))
    events = (("instructions", ("Ir",)), ("L1 instruction misses", ("I1mr",)),
              ("L1 data misses", ("D1mr", "D1mw")))
    rows: dict[tuple[str, str, str], dict[str, float]] = {}
    for path, (pids, port) in paths.items():
        _count(topo, host, port, WARM_UP, close=False)
        _count(topo, host, port, WARM_UP // 2, close=True)
        for label, close in labels:
            for pid in pids.values():
                _callgrind("zero", pid)
            _count(topo, host, port, requests, close)
            for pid in pids.values():
                _callgrind("dump", pid)
            for node in pids:
                dumps = sorted(workdir.glob(f"callgrind-{path}-{node}.out.*"),
                               key=lambda p: int(p.suffix[1:]))
                totals = callgrind_totals(dumps[-1].read_text())
                for event, keys in events:
                    rows.setdefault((event, label, path), {})[node] = (
                        sum(totals[k] for k in keys) / requests)
    print(f"\nuser space under callgrind (agents {native.describe()}; {requests} of each "
          f"after a warm-up of {WARM_UP}; one at a time)\n")
    print(f"{'metric':48} {'path':>8} {'node1':>10} {'node2':>10} {'both':>10}")
    print("-" * 90)
    for event, _keys in events:
        for label, _close in labels:
            for path in paths:
                r = rows[event, label, path]
                print(f"{event + ' ' + label:48} {path:>8} {r['node1']:>10,.0f} "
                      f"{r['node2']:>10,.0f} {r['node1'] + r['node2']:>10,.0f}")
    print("\n(HAProxy's new connection includes its TLS handshake, which the agents' pool "
          "saves; the kernel's part is not counted. The misses are callgrind's simulated "
          "32 KiB L1 caches with the process alone on them: what a warm process still "
          "misses; on a shared core each wakeup starts colder)")


# -- where the latency goes: per-hop times from packet captures (--hops) ----------------

HOPS = ("node1 proxy, request", "underlay, request", "node2 proxy, request", "app",
        "node2 proxy, response", "underlay, response", "node1 proxy, response")
# payload-carrying TCP segments only (no bare ACKs)
PAYLOAD_FILTER = "tcp and (((ip[2:2] - ((ip[0]&0xf)<<2)) - ((tcp[12]&0xf0)>>2)) != 0)"


def hop_times(lines: list[str], client_veth: str, node1_ul: str, node2_ul: str,
              server_veth: str) -> dict[str, list[float]]:
    """The time (us) each hop of a request / response adds, from ``tcpdump -i any -n -tt
    -q`` lines of both nodes (one host clock). The path's points, in order: the client's
    request entering node1, leaving node1 on the underlay, entering node2, leaving to the
    server pod, the server's response coming back, leaving node2, entering node1, leaving
    to the client. For every payload segment seen at one point, the hop's time is the
    wait for the next payload segment at the following point (requests one at a time, so
    the next segment there is this one's or carries it: a coalesced write counts for
    every request it carries)."""
    points = ((client_veth, "In"), (node1_ul, "Out"), (node2_ul, "In"), (server_veth, "Out"),
              (server_veth, "In"), (node2_ul, "Out"), (node1_ul, "In"), (client_veth, "Out"))
    seen: dict[tuple[str, str], list[float]] = {pt: [] for pt in points}
    for line in lines:
        f = line.split()
        if len(f) < 3 or (f[1], f[2]) not in seen:
            continue
        try:
            seen[(f[1], f[2])].append(float(f[0]))
        except ValueError:
            continue
    out: dict[str, list[float]] = {}
    for hop, here, there in zip(HOPS, points, points[1:], strict=False):
        later = sorted(seen[there])
        out[hop] = [(later[i] - t) * 1e6 for t in seen[here]
                    if (i := bisect.bisect_left(later, t)) < len(later)]
    return out


@contextlib.contextmanager
def _captured(topo: Any, files: list[Path]) -> Iterator[None]:
    """tcpdump on node1 and node2 (payload segments, text lines into ``files``), live
    before the block runs, stopped after it."""
    from ztunnel_py.demo.wire import wait_started

    caps = [topo.popen(node, ["tcpdump", "-i", "any", "-n", "-tt", "-q", "-l", PAYLOAD_FILTER],
                       log=f, stderr=subprocess.PIPE)
            for node, f in zip(("node1", "node2"), files, strict=True)]
    try:
        for cap in caps:
            wait_started(cap)
        yield
    finally:
        for cap in caps:
            cap.terminate()
            cap.wait(timeout=10)
            if cap.stderr is not None:
                cap.stderr.close()


# -- orchestration ---------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    host: str
    ports: dict[int, int]  # app port -> port to dial
    proxy_pids: list[int]  # whose CPU time is charged to the path


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of ``pids`` (all threads) so far, from /proc."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


def _haproxy_global(nbthread: int | None) -> list[str]:
    out = ["global", "  maxconn 8000"]
    if nbthread is not None:
        out.append(f"  nbthread {nbthread}")
    out += ["defaults", "  mode tcp", "  timeout connect 5s", "  timeout client 120s"]
    return [*out, "  timeout server 120s"]


def _haproxy_client_cfg(
    gw: str, node2_ip: str, tls_dir: Path, nbthread: int | None, offset: int = 0
) -> str:
    out = _haproxy_global(nbthread)
    for app, front in HAPROXY_FRONT.items():
        out += [
            f"frontend f{app}", f"  bind {gw}:{front + offset}", f"  default_backend b{app}",
            f"backend b{app}",
            f"  server s {node2_ip}:{HAPROXY_BACK[app] + offset} ssl crt {tls_dir}/client.pem "
            f"ca-file {tls_dir}/ca.pem verify required ssl-min-ver TLSv1.3",
        ]
    return "\n".join(out) + "\n"


def _haproxy_server_cfg(
    node2_ip: str, server_ip: str, tls_dir: Path, nbthread: int | None, offset: int = 0
) -> str:
    out = _haproxy_global(nbthread)
    for app, back in HAPROXY_BACK.items():
        out += [
            f"frontend f{app}",
            f"  bind {node2_ip}:{back + offset} ssl crt {tls_dir}/server.pem "
            f"ca-file {tls_dir}/ca.pem "
            "verify required ssl-min-ver TLSv1.3",
            f"  default_backend b{app}", f"backend b{app}", f"  server s {server_ip}:{app}",
        ]
    return "\n".join(out) + "\n"


def _http_app_cfg() -> str:
    return (
        "global\n  maxconn 8000\ndefaults\n  mode http\n  timeout connect 5s\n"
        "  timeout client 60s\n  timeout server 60s\n  timeout http-keep-alive 60s\n"
        f"frontend app\n  bind :{HTTP_PORT}\n"
        '  http-request return status 200 content-type text/plain string "ok"\n'
    )


IPERF_BUSY_WAIT_S = 10.0


def _iperf(topo: Any, pod: str, host: str, port: int, duration: float, streams: int) -> float:
    """Gbit/s received. The paths share one iperf3 server, which takes one test at a
    time and may still be ending the last one (its streams closing through a proxy)
    when the next arrives: a busy server is asked again, for up to ``IPERF_BUSY_WAIT_S``."""
    deadline = time.monotonic() + IPERF_BUSY_WAIT_S
    while True:
        res = topo.run(
            pod, ["iperf3", "-c", host, "-p", str(port), "-t", str(duration), "-P",
                  str(streams), "-J"],
            timeout=duration + 30,
        )
        data = json.loads(res.stdout or "{}")
        error = data.get("error")
        if error is None:
            return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
        if "busy" not in error or time.monotonic() >= deadline:
            raise RuntimeError(f"iperf3 to {host}:{port}: {error}")
        time.sleep(0.5)


def _wrk(topo: Any, pod: str, host: str, port: int, duration: float, close: bool) -> float:
    argv = ["wrk", "-t2", "-c16", f"-d{max(1, int(duration))}s", f"http://{host}:{port}/"]
    if close:
        argv[1:1] = ["-H", "Connection: close"]
    res = topo.run(pod, argv, timeout=duration + 30)
    m = re.search(r"Requests/sec:\s*([\d.]+)", res.stdout)
    if not m:
        raise RuntimeError(f"wrk to {host}:{port}: {res.stdout}{res.stderr}")
    return float(m.group(1))


def _latency(
    topo: Any, pod: str, targets: list[tuple[str, int]], duration: float, rate: float
) -> list[tuple[float, float]]:
    """(p50, p99) in ms of each target, interleaved in slices (``run_latency``)."""
    argv = [sys.executable, "-m", "bench.hbone", "latency",
            *(f"{host}:{port}" for host, port in targets),
            "--rate", str(rate), "--duration", str(duration)]
    res = topo.run(pod, argv, timeout=len(targets) * duration + 60,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    line = (res.stdout.strip().splitlines() or ["[]"])[-1]
    data = json.loads(line)
    if len(data) != len(targets) or not all(d.get("count") for d in data):
        raise RuntimeError(f"latency client to {targets}: {res.stdout}{res.stderr}")
    return [(float(d["p50_ms"]), float(d["p99_ms"])) for d in data]


Figures = list[tuple[dict[str, float], dict[str, float]]]  # per path: its row's, its CPU's


def _fixed_rate(topo: Any, scs: list[Scenario], duration: float, rate: float) -> Figures:
    """Each path's p50 and p99 at the fixed rate, all paths in one run interleaved in
    slices (``run_latency``), and the proxy CPU microseconds charged to each request."""
    t0 = [cpu_seconds(sc.proxy_pids) for sc in scs]
    got = _latency(topo, "client", [(sc.host, sc.ports[HTTP_PORT]) for sc in scs],
                   duration, rate)
    # at a fixed rate requests come one at a time: each pays its own wakeups and
    # syscalls, unlike under wrk's saturation (rps_16)
    return [({"p50_ms": p50, "p99_ms": p99},
             {"fixed_rate": (cpu_seconds(sc.proxy_pids) - t) * 1e6 / (rate * duration)})
            for sc, t, (p50, p99) in zip(scs, t0, got, strict=True)]


def _connections_in_turns(topo: Any, scs: list[Scenario], duration: float) -> Figures:
    """Each path's new connections/s (wrk, one request per connection) and the proxy CPU
    microseconds charged to each connection, the paths taking turns of TURN_S seconds
    until each has had about ``duration``."""
    turns = max(1, round(duration / TURN_S))
    done = [0.0] * len(scs)
    cpu = [0.0] * len(scs)
    for _ in range(turns):
        for n, sc in enumerate(scs):
            t0 = cpu_seconds(sc.proxy_pids)
            done[n] += _wrk(topo, "client", sc.host, sc.ports[HTTP_PORT], TURN_S,
                            close=True) * TURN_S
            cpu[n] += cpu_seconds(sc.proxy_pids) - t0
    return [({"conn_per_s": d / (turns * TURN_S)}, {"conn_per_s": c * 1e6 / d})
            for d, c in zip(done, cpu, strict=True)]


def _in_turns(topo: Any, scs: list[Scenario], what: str, duration: float,
              rate: float) -> Figures:
    """``what`` ("latency" or "connections") of every path in one run, the paths taking
    turns: each path's figures and the proxy CPU charged to them. Turns make the paths'
    figures come from the same seconds of a shared machine, whose speed drifts over
    seconds: run for 5 s per path back to back, the agents/HAProxy ratio of one round
    moved between rounds by up to 40 % (p50 1.00x-1.45x, new connections/s 2.08x-3.94x);
    in turns, within 1.10x-1.28x and 3.05x-3.74x (51 and 19 rounds)."""
    if what == "latency":
        return _fixed_rate(topo, scs, duration, rate)
    return _connections_in_turns(topo, scs, duration)


MEASUREMENTS = ("throughput", "rps", "connections", "latency")
PATHS = ("direct", "agents", "haproxy", "haproxy-mt")


def _measure(topo: Any, sc: Scenario, what: str, duration: float, rate: float,
             r: dict[str, float], c: dict[str, float], *, workdir: Path,
             tag: str) -> dict[str, float] | None:
    """One measurement (``what``) of one path into its round's figures ``r`` and the proxy
    CPU charged to it ``c``; latency here is ``--hops``'s, which also gives the p50 time
    of each hop (without it, latency runs in turns: ``_in_turns``)."""
    ip, hp = sc.ports[IPERF_PORT], sc.ports[HTTP_PORT]
    if what == "throughput":
        for streams in (1, 4):
            if streams > 1:
                time.sleep(0.5)
            key = f"tput_{streams}_gbps"
            t0 = cpu_seconds(sc.proxy_pids)
            r[key] = _iperf(topo, "client", sc.host, ip, duration, streams)
            # proxy CPU seconds per GB carried
            c[key] = (cpu_seconds(sc.proxy_pids) - t0) / (r[key] * duration / 8)
    elif what == "rps":
        t0 = cpu_seconds(sc.proxy_pids)
        r["rps_16"] = _wrk(topo, "client", sc.host, hp, duration, close=False)
        # proxy CPU microseconds per request
        c["rps_16"] = (cpu_seconds(sc.proxy_pids) - t0) * 1e6 / (r["rps_16"] * duration)
    elif what == "latency":
        files = [workdir / f"hops-{tag}-{n}.txt" for n in ("node1", "node2")]
        with _captured(topo, files):
            [(figures, cpu)] = _fixed_rate(topo, [sc], duration, rate)
        r.update(figures)
        c.update(cpu)
        client, server = topo.pod("client"), topo.pod("server")
        node1, node2 = topo.node("node1"), topo.node("node2")
        lines = [line for f in files for line in f.read_text().splitlines()]
        times = hop_times(lines, client.host_veth, node1.underlay_iface,
                          node2.underlay_iface, server.host_veth)
        return {h: statistics.median(v) if v else float("nan") for h, v in times.items()}
    return None


def orchestrate(
    duration: float,
    rate: float,
    only: frozenset[str] = frozenset(MEASUREMENTS),
    haproxy_mt: bool = True,
    paths: frozenset[str] = frozenset(PATHS),
    repeat: int = 1,
    hops: bool = False,
    instructions: int = 0,
) -> int:
    from ztunnel_py.identity.testing import InMemoryCA
    from ztunnel_py.state.model import spiffe_id
    from ztunnel_py.topology import NodeSpec, PodSpec, Topology, TopologySpec, new_prefix

    if os.geteuid() != 0:
        print("bench.hbone needs root (network namespaces)", file=sys.stderr)
        return 2
    spec = TopologySpec(
        (
            NodeSpec("node1", (PodSpec("client", service_account=CLIENT_SA),)),
            NodeSpec("node2", (PodSpec("server", service_account=SERVER_SA),)),
        ),
        prefix=new_prefix("zb"),
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench-hbone-"))
    os.chmod(workdir, 0o700)
    topo = Topology.build(spec)
    try:
        node1, node2 = topo.node("node1"), topo.node("node2")
        client, server = topo.pod("client"), topo.pod("server")
        gw = node1.pod_gateway
        ca = InMemoryCA()
        ids = {
            "client": spiffe_id("cluster.local", "default", CLIENT_SA),
            "server": spiffe_id("cluster.local", "default", SERVER_SA),
        }
        issued = {name: ca.issue(identity, 24 * 3600) for name, identity in ids.items()}
        (workdir / "ca.pem").write_bytes(ca.root_pem)
        for name, cert in issued.items():
            path = workdir / f"{name}.pem"
            path.write_bytes(cert.chain_pem + cert.key_pem)
            os.chmod(path, 0o600)
        certs = [
            {"identity": c.identity, "chain": c.chain_pem.decode(), "key": c.key_pem.decode(),
             "roots": c.roots_pem.decode()}
            for c in issued.values()
        ]
        workloads = [
            {"name": "client", "sa": CLIENT_SA, "node": "node1", "ip": client.ip},
            {"name": "server", "sa": SERVER_SA, "node": "node2", "ip": server.ip},
        ]
        agent_cfgs = {
            "node1": {
                "node": "node1", "certs": certs, "workloads": workloads,
                "outbound": [[gw, p] for p in AGENT_PORTS.values()], "inbound": [],
                "fixed_dst": {str(p): [server.ip, app] for app, p in AGENT_PORTS.items()},
                "dial": {f"{server.ip}:15008": [node2.underlay_ip, 15008]},
            },
            "node2": {
                "node": "node2", "certs": certs, "workloads": workloads,
                "outbound": [], "inbound": [[node2.underlay_ip, 15008]],
                "fixed_dst": {"15008": [server.ip, 15008]}, "dial": {},
            },
        }
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        agent_pids: list[int] = []
        for node, acfg in agent_cfgs.items():
            path = workdir / f"agent-{node}.json"
            path.write_text(json.dumps(acfg))
            os.chmod(path, 0o600)
            wrap = _valgrind(workdir, f"agents-{node}") if instructions else []
            agent_pids.append(topo.popen(
                node, [*wrap, sys.executable, "-m", "bench.hbone", "agent", str(path)],
                log=workdir / f"agent-{node}.log", env=env, cwd=str(REPO),
            ).pid)
        (workdir / "app.cfg").write_text(_http_app_cfg())
        topo.popen("server", ["iperf3", "-s", "-p", str(IPERF_PORT)], log=workdir / "iperf.log")
        topo.popen("server", ["haproxy", "-db", "-f", str(workdir / "app.cfg")],
                   log=workdir / "app.log")
        variants: list[tuple[str, int | None, int]] = [("haproxy", 1, 0)]
        if haproxy_mt and not instructions:
            variants.append(("haproxy-mt", None, HAPROXY_MT_OFFSET))
        haproxy_pids: dict[str, list[int]] = {}
        for name, nbthread, offset in variants:
            (workdir / f"{name}-client.cfg").write_text(
                _haproxy_client_cfg(gw, node2.underlay_ip, workdir, nbthread, offset)
            )
            (workdir / f"{name}-server.cfg").write_text(
                _haproxy_server_cfg(node2.underlay_ip, server.ip, workdir, nbthread, offset)
            )
            haproxy_pids[name] = [
                topo.popen(node, [*(_valgrind(workdir, f"{name}-{node}") if instructions else []),
                                  "haproxy", "-db", "-f", str(workdir / f"{name}-{side}.cfg")],
                           log=workdir / f"{name}-{side}.log").pid
                for node, side in (("node1", "client"), ("node2", "server"))
            ]
        topo.wait_listening("server", IPERF_PORT)
        topo.wait_listening("server", HTTP_PORT)
        # (an interpreter under valgrind takes a while)
        topo.wait_listening("node1", AGENT_PORTS[HTTP_PORT], timeout=300 if instructions else 30)
        topo.wait_listening("node2", 15008, timeout=300 if instructions else 30)
        for _name, _nbthread, offset in variants:
            topo.wait_listening("node1", HAPROXY_FRONT[HTTP_PORT] + offset,
                                timeout=120 if instructions else 30)
            topo.wait_listening("node2", HAPROXY_BACK[HTTP_PORT] + offset,
                                timeout=120 if instructions else 30)
        if instructions:
            nodes = list(agent_cfgs)
            count_instructions(topo, workdir, {
                "agents": (dict(zip(nodes, agent_pids, strict=True)), AGENT_PORTS[HTTP_PORT]),
                "haproxy": (dict(zip(nodes, haproxy_pids["haproxy"], strict=True)),
                            HAPROXY_FRONT[HTTP_PORT]),
            }, gw, instructions)
            return 0

        scenarios = [
            Scenario("direct", server.ip, {IPERF_PORT: IPERF_PORT, HTTP_PORT: HTTP_PORT}, []),
            Scenario("agents", gw, dict(AGENT_PORTS), agent_pids),
        ] + [
            Scenario(name, gw, {app: p + offset for app, p in HAPROXY_FRONT.items()},
                     haproxy_pids[name])
            for name, _nbthread, offset in variants
        ]
        cpu_rounds: dict[str, list[dict[str, float]]] = {}
        row_rounds: dict[str, list[dict[str, float]]] = {}
        hop_rounds: dict[str, list[dict[str, float]]] = {}
        nan = float("nan")
        measured = [sc for sc in scenarios if sc.name in paths]
        for rnd in range(repeat):
            rows = {sc.name: dict.fromkeys(
                ("tput_1_gbps", "tput_4_gbps", "rps_16", "conn_per_s", "p50_ms", "p99_ms"), nan)
                for sc in measured}
            cpus: dict[str, dict[str, float]] = {sc.name: {} for sc in measured}
            # Each measurement runs on every path, in turns or back to back, so that the
            # paths' figures of one round come from the same seconds or minutes of a shared
            # machine; the order of the paths flips every round (no path always goes first,
            # or right after another).
            order = measured if rnd % 2 == 0 else measured[::-1]
            for what in (m for m in MEASUREMENTS if m in only):
                if what == "connections" or (what == "latency" and not hops):
                    # one run for all the paths, taking turns (``_in_turns``)
                    print(f"# round {rnd + 1}/{repeat}: {what}, "
                          f"{', '.join(sc.name for sc in order)} in turns ...", file=sys.stderr,
                          flush=True)
                    for sc, (figures, cpu) in zip(order, _in_turns(topo, order, what, duration,
                                                                   rate), strict=True):
                        rows[sc.name].update(figures)
                        cpus[sc.name].update(cpu)
                    continue
                for sc in order:
                    print(f"# round {rnd + 1}/{repeat}: {what}, {sc.name} ...", file=sys.stderr,
                          flush=True)
                    hop = _measure(topo, sc, what, duration, rate, rows[sc.name], cpus[sc.name],
                                   workdir=workdir, tag=f"{sc.name}-{rnd}")
                    if hop is not None:
                        hop_rounds.setdefault(sc.name, []).append(hop)
            for sc in measured:
                cpu_rounds.setdefault(sc.name, []).append(cpus[sc.name])
                row_rounds.setdefault(sc.name, []).append(rows[sc.name])
        print_table({k: medians(v) for k, v in row_rounds.items()}, duration, rate, repeat)
        print_rounds(row_rounds)
        print_cpu({k: medians(v) for k, v in cpu_rounds.items()})
        if hop_rounds:
            print_hops({k: medians(v) for k, v in hop_rounds.items()})
        return 0
    except BaseException:
        for logf in sorted(workdir.glob("*.log")):
            print(f"--- {logf.name} (last lines)", file=sys.stderr)
            print("\n".join(logf.read_text(errors="replace").splitlines()[-15:]), file=sys.stderr)
        raise
    finally:
        try:
            topo.teardown()
        finally:
            for p in workdir.iterdir():
                p.unlink()
            workdir.rmdir()


def medians(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over the rounds that measured it (NaN when none did)."""
    out: dict[str, float] = {}
    for key in {k for r in rounds for k in r}:
        got = [r[key] for r in rounds if key in r and not math.isnan(r[key])]
        out[key] = statistics.median(got) if got else float("nan")
    return out


def print_table(rows: dict[str, dict[str, float]], duration: float, rate: float,
                repeat: int = 1) -> None:
    metrics = [
        ("tput_1_gbps", "throughput, 1 stream (Gbit/s)"),
        ("tput_4_gbps", "throughput, 4 streams (Gbit/s)"),
        ("rps_16", "requests/s, 16 connections"),
        ("conn_per_s", "new connections/s (1 req/conn)"),
        ("p50_ms", f"p50 latency @ {rate:.0f} req/s (ms)"),
        ("p99_ms", f"p99 latency @ {rate:.0f} req/s (ms)"),
    ]
    mt = "haproxy-mt" in rows
    rounds = (f"medians of {repeat} rounds, the paths' order alternating"
              if repeat > 1 else "one round")
    print(f"\nHBONE benchmark ({duration:g} s per measurement, {rounds}; same topology, "
          "same run)")
    print(f"agents: one single-threaded Python process per node ({native.describe()}); "
          "haproxy: nbthread 1 per node (the same CPU budget)"
          + ("; haproxy-mt: HAProxy's default threads" if mt else ""))
    print()
    head = f"{'metric':<38}{'direct':>10}{'agents':>10}{'haproxy':>10}"
    if mt:
        head += f"{'haproxy-mt':>12}"
    head += f"{'agents/haproxy':>16}{'agents/direct':>15}"
    if mt:
        head += f"{'agents/hap-mt':>15}"
    print(head)
    print("-" * len(head))
    nan = float("nan")
    for key, label in metrics:
        if not _measured(rows, key):
            continue  # not measured in this run (--only)
        d, a, h = (rows.get(s, {}).get(key, nan) for s in ("direct", "agents", "haproxy"))
        line = f"{label:<38}{_cell(d, 10)}{_cell(a, 10)}{_cell(h, 10)}"
        if mt:
            line += _cell(rows["haproxy-mt"][key], 12)
        line += f"{_cell(a / h if h else nan, 15, 'x')}{_cell(a / d if d else nan, 14, 'x')}"
        if mt:
            m = rows["haproxy-mt"][key]
            line += _cell(a / m if m else nan, 14, "x")
        print(line)
    print("\ngoals (vs haproxy, nbthread 1): throughput >= 1.0x; new connections/s >= 3x; "
          "p50 latency <= 1.2x")


def _measured(rows: dict[str, dict[str, float]], key: str) -> bool:
    """Some path has a figure for ``key`` (a metric left out is absent or NaN)."""
    return any(not math.isnan(figures.get(key, math.nan)) for figures in rows.values())


def _cell(value: float, width: int, unit: str = "") -> str:
    """A table cell: the value to two places, or ``-`` for one the run did not measure."""
    if math.isnan(value):
        return f"{'-':>{width + len(unit)}}"
    return f"{value:>{width}.2f}{unit}"


def print_rounds(rounds: dict[str, list[dict[str, float]]]) -> None:
    """agents/haproxy of each round, for the metrics measured: how far the medians'
    ratio can be trusted (HAProxy's p50 alone moves by ~10 % between rounds here)."""
    agents, haproxy = rounds.get("agents", []), rounds.get("haproxy", [])
    if len(agents) < 2 or len(agents) != len(haproxy):
        return
    print("\nagents/haproxy in each round")
    for key, label in (("tput_1_gbps", "throughput, 1 stream"), ("tput_4_gbps",
                       "throughput, 4 streams"), ("rps_16", "requests/s, 16 connections"),
                       ("conn_per_s", "new connections/s"), ("p50_ms", "p50 latency"),
                       ("p99_ms", "p99 latency")):
        pairs = [(a.get(key, math.nan), h.get(key, math.nan))
                 for a, h in zip(agents, haproxy, strict=True)]
        ratios = [x / y for x, y in pairs if y]
        if ratios and not any(math.isnan(x) for x in ratios):
            print(f"{label:<38}" + " ".join(f"{x:.2f}x" for x in ratios))
    if all(not math.isnan(r.get("p99_ms", math.nan)) for r in (*agents, *haproxy)):
        # a tail ratio alone hides whether one side or the machine had the bad round
        print(f"{'p99 ms, agents/haproxy':<38}"
              + " ".join(f"{a['p99_ms']:.2f}/{h['p99_ms']:.2f}"
                         for a, h in zip(agents, haproxy, strict=True)))


def print_cpu(cpu: dict[str, dict[str, float]]) -> None:
    """CPU the proxies (both of a pair, all threads) spent per unit of work: on a busy
    shared machine this is steadier than the rates above."""
    units = [
        ("tput_1_gbps", "CPU s per GB, 1 stream"),
        ("tput_4_gbps", "CPU s per GB, 4 streams"),
        ("rps_16", "CPU us per request (keep-alive)"),
        ("conn_per_s", "CPU us per new connection"),
        ("fixed_rate", "CPU us per request at the fixed rate"),
    ]
    mt = "haproxy-mt" in cpu
    print("\nproxy CPU per unit of work (both proxies of the pair, all threads)\n")
    head = f"{'metric':<38}{'agents':>10}{'haproxy':>10}"
    if mt:
        head += f"{'haproxy-mt':>12}"
    head += f"{'agents/haproxy':>16}"
    print(head)
    print("-" * len(head))
    nan = float("nan")
    for key, label in units:
        if not _measured(cpu, key):
            continue  # not measured in this run (--only)
        a = cpu.get("agents", {}).get(key, nan)
        h = cpu.get("haproxy", {}).get(key, nan)
        line = f"{label:<38}{_cell(a, 10)}{_cell(h, 10)}"
        if mt:
            line += _cell(cpu["haproxy-mt"].get(key, nan), 12)
        print(line + _cell(a / h if h else nan, 15, "x"))


def print_hops(rows: dict[str, dict[str, float]]) -> None:
    names = list(rows)
    print("\nwhere the fixed-rate latency goes: p50 time each hop adds (us), from captures "
          "on both nodes (--hops)\n")
    head = f"{'hop':<26}" + "".join(f"{n:>12}" for n in names)
    print(head)
    print("-" * len(head))
    for hop in (*HOPS, "total"):
        vals = [sum(rows[n].get(h, float("nan")) for h in HOPS) if hop == "total"
                else rows[n].get(hop, float("nan")) for n in names]
        print(f"{hop:<26}" + "".join(f"{v:>12.1f}" for v in vals))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hbone", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    a = sub.add_parser("agent", help="(internal) run one agent from a JSON file")
    a.add_argument("config")
    lat = sub.add_parser("latency", help="(internal) fixed-rate latency client")
    lat.add_argument("targets", nargs="+", metavar="HOST:PORT",
                     help="in turns of --slice seconds, each for --duration in all")
    lat.add_argument("--slice", type=float, default=SLICE_S)
    lat.add_argument("--rate", type=float, default=2000)
    lat.add_argument("--duration", type=float, default=10)
    lat.add_argument("--connections", type=int, default=32)
    cnt = sub.add_parser("count", help="(internal) requests one at a time, for --instructions")
    cnt.add_argument("host")
    cnt.add_argument("port", type=int)
    cnt.add_argument("--requests", type=int, default=1000)
    cnt.add_argument("--close", action="store_true", help="a new connection per request")
    cnt.add_argument("--connections", type=int, default=4)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--rate", type=float, default=2000.0, help="fixed request rate")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds: each measurement on every path (in turns for latency "
                             "and new connections, back to back for the others), the paths' "
                             "order flipped every round; the tables show each figure's median "
                             "(a single round is at the mercy of a noisy machine)")
    parser.add_argument("--only", action="append", choices=MEASUREMENTS,
                        help="run only these measurements (repeatable; default: all)")
    parser.add_argument("--no-haproxy-mt", action="store_true",
                        help="skip the HAProxy pair with default threads")
    parser.add_argument("--hops", action="store_true",
                        help="during the latency runs, capture on both nodes (tcpdump) and "
                        "print the p50 time each hop of the path adds")
    parser.add_argument("--path", action="append", choices=PATHS, dest="paths",
                        help="measure only these paths (repeatable; default: all; the "
                        "ratios need agents and haproxy)")
    parser.add_argument("--instructions", type=int, default=0, metavar="N",
                        help="instead of the tables: both agents and both HAProxy instances "
                        "under callgrind, and their user-space instructions and simulated L1 "
                        "cache misses per request and per new connection over N of each "
                        "(steady, for comparing builds; needs valgrind)")
    args = parser.parse_args(argv)
    if args.cmd == "agent":
        return run_agent(args.config)
    if args.cmd == "latency":
        targets = [(t.rpartition(":")[0], int(t.rpartition(":")[2])) for t in args.targets]
        return run_latency(targets, args.rate, args.duration, args.connections, args.slice)
    if args.cmd == "count":
        return run_count(args.host, args.port, args.requests, args.close, args.connections)
    return orchestrate(args.duration, args.rate, frozenset(args.only or MEASUREMENTS),
                       haproxy_mt=not args.no_haproxy_mt and (
                           not args.paths or "haproxy-mt" in args.paths),
                       paths=frozenset(args.paths or PATHS), repeat=max(1, args.repeat),
                       hops=args.hops, instructions=args.instructions)


if __name__ == "__main__":
    raise SystemExit(main())
