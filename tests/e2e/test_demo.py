"""The README's demo, end to end, through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import require_root
from ztunnel_py.topology import leftovers, sweep
from ztunnel_py.topology.host import ProcessRecord


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

    st = _cli(demo_env, "status", "--json")
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    prefix = status["prefix"]
    pods = {p["name"]: p for p in status["pods"]}
    assert set(pods) == {"client", "helloworld-v1", "helloworld-v2", "visitor"}
    for p in pods.values():
        assert p["netns"].startswith(prefix + "-") and Path("/run/netns", p["netns"]).exists()
        assert p["ip"].startswith("10.244.")
        assert p["namespace"] and p["service_account"] and p["labels"]["app"]
    assert pods["client"]["node"] == "node1" and pods["helloworld-v1"]["node"] == "node2"
    nodes = {n["name"]: n for n in status["nodes"]}
    assert nodes["node2"]["ip"] == "172.30.0.12"
    assert nodes["node1"]["underlay_iface"] and status["underlay"]["netns"] == f"{prefix}-ul"
    services = {(s["namespace"], s["name"]): s for s in status["services"]}
    assert services[("demo", "helloworld")]["vip"] == "10.96.0.10"
    assert services[("demo", "helloworld")]["ports"][0]["target_port"] == 8080

    # The config dir holds the world as Kubernetes YAML, IPs in status.
    config = Path(status["config_dir"])
    pod = yaml.safe_load((config / "demo--pod--helloworld-v1.yaml").read_text())
    assert pod["status"]["podIP"] == pods["helloworld-v1"]["ip"]
    assert pod["spec"]["nodeName"] == "node2"

    # The pods' servers outlived the CLI that started them; an unmodified curl works.
    procs = [ProcessRecord(p["pid"], p["start"], p["target"], ()) for p in status["processes"]]
    # 4 pod services, the controller, one agent per node
    assert len(procs) == 7 and all(p.alive() for p in procs)
    targets = sorted(p["target"] for p in status["processes"])
    assert targets.count("node1") == 2 and targets.count("node2") == 1
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
    assert set(workloads) == {"client", "helloworld-v1", "helloworld-v2", "visitor"}

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
