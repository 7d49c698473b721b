"""Controller -> agents config push at scale.

    .venv/bin/python -m bench.controller_sync [--pods 10000 --services 1000 --agents 50
                                               --procs 5 --changes 30]

The controller runs in this process (real gRPC on loopback, insecure: TLS is
the same for every message and not what this measures). The agents are real
``ConfigClient``s, each with its own channel (HTTP/2 connection) and its own
``StateStore``, spread over ``--procs`` worker processes (several agents per
process share one event loop: the figures are therefore pessimistic for the
agents' side on a busy 2-core machine). Objects are fed to the controller the
way a source does (``Controller.submit``), so the figures include translation
of the whole model, debounce, diff, encoding, push, agent decode/validate/swap.

Printed:
  * time to first full sync (all agents hold the first version), when the
    controller had handed every full snapshot to gRPC, and the CPU the agents'
    worker processes spent on it per agent (receive, decode, apply, page faults
    of the new heap), vs 1 agent;
  * p50/p99 of one pod change reaching all agents (and the controller's share:
    change -> new version published), vs 1 agent;
  * controller RSS; bytes sent per update (full snapshot, one-pod delta);
  * the CPU one agent spends on the full snapshot (with N agents sharing this
    machine's cores, N times that is the floor of the in-process full sync);
  * the directory source: editing a Pod's YAML until two agents hold the edit.

Quick run on a busy machine: ``--pods 2000 --services 200 --agents 4 --procs 2
--changes 5 --edits 5`` (a few seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

import grpc

from ztunnel_py.config import ControllerConfig
from ztunnel_py.controller.runtime import Controller
from ztunnel_py.controller.translate import KubeObject
from ztunnel_py.state.client import GRPC_OPTIONS, ConfigClient
from ztunnel_py.state.snapshot import Snapshot, StateStore, settle_heap

NAMESPACES = 10


class NodeNameIsToken:
    def authenticate(self, metadata: Mapping[str, str]) -> str:
        return metadata.get("authorization", "").removeprefix("Bearer ")


def pod_object(i: int, services: int, nodes: int, rev: int) -> KubeObject:
    svc = i % services
    return KubeObject(f"pod{i}", {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"pod-{i}", "namespace": f"ns{svc % NAMESPACES}",
                     "labels": {"app": f"svc-{svc}", "rev": str(rev)}},
        "spec": {"nodeName": f"node-{i % nodes}", "serviceAccountName": f"sa-{svc}",
                 "containers": [{"name": "c", "ports": [{"name": "http",
                                                         "containerPort": 8080}]}]},
        "status": {"podIP": f"10.{i // 65536 + 1}.{i // 256 % 256}.{i % 256}"},
    })


def objects(pods: int, services: int, nodes: int) -> list[KubeObject]:
    """Namespaces, then pods (index NAMESPACES + i), then services."""
    out = [KubeObject(f"ns{n}", {"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": f"ns{n}", "labels": {"istio.io/dataplane-mode": "ambient"}}})
        for n in range(NAMESPACES)]
    out += [pod_object(i, services, nodes, 0) for i in range(pods)]
    for s in range(services):
        out.append(KubeObject(f"svc{s}", {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"svc-{s}", "namespace": f"ns{s % NAMESPACES}"},
            "spec": {"selector": {"app": f"svc-{s}"},
                     "clusterIP": f"10.96.{s // 256}.{s % 256}",
                     "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
        }))
    return out


def rss_mib() -> tuple[float, float]:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


# -- agent worker process ---------------------------------------------------------------


async def worker(port: int, nodes: list[str]) -> None:
    """Run ``nodes`` agents; print one JSON line per applied version."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": True}), flush=True)
    await reader.readline()  # "go"
    channels, tasks = [], []
    for node in nodes:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=list(GRPC_OPTIONS))
        store = StateStore()

        def report(_old: Snapshot, new: Snapshot, node: str = node) -> None:
            print(json.dumps({"node": node, "version": new.version, "t": time.time(),
                              "workloads": len(new.workloads)}), flush=True)

        store.subscribe(report)
        store.subscribe(lambda _old, _new: settle_heap())  # as the agent app does
        client = ConfigClient(channel, store, node=node, token=node)
        channels.append(channel)
        tasks.append(asyncio.create_task(client.run()))
    await reader.readline()  # "stop" (or EOF)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in channels:
        await c.close(None)


