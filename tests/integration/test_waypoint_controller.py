"""The waypoint's configuration comes from the controller's gRPC stream (TLS, bootstrap
token, ``kind=waypoint``): editing the YAML the controller watches changes routing live."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from tests.integration.test_controller import NODES, FakeTokens, Mesh, Pki, pki  # noqa: F401
from tests.integration.test_waypoint_http import Backend, Client
from waypoint.cluster import EndpointRef
from waypoint.proxy import WaypointProxy
from waypoint.server import PlainListener
from waypoint.telemetry import WaypointMetrics
from waypoint.upstream import TcpConnector, Upstreams
from ztunnel_py.state.client import GRPC_OPTIONS, ConfigClient
from ztunnel_py.state.snapshot import StateStore

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
metadata: {name: web-v1, namespace: demo, labels: {app: web, version: v1}}
spec: {nodeName: node-a, serviceAccountName: web}
status: {podIP: 10.1.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: web-v2, namespace: demo, labels: {app: web, version: v2}}
spec: {nodeName: node-b, serviceAccountName: web}
status: {podIP: 10.1.0.2}
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
kind: DestinationRule
metadata: {name: web, namespace: demo}
spec:
  host: web
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""


def route_to(subset: str) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: demo}}
spec:
  hosts: [web]
  http:
  - route: [{{destination: {{host: web, subset: {subset}}}}}]
"""


@pytest.fixture
async def controller(tmp_path: Path, pki: Pki) -> AsyncIterator[Mesh]:  # noqa: F811
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "world.yaml").write_text(WORLD)
    (config_dir / "vs.yaml").write_text(route_to("v1"))
    m = Mesh(config_dir, pki, FakeTokens(NODES))
    await m.start_controller()
    try:
        yield m
    finally:
        await m.close()


async def test_routing_follows_the_controller_stream(controller: Mesh, pki: Pki) -> None:  # noqa: F811
    backends = {"10.1.0.1": Backend("web-v1"), "10.1.0.2": Backend("web-v2")}
    for b in backends.values():
        await b.start()

    def resolve(ep: EndpointRef) -> tuple[str, int]:
        return "127.0.0.1", backends[ep.address].port

    store = StateStore()
    creds = grpc.ssl_channel_credentials(root_certificates=pki.roots_pem)
    channel = grpc.aio.secure_channel(f"127.0.0.1:{controller.grpc_port}", creds,
                                      options=list(GRPC_OPTIONS))
    client = ConfigClient(channel, store, node="node-a", kind="waypoint",
                          token=controller.auth.token_for("node-a"),
                          backoff_initial_s=0.05, backoff_max_s=0.5)
    task = asyncio.create_task(client.run())
    proxy = WaypointProxy(store, "demo", "wp", Upstreams(TcpConnector(resolve)),
                          metrics=WaypointMetrics(), rng=random.Random(1))
    listener = PlainListener(proxy)
    address = await listener.start()
    http = Client(address)
    try:
        await asyncio.wait_for(client.wait_synced(), 10)
        served = (await http.request(host="web.demo:80")).headers.get("x-served-by")
        assert served == "web-v1"
        assert any(w.is_waypoint is False and w.name == "web-v1"
                   for w in store.current.workloads)
        (controller.config_dir / "vs.yaml").write_text(route_to("v2"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            served = (await http.request(host="web.demo:80")).headers.get("x-served-by")
            if served == "web-v2":
                break
            await asyncio.sleep(0.05)
        assert served == "web-v2"
    finally:
        await http.close()
        await listener.stop()
        await proxy.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await channel.close(None)
        for b in backends.values():
            await b.stop()
