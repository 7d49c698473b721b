"""Kubernetes mode end to end, in process: fake API server → controller → agent over gRPC/TLS.

``kubernetes_mode`` builds the source, the CA (from its Secret) and the
TokenReview authenticator exactly as ``ztunnel-py controller --kubernetes``
does; an agent authenticates with its (fake) projected token, trusts the roots
the controller published in its ConfigMap, and receives the model. Objects
created in the "cluster" reach the agent's state; a pod relabelled out of
ambient leaves it; an agent claiming another node than its token's pod is
turned away.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.fakes.kubeapi import FakeKubeApi, service_account_review
from ztunnel_py.config import ControllerConfig
from ztunnel_py.controller import kube_identity
from ztunnel_py.controller.runtime import Controller
from ztunnel_py.state.client import GRPC_OPTIONS, ConfigClient
from ztunnel_py.state.snapshot import Snapshot, StateStore

NS = "ztunnel-py-system"


def pod(name: str, ns: str, node: str, sa: str, ip: str,
        labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {"app": name}},
        "spec": {"nodeName": node, "serviceAccountName": sa,
                 "containers": [{"name": "c", "image": "x",
                                 "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip,
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }


@pytest.fixture
def fake() -> Iterator[FakeKubeApi]:
    with FakeKubeApi() as api:
        api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": "demo", "labels": {"istio.io/dataplane-mode": "ambient"}}})
        agent = api.apply(pod("agent-x", NS, "node-1", "ztunnel-py-agent", "192.168.0.1"))
        api.token_reviews["agent-token"] = service_account_review(
            NS, "ztunnel-py-agent", "agent-x", agent["metadata"]["uid"])
        api.apply(pod("web", "demo", "node-1", "web", "10.0.1.5"))
        yield api


async def until(pred: Callable[[], bool], what: str, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s}s: {what}")
        await asyncio.sleep(0.02)


class Running:
    def __init__(self, controller: Controller, roots: bytes, tasks: list[asyncio.Task[Any]],
                 stop: Callable[[], Any]) -> None:
        self.controller = controller
        self.roots = roots
        self.tasks = tasks
        self.stop = stop


@pytest.fixture
async def running(fake: FakeKubeApi, tmp_path: Path) -> AsyncIterator[Running]:
    cfg = ControllerConfig(kubernetes=True, state_dir=tmp_path / "state", kube_namespace=NS,
                           grpc_address="127.0.0.1:0", admin_address="127.0.0.1:0",
                           debounce_s=0.02)
    mode = await asyncio.to_thread(kube_identity.kubernetes_mode, cfg, fake.write_kubeconfig())
    chain, key = mode.ca.serving_certificate(["localhost"], ["127.0.0.1"])
    controller = Controller(cfg, authenticator=mode.authenticator,
                            server_credentials=grpc.ssl_server_credentials([(key, chain)]))
    await controller.start()
    await mode.source.start(sync_timeout_s=10)
    feed = asyncio.create_task(mode.source.feed(controller.submit))
    published = fake.objects[("", "configmaps", NS, kube_identity.ROOT_CONFIGMAP)]
    roots = published["data"][kube_identity.ROOT_KEY].encode()

    async def stop() -> None:
        feed.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feed
        await mode.source.stop()
        await controller.stop(grace=0)

    run = Running(controller, roots, [], stop)
    try:
        yield run
    finally:
        for t in run.tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await stop()


async def agent(run: Running, node: str, token: str) -> tuple[StateStore, ConfigClient,
                                                              grpc.aio.Channel]:
    creds = grpc.ssl_channel_credentials(root_certificates=run.roots)
    channel = grpc.aio.secure_channel(f"127.0.0.1:{run.controller.grpc_port}", creds,
                                      options=[*GRPC_OPTIONS,
                                               ("grpc.ssl_target_name_override", "localhost")])
    store = StateStore()
    client = ConfigClient(channel, store, node=node, token=token, backoff_initial_s=0.05,
                          backoff_max_s=0.2)
    run.tasks.append(asyncio.create_task(client.run()))
    return store, client, channel


def enrolled(store: StateStore) -> set[str]:
    snap: Snapshot = store.current
    return {w.name for w in snap.workloads if w.enrolled}


async def test_cluster_objects_reach_the_agent_and_relabel_leaves_the_mesh(
    fake: FakeKubeApi, running: Running
) -> None:
    store, _, channel = await agent(running, "node-1", "agent-token")
    try:
        await until(lambda: "web" in enrolled(store), "the pod reaches the agent")

        fake.apply({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "web", "namespace": "demo"},
                    "spec": {"clusterIP": "10.96.0.30", "selector": {"app": "web"},
                             "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
        fake.apply({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                    "metadata": {"name": "deny-all", "namespace": "demo"},
                    "spec": {"action": "DENY", "rules": [{}]}})
        await until(lambda: [s.key for s in store.current.services] == ["demo/web"],
                    "the service reaches the agent")
        await until(lambda: [p.key for p in store.current.authorization_policies]
                    == ["demo/deny-all"], "the policy reaches the agent")

        web = copy.deepcopy(fake.objects[("", "pods", "demo", "web")])
        web["metadata"]["labels"]["istio.io/dataplane-mode"] = "none"
        fake.apply(web)
        await until(lambda: "web" not in enrolled(store), "the relabelled pod leaves the mesh")
    finally:
        await channel.close(None)


async def test_agent_claiming_another_node_gets_nothing(
    fake: FakeKubeApi, running: Running
) -> None:
    store, client, channel = await agent(running, "node-2", "agent-token")
    try:
        # connected only once the controller takes the stream: never, through all the
        # refused attempts (sampled every millisecond, inside the attempts too)
        seen: set[bool] = set()

        async def sample() -> None:
            while True:
                seen.add(client.status.connected)
                await asyncio.sleep(0.001)

        sampler = asyncio.create_task(sample())
        try:
            await until(lambda: client.status.reconnects >= 3, "the stream is refused repeatedly")
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        assert seen == {False}
        assert "node-1" in (client.status.last_error or "")
        assert not store.current.workloads
    finally:
        await channel.close(None)