# -- the run ---------------------------------------------------------------------------------


class Agents:
    def __init__(self, port: int, agents: int, procs: int) -> None:
        self.procs: list[asyncio.subprocess.Process] = []
        self.readers: list[asyncio.StreamReader] = []
        self.port, self.agents, self.nprocs = port, agents, max(1, min(procs, agents))
        self.applied: dict[str, dict[str, float]] = {}  # version -> node -> time
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        names = [f"node-{i}" for i in range(self.agents)]
        for p in range(self.nprocs):
            mine = names[p::self.nprocs]
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.controller_sync", "--worker", str(self.port),
                ",".join(mine), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            )
            assert proc.stdout is not None
            self.procs.append(proc)
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert json.loads(line)["ready"]
            self._tasks.append(asyncio.create_task(self._read(proc.stdout)))

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the worker processes have used so far."""
        total = 0
        for proc in self.procs:
            with open(f"/proc/{proc.pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (after the name)
        return total / os.sysconf("SC_CLK_TCK")

    def go(self) -> float:
        t0 = time.time()
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
        return t0

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            if not line.startswith(b"{"):
                continue
            event = json.loads(line)
            self.applied.setdefault(event["version"], {})[event["node"]] = event["t"]
            self._changed.set()

    async def all_at(self, version: str, limit_s: float = 60.0) -> float:
        """Wall time at which the last agent applied ``version``."""
        async with asyncio.timeout(limit_s):
            while len(self.applied.get(version, {})) < self.agents:
                self._changed.clear()
                await self._changed.wait()
        return max(self.applied[version].values())

    async def stop(self) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(b"stop\n")
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def scenario(args: argparse.Namespace, agents: int) -> dict[str, Any]:
    cfg = ControllerConfig(grpc_address="127.0.0.1:0", admin_address="127.0.0.1:0",
                           debounce_s=args.debounce)
    controller = Controller(cfg, authenticator=NodeNameIsToken(), server_credentials=None)
    await controller.start()
    revs: dict[int, int] = {}
    # Like a real source, unchanged objects stay the same Python objects between submits.
    objs = objects(args.pods, args.services, agents)
    try:
        t = time.perf_counter()
        controller.submit(list(objs))
        await controller.sync.published.wait()
        first_model_s = time.perf_counter() - t
        latest = controller.core.latest
        assert latest is not None
        v1 = latest.version
        fleet = Agents(controller.grpc_port, agents, args.procs)
        await fleet.start()
        sent0, updates0 = controller.service.bytes_sent, controller.service.updates_sent
        cpu0 = fleet.cpu_s()
        t0 = fleet.go()

        async def handed_out() -> float:
            while controller.service.updates_sent - updates0 < agents:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            return time.time() - t0

        fan_out = asyncio.create_task(handed_out())
        full_sync = await fleet.all_at(v1) - t0
        agents_cpu = fleet.cpu_s() - cpu0
        fan_out_s = await fan_out
        full_bytes = (controller.service.bytes_sent - sent0) / agents
        rss_after_sync = rss_mib()
        latencies: list[float] = []
        delta_bytes: list[float] = []
        published: list[float] = []
        for i in range(args.changes):
            pod = (i * 7919) % args.pods
            revs[pod] = revs.get(pod, 0) + 1
            objs[NAMESPACES + pod] = pod_object(pod, args.services, agents, revs[pod])
            sent = controller.service.bytes_sent
            controller.sync.published.clear()
            t0 = time.time()
            controller.submit(list(objs))
            await controller.sync.published.wait()
            published.append(time.time() - t0)
            version = controller.sync.version
            assert version is not None
            done = await fleet.all_at(version)
            latencies.append(done - t0)
            # every agent got the delta once it is applied everywhere
            delta_bytes.append((controller.service.bytes_sent - sent) / agents)
        await fleet.stop()
        print(f"  {agents} agent(s): pod change -> all agents, in order (ms): "
              + " ".join(f"{x * 1e3:.0f}" for x in latencies), flush=True)
        lat = sorted(latencies)
        return {
            "agents": agents,
            "first_model_s": first_model_s,
            "full_sync_s": full_sync,
            "fan_out_s": fan_out_s,
            "agent_cpu_ms": agents_cpu / agents * 1e3,
            "full_bytes_per_agent": full_bytes,
            "p50_ms": statistics.median(lat) * 1e3 if lat else float("nan"),
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3 if lat else float("nan"),
            "publish_p50_ms": statistics.median(published) * 1e3 if published else float("nan"),
            "delta_bytes_per_agent": statistics.mean(delta_bytes) if delta_bytes else 0.0,
            "translate_ms": controller.sync.last_translate_s * 1e3,
            "rss_mib": rss_after_sync[0],
            "peak_rss_mib": rss_mib()[1],
        }
    finally:
        await controller.stop(grace=0)


async def directory_edits(edits: int, debounce: float) -> list[float]:
    """Seconds from writing a Pod's YAML to both of two agents holding the edit."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="ztunnel-bench-") as tmp:
        root = Path(tmp)
        (root / "ns.yaml").write_text(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: "
            "{istio.io/dataplane-mode: ambient}}\n")

        def pod(rev: int) -> str:
            return ("apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: demo, "
                    f"labels: {{rev: '{rev}'}}}}\nspec: {{nodeName: node-0}}\n"
                    "status: {podIP: 10.1.0.1}\n")

        (root / "pod.yaml").write_text(pod(0))
        cfg = ControllerConfig(config_dir=root, grpc_address="127.0.0.1:0",
                               admin_address="127.0.0.1:0", debounce_s=debounce)
        controller = Controller(cfg, authenticator=NodeNameIsToken(), server_credentials=None)
        await controller.start()
        channels, tasks, stores = [], [], []
        try:
            for node in ("node-0", "node-1"):
                channel = grpc.aio.insecure_channel(f"127.0.0.1:{controller.grpc_port}",
                                                    options=list(GRPC_OPTIONS))
                store = StateStore()
                client = ConfigClient(channel, store, node=node, token=node)
                channels.append(channel)
                stores.append(store)
                tasks.append(asyncio.create_task(client.run()))
            out = []
            for rev in range(1, edits + 1):
                want = str(rev)

                def holds(store: StateStore, want: str = want) -> bool:
                    w = store.current.by_uid.get("demo/web")
                    return w is not None and w.labels.get("rev") == want

                t0 = time.monotonic()
                (root / "pod.yaml").write_text(pod(rev))
                async with asyncio.timeout(10):
                    while not all(holds(s) for s in stores):  # noqa: ASYNC110 - polls stores
                        await asyncio.sleep(0.002)
                out.append(time.monotonic() - t0)
            return out
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for c in channels:
                await c.close(None)
            await controller.stop(grace=0)


