"""``ztunnel-py waypoint`` as a process against a ``ztunnel-py controller`` process.

The waypoint gets its configuration from the controller's stream and its certificate
from the controller's CA (bootstrap token of its node); a client with its own
CA-issued identity then reaches it over HBONE on loopback. Both processes are ours
(started here, stopped by PID).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from waypoint.http1 import H1Client
from waypoint.pipe import StreamPipe
from waypoint.request import Request
from ztunnel_py.config import HboneConfig
from ztunnel_py.hbone.core import forwarded_for
from ztunnel_py.identity.manager import GrpcCaClient, SecretManager
from ztunnel_py.proxy.pool import ConnectionPool, PoolKey
from ztunnel_py.state.client import GRPC_OPTIONS

REPO = Path(__file__).resolve().parents[2]
TD = "cluster.local"

WORLD = """
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: demo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Pod
metadata:
  name: wp-0
  namespace: demo
  labels: {gateway.networking.k8s.io/gateway-name: wp}
spec: {nodeName: node-a, serviceAccountName: wp}
status: {podIP: 10.1.0.9}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo, labels: {app: client}}
spec: {nodeName: node-a, serviceAccountName: client}
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: web-v1, namespace: demo, labels: {app: web, version: v1}}
spec: {nodeName: node-b, serviceAccountName: web}
status: {podIP: 127.%d.%d.11}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  selector: {app: web}
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: demo}
spec:
  hosts: [web]
  http:
  - match: [{uri: {exact: /hello}}]
    directResponse: {status: 200, body: {string: hello from the waypoint}}
  - route: [{destination: {host: web}}]
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


@dataclass
class Procs:
    state: Path
    grpc_port: int
    hbone_port: int
    metrics_port: int
    ready_port: int
    admin_port: int
    controller: subprocess.Popen[bytes]
    waypoint: subprocess.Popen[bytes]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    import random

    a, b = random.randint(64, 250), random.randint(1, 250)
    config = tmp_path / "config"
    config.mkdir()
    (config / "world.yaml").write_text(WORLD % (a, b))
    state = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": str(REPO), "LOG_LEVEL": "info"}
    cli = [sys.executable, "-m", "ztunnel_py"]
    token = subprocess.run([*cli, "controller", "--state-dir", str(state), "--issue-token",
                            "node-a"], env=env, capture_output=True, text=True, check=True,
                           timeout=30).stdout.strip().splitlines()[-1]
    grpc_port, hbone, metrics, ready, admin = (_port() for _ in range(5))
    controller = subprocess.Popen(
        [*cli, "controller", "--config-dir", str(config), "--state-dir", str(state),
         "--grpc-address", f"127.0.0.1:{grpc_port}", "--admin-address", "127.0.0.1:0"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    waypoint: subprocess.Popen[bytes] | None = None
    log = (tmp_path / "waypoint.log").open("wb")
    try:
        deadline = time.monotonic() + 30
        while not (state / "roots.pem").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        waypoint = subprocess.Popen(
            [*cli, "waypoint", "--name", "wp", "--namespace", "demo", "--node", "node-a",
             "--controller", f"127.0.0.1:{grpc_port}",
             "--controller-ca", str(state / "roots.pem"), "--token-file", token,
             "--listen", f"127.0.0.1:{hbone}", "--metrics-address", f"127.0.0.1:{metrics}",
             "--readiness-address", f"127.0.0.1:{ready}",
             "--admin-address", f"127.0.0.1:{admin}"],
            env=env, stdout=log, stderr=subprocess.STDOUT)
        yield Procs(state, grpc_port, hbone, metrics, ready, admin, controller, waypoint)
    finally:
        if waypoint is not None:
            _stop(waypoint)
        _stop(controller)
        log.close()


def _wait_ready(p: Procs) -> None:
    deadline = time.monotonic() + 40
    status = 0
    while time.monotonic() < deadline:
        assert p.waypoint.poll() is None, "the waypoint exited"
        status, _ = _get(p.ready_port, "/healthz/ready")
        if status == 200:
            return
        time.sleep(0.1)
    raise AssertionError(f"waypoint not ready after 40 s (last status {status})")


@pytest.mark.slow
async def test_waypoint_process_serves_hbone_with_controller_config_and_identity(
        procs: Procs) -> None:
    await asyncio.to_thread(_wait_ready, procs)
    status, dump = await asyncio.to_thread(_get, procs.admin_port, "/config_dump")
    assert status == 200
    services = json.loads(dump)["services"]
    assert services["web.demo.svc.cluster.local"]["routes"] == "VirtualService demo/web"

    # A client pod of node-a, with a certificate from the controller's CA.
    token = (procs.state / "tokens" / "node-a.token").read_text().strip()
    creds = grpc.ssl_channel_credentials((procs.state / "roots.pem").read_bytes())
    channel = grpc.aio.secure_channel(f"127.0.0.1:{procs.grpc_port}", creds,
                                      options=list(GRPC_OPTIONS))
    secrets = SecretManager(GrpcCaClient(channel, token=token, node="node-a"))
    pool = ConnectionPool(HboneConfig(), secrets, TD)
    client_id = f"spiffe://{TD}/ns/demo/sa/client"
    key = PoolKey(client_id, f"spiffe://{TD}/ns/demo/sa/wp", ("127.0.0.1", procs.hbone_port))

    async def get(path: str) -> tuple[int, bytes]:
        leg = await asyncio.wait_for(
            pool.open_stream(key, "10.96.0.10:80", forwarded=forwarded_for("10.1.0.2")), 10)
        http = H1Client(StreamPipe(leg))
        try:
            resp = await asyncio.wait_for(http.request(Request("GET", path, "web"), b""), 20)
        finally:
            http.close()
        return resp.status, resp.body

    try:
        assert await get("/hello") == (200, b"hello from the waypoint")
        status, _ = await get("/other")  # routed to web-v1 over HBONE: no agent there
        assert status == 503
    finally:
        pool.close()
        await secrets.close()
        await channel.close(None)
    status, metrics = await asyncio.to_thread(_get, procs.metrics_port, "/metrics")
    text = metrics.decode()
    assert status == 200
    assert 'reporter="waypoint"' in text
    assert f'source_principal="{client_id}"' in text
    assert 'response_code="200"' in text and 'response_flags="URX,UF"' in text
    with contextlib.suppress(ProcessLookupError):
        assert procs.waypoint.poll() is None
