"""The README's demo, end to end, through the real CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import require_root
from ztunnel_py.topology import leftovers, sweep
from ztunnel_py.topology.host import ProcessRecord


def _canary_counts(story: str) -> dict[str, int]:
    """``reviews v1:  79  (route weight 80%)`` lines -> {"v1": 79, ...}."""
    counts = {}
    for line in story.splitlines():
        m = re.fullmatch(r"\s+reviews (\S+):\s+(\d+)\s+\(route weight \d+%\)", line)
        if m:
            counts[m.group(1)] = int(m.group(2))
    return counts


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ztunnel_py", "demo", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.fixture
def demo_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    require_root()
    env = {**os.environ, "ZTUNNEL_DEMO_DIR": str(tmp_path / "demo")}
    yield env
    state = tmp_path / "demo" / "state.json"
    if state.exists():  # the test failed before `down`: clean up anyway
        prefix = json.loads(state.read_text())["prefix"]
        _cli(env, "down")
        sweep(prefix)


def test_demo_up_status_request_apply_down(demo_env: dict[str, str], tmp_path: Path) -> None:
    up = _cli(demo_env, "up")
    assert up.returncode == 0, up.stdout + up.stderr
    story = up.stdout
    # [1/4] before ambient: plaintext across the underlay, the marker visible on the wire
    assert "served by helloworld-v1/v1" in story
    assert "TCP ports [8080]; request marker visible on the wire: YES (plaintext)" in story
    # [2/4] labelled ambient: the VIP works through the agents, only HBONE on the wire
    assert "TCP ports [15008] (HBONE" in story and "visible on the wire: no" in story
    assert "served by: helloworld-v1/v1, helloworld-v2/v2" in story or (
        "served by: helloworld-v2/v2, helloworld-v1/v1" in story)
    # [3/4] the AuthorizationPolicy: demo/client allowed, other/visitor refused
    assert "demo/client  -> helloworld: allowed" in story
    assert "other/visitor -> helloworld: refused" in story
    # [4/4] the metrics those connections produced
    assert 'connection_security_policy="mutual_tls"' in story
    assert 'response_flags="DENY"' in story and 'source_workload="visitor"' in story
    # [5/7] bookinfo's canary through the waypoint: 100 requests, 80/20 v1/v3 (loose bounds:
    # binomial, p=0.2 for v3, n=100: 5..40 is beyond 4.5 standard deviations either way)
    canary = _canary_counts(story)
    assert set(canary) == {"v1", "v3"} and sum(canary.values()) == 100, canary
    assert 5 <= canary["v3"] <= 40, canary
    # [6/7] the header route: jason -> v2 (black stars), everyone else -> v3 (red stars)
    assert "as jason:  reviews-v2/v2 x10 [★★★★★ ★★★★☆ (black)]" in story
    assert "anonymous: reviews-v3/v3 x10 [★★★★★ ★★★★☆ (red)]" in story
    # [7/7] the fault: jason's page says ratings are unavailable, others' pages do not
    assert "    | Reviewer1: Ratings service is currently unavailable" in story
    assert "as jason, 3 more: reviews-v2/v2 x3 [ratings unavailable]" in story
    assert "anonymous, 3:     reviews-v3/v3 x3 [★★★★★ ★★★★☆ (red)]" in story
    # ... and the waypoint counts the aborts with response flag FI
    fi = [line for line in story.splitlines() if 'response_flags="FI"' in line]
    assert len(fi) == 1 and 'destination_service_name="ratings"' in fi[0], fi
    assert 'response_code="500"' in fi[0] and 'source_workload="reviews-v2"' in fi[0]
    assert float(fi[0].rpartition("} ")[2]) >= 4  # one page + 3 more, each one ratings call

    st = _cli(demo_env, "status", "--json")
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    prefix = status["prefix"]
    pods = {p["name"]: p for p in status["pods"]}
    bookinfo = {"productpage-v1", "reviews-v1", "reviews-v2", "reviews-v3", "ratings-v1"}
    waypoint = "waypoint-bookinfo-waypoint"
    assert set(pods) == {"client", "helloworld-v1", "helloworld-v2", "visitor", *bookinfo,
                         waypoint}
    for p in pods.values():
        assert p["netns"].startswith(prefix + "-") and Path("/run/netns", p["netns"]).exists()
        assert p["ip"].startswith("10.244.")
        assert p["namespace"] and p["service_account"]
        assert p["labels"].get("app") or p["name"] == waypoint
    assert pods["client"]["node"] == "node1" and pods["helloworld-v1"]["node"] == "node2"
    nodes = {n["name"]: n for n in status["nodes"]}
    assert nodes["node2"]["ip"] == "172.30.0.12"
    assert nodes["node1"]["underlay_iface"] and status["underlay"]["netns"] == f"{prefix}-ul"
    services = {(s["namespace"], s["name"]): s for s in status["services"]}
    assert services[("demo", "helloworld")]["vip"] == "10.96.0.10"
    assert services[("demo", "helloworld")]["ports"][0]["target_port"] == 8080
    assert {name for ns, name in services if ns == "bookinfo"} == {
        "productpage", "reviews", "ratings"}
    assert services[("bookinfo", "productpage")]["vip"] == "10.96.0.20"
    assert {pods[p]["namespace"] for p in bookinfo} == {"bookinfo"}
    assert {pods[p]["node"] for p in bookinfo} == {"node1", "node2"}
    assert pods[waypoint]["labels"]["gateway.networking.k8s.io/gateway-name"] == "waypoint"
    assert status["waypoints"] == [{
        "name": "waypoint", "namespace": "bookinfo", "node": "node2", "pod": waypoint,
        "service_account": "waypoint", "ip": pods[waypoint]["ip"], "hbone_port": 15008,
        "used_by": ["bookinfo"]}]

    # The config dir holds the world as Kubernetes YAML, IPs in status.
    config = Path(status["config_dir"])
    pod = yaml.safe_load((config / "demo--pod--helloworld-v1.yaml").read_text())
    assert pod["status"]["podIP"] == pods["helloworld-v1"]["ip"]
    assert pod["spec"]["nodeName"] == "node2"
    # ... and the Istio objects the story applied, as the user would have written them
    vs = yaml.safe_load(
        (config / "bookinfo--virtualservice.networking.istio.io--ratings.yaml").read_text())
    assert vs["spec"]["http"][0]["fault"]["abort"]["httpStatus"] == 500
    assert (config / "bookinfo--destinationrule.networking.istio.io--reviews.yaml").exists()
    gateway = yaml.safe_load(
        (config / "bookinfo--gateway.gateway.networking.k8s.io--waypoint.yaml").read_text())
    assert gateway["spec"]["gatewayClassName"] == "istio-waypoint"

    # The pods' servers outlived the CLI that started them; an unmodified curl works.
    procs = [ProcessRecord(p["pid"], p["start"], p["target"], ()) for p in status["processes"]]
    # 9 pod services, the controller, one agent per node, the waypoint
    assert len(procs) == 13 and all(p.alive() for p in procs)
    targets = sorted(p["target"] for p in status["processes"])
    assert targets.count("node1") == 2 and targets.count("node2") == 1
    assert targets.count(waypoint) == 1
    curl = subprocess.run(
        ["nsenter", f"--net=/run/netns/{pods['client']['netns']}", "--",
         "curl", "-sS", "-i", "--max-time", "5", f"http://{pods['helloworld-v1']['ip']}:8080/"],
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    assert "x-served-by: helloworld-v1/v1" in curl.stdout, curl.stderr

    # The operator's view, from inside node2 (its agent's loopback admin port).
    ctl = subprocess.run(
        [sys.executable, "-m", "ztunnel_py", "demo", "ctl", "node2", "workloads", "-o", "json"],
        capture_output=True, text=True, timeout=60, env=demo_env,
    )  # fmt: skip
    assert ctl.returncode == 0, ctl.stderr
    workloads = {w["name"]: w for w in json.loads(ctl.stdout)}
    assert set(workloads) == {"client", "helloworld-v1", "helloworld-v2", "visitor", *bookinfo,
                              waypoint}

    again = _cli(demo_env, "up")
    assert again.returncode == 0 and "already up" in again.stdout
    assert json.loads(_cli(demo_env, "status", "--json").stdout)["prefix"] == prefix

    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: deny-all, namespace: demo}\nspec: {}\n"
    )
    applied = _cli(demo_env, "apply", "-f", str(policy))
    assert applied.returncode == 0 and "created" in applied.stdout, applied.stderr
    assert (config / "demo--authorizationpolicy.security.istio.io--deny-all.yaml").exists()
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: [\n")
    bad = _cli(demo_env, "apply", "-f", str(broken))
    assert bad.returncode != 0 and "not valid YAML" in bad.stderr
    deleted = _cli(demo_env, "delete", "-f", str(policy))
    assert deleted.returncode == 0 and "deleted" in deleted.stdout

    down = _cli(demo_env, "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert leftovers(prefix) == []
    assert not any(p.alive() for p in procs)
    assert not Path(demo_env["ZTUNNEL_DEMO_DIR"], "state.json").exists()
    assert _cli(demo_env, "status", "--json").returncode != 0