def agent_full_apply_s(args: argparse.Namespace) -> float:
    """CPU seconds one agent spends decoding and applying the first full snapshot."""
    from ztunnel_py.controller.push import PushCore
    from ztunnel_py.controller.translate import translate
    from ztunnel_py.state.client import UpdateApplier, WireUpdate
    from ztunnel_py.state.codec import CODEC_VERSION

    snap = translate(objects(args.pods, args.services, args.agents),
                     trust_domain="cluster.local", root_namespace="istio-system").snapshot
    core = PushCore(epoch="b")
    core.publish(snap)
    u = core.update("", "b-1", "agent")
    wire = WireUpdate(u.version, "", CODEC_VERSION, u.root_namespace, u.upserts, u.removals)
    best = float("inf")
    for _ in range(3):
        applier = UpdateApplier(settle=True)  # as ConfigClient makes it
        t = time.process_time()
        applier.apply(wire)
        best = min(best, time.process_time() - t)
        del applier  # freeing the snapshot is not part of applying it (outside the timing)
    return best


def table(rows: list[dict[str, Any]]) -> None:
    base = rows[0]
    print(f"\n{'':28}" + "".join(f"{r['agents']:>12} agent(s)" for r in rows) + "   ratio")
    for key, label, fmt in [
        ("full_sync_s", "time to first full sync (s)", "{:.2f}"),
        ("fan_out_s", "  controller sent them all (s)", "{:.2f}"),
        ("agent_cpu_ms", "  agents' CPU/agent, full (ms)", "{:.0f}"),
        ("p50_ms", "one pod change, p50 (ms)", "{:.0f}"),
        ("p99_ms", "one pod change, p99 (ms)", "{:.0f}"),
        ("publish_p50_ms", "  of which change->published", "{:.0f}"),
        ("translate_ms", "translate whole model (ms)", "{:.0f}"),
        ("full_bytes_per_agent", "full snapshot bytes/agent", "{:,.0f}"),
        ("delta_bytes_per_agent", "one-pod delta bytes/agent", "{:,.0f}"),
        ("rss_mib", "controller RSS (MiB)", "{:.0f}"),
        ("peak_rss_mib", "controller peak RSS (MiB)", "{:.0f}"),
    ]:
        cells = "".join(f"{fmt.format(r[key]):>21}" for r in rows)
        ratio = rows[-1][key] / base[key] if base[key] else float("nan")
        print(f"{label:28}{cells}   x{ratio:.2f}")


