"""The topology builder, for real: namespaces, veths, routes, cgroups, teardown, sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable

from ztunnel_py.demo import httpservice
from ztunnel_py.topology import PodSpec, Topology, TopologySpec, leftovers, sweep
from ztunnel_py.topology.host import ProcessRecord, start_ticks

Build = Callable[[TopologySpec], Topology]


def _curl(topo: Topology, client: str, url: str) -> subprocess.CompletedProcess[str]:
    return topo.run(client, ["curl", "-sS", "-i", "--max-time", "5", url], timeout=10)


def _root_links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def test_curl_from_node1_pod_reaches_node2_pod_and_teardown_leaves_nothing(
    topology: Build,
) -> None:
    topo = topology(TopologySpec.simple(nodes=2, pods_per_node=2))
    server = topo.pod("node2-pod1")
    assert topo.node_of(server).name == "node2"
    assert topo.node_of("node1-pod1").pod_cidr != topo.node_of(server).pod_cidr
    srv = topo.popen(server, httpservice.command(server.name, "v7"))
    topo.wait_listening(server, 8080, proc=srv)

    cross = _curl(topo, "node1-pod1", f"http://{server.ip}:8080/")
    assert cross.returncode == 0, cross.stderr
    assert "x-served-by: node2-pod1/v7" in cross.stdout
    assert "Hello version: v7, instance: node2-pod1" in cross.stdout
    same_node = _curl(topo, "node2-pod2", f"http://{server.ip}:8080/headers")
    assert same_node.returncode == 0, same_node.stderr
    assert "x-served-by: node2-pod1/v7" in same_node.stdout

    # Pod traffic enters its node through the host-side veth (where capture attaches).
    host_veth = server.host_veth
    out = topo.run(topo.node_of(server), ["ip", "-o", "route", "get", server.ip]).stdout
    assert f"dev {host_veth}" in out
    # Processes run in the pod's cgroup (where cgroup eBPF hooks attach).
    cg = topo.run(server, ["cat", "/proc/self/cgroup"]).stdout
    assert f"0::/{server.cgroup}\n" in cg
    # Nothing of ours lives in the root namespace.
    assert topo.prefix not in _root_links()

    srv_record = ProcessRecord(srv.pid, start_ticks(srv.pid), server.name, ())
    assert leftovers(topo.prefix)
    topo.teardown()
    assert leftovers(topo.prefix) == []
    assert not any(n.startswith(topo.prefix) for n in os.listdir("/run/netns"))
    assert topo.prefix not in _root_links()
    assert not srv_record.alive()


CRASHING_RUN = textwrap.dedent(
    """
    import json, subprocess, sys, time
    from ztunnel_py.demo import httpservice
    from ztunnel_py.topology import Topology, TopologySpec
    topo = Topology.build(TopologySpec.simple(2, 1, prefix=sys.argv[1]))
    srv = topo.popen(
        "node2-pod1", httpservice.command("node2-pod1"), stdout=subprocess.DEVNULL
    )
    topo.wait_listening("node2-pod1", 8080, proc=srv)
    print(json.dumps({"server_pid": srv.pid}), flush=True)
    time.sleep(60)
    """
)


def test_sweep_cleans_up_after_a_run_killed_midway(topology: Build, netns_prefix: str) -> None:
    crashed = netns_prefix + "k"
    child = subprocess.Popen(
        [sys.executable, "-c", CRASHING_RUN, crashed], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        server_pid = json.loads(line)["server_pid"]
        server = ProcessRecord(server_pid, start_ticks(server_pid), "node2-pod1", ())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=5)
        if child.stdout:
            child.stdout.close()
    try:
        left = leftovers(crashed)
        assert f"netns {crashed}-node2-pod1" in left
        assert any(item.startswith("cgroup ") for item in left)
        assert server.alive()  # orphaned, still serving

        # The next run with that prefix sweeps first and builds cleanly on top.
        again = Topology.build(TopologySpec.simple(2, 1, prefix=crashed))
        assert not server.alive()
        ok = again.run("node1-pod1", ["ip", "-o", "addr", "show", "dev", "eth0"])
        assert again.pod("node1-pod1").ip in ok.stdout
        again.teardown()
        assert leftovers(crashed) == []
    finally:
        sweep(crashed)


def test_pods_added_and_removed_after_the_build(topology: Build) -> None:
    topo = topology(TopologySpec.simple(nodes=2, pods_per_node=1))
    late = topo.add_pod("node2", PodSpec("late", namespace="shop", app="late", version="v3"))
    assert topo.pod("late") == late and topo.node_of(late).name == "node2"
    srv = topo.popen(late, httpservice.command(late.name, "v3"), stdout=subprocess.DEVNULL)
    topo.wait_listening(late, 8080, proc=srv)
    got = _curl(topo, "node1-pod1", f"http://{late.ip}:8080/")
    assert "x-served-by: late/v3" in got.stdout, got.stderr

    record = next(r for r in topo.processes if r.target == "late")
    topo.remove_pod("late")
    assert not record.alive()
    assert not os.path.exists(f"/run/netns/{late.netns}")
    assert not topo.cgroup_of("node1-pod1").parent.joinpath("late").exists()
    routes = topo.run("node2", ["ip", "-o", "route"]).stdout
    assert late.ip not in routes and late.host_veth not in routes
    gone = _curl(topo, "node1-pod1", f"http://{late.ip}:8080/")
    assert gone.returncode != 0