async def main_async(args: argparse.Namespace) -> None:
    print(f"controller_sync: {args.pods} pods, {args.services} services, {args.changes} pod "
          f"changes, debounce {args.debounce * 1e3:.0f} ms, agents in {args.procs} process(es), "
          f"{os.cpu_count()} CPU(s)")
    rows = [await scenario(args, 1), await scenario(args, args.agents)]
    table(rows)
    print("\n(baseline: 1 agent in the same run; p50/p99 include the debounce window)")
    apply_s = agent_full_apply_s(args)
    print(f"one agent decoding+applying the full snapshot: {apply_s:.2f} CPU s "
          f"(x{args.agents} agents = {apply_s * args.agents:.1f} CPU s on this machine's "
          f"{os.cpu_count()} CPU(s): the floor for in-process full sync here)")
    edits = sorted(await directory_edits(args.edits, args.debounce))
    print(f"directory source, edit a Pod YAML -> both of 2 agents hold it ({len(edits)} edits): "
          f"p50 {statistics.median(edits) * 1e3:.0f} ms, "
          f"p99 {edits[min(len(edits) - 1, int(len(edits) * 0.99))] * 1e3:.0f} ms, "
          f"max {edits[-1] * 1e3:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=10_000)
    parser.add_argument("--services", type=int, default=1_000)
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--procs", type=int, default=5, help="agent worker processes")
    parser.add_argument("--changes", type=int, default=30, help="single-pod changes timed")
    parser.add_argument("--debounce", type=float, default=0.05)
    parser.add_argument("--edits", type=int, default=20, help="directory edits timed")
    parser.add_argument("--worker", nargs=2, metavar=("PORT", "NODES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import uvloop

    from ztunnel_py import log
    from ztunnel_py.config import LogConfig

    log.configure(LogConfig(level="warning"), stream=sys.stderr)

    if args.worker:
        uvloop.run(worker(int(args.worker[0]), args.worker[1].split(",")))
        return
    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
