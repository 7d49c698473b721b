"""Controller on a directory + two in-process agents, over real gRPC with TLS on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from ztunnel_py.config import ControllerConfig
from ztunnel_py.controller.analyze import analyze
from ztunnel_py.controller.runtime import Controller
from ztunnel_py.identity import x509 as x509u
from ztunnel_py.state.client import GRPC_OPTIONS, ConfigClient
from ztunnel_py.state.codec import snapshot_to_json
from ztunnel_py.state.snapshot import StateStore
from ztunnel_py.telemetry.admin import AdminServer, get_json

NODES = ("node-a", "node-b")


class AuthError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class FakeTokens:
    """The bootstrap-token authenticator's shape: token -> node."""

    def __init__(self, nodes: tuple[str, ...]) -> None:
        self.tokens = {f"token-{n}": n for n in nodes}

    def token_for(self, node: str) -> str:
        return f"token-{node}"

    def authenticate(self, metadata: Mapping[str, str]) -> str:
        auth = metadata.get("authorization", "")
        node = self.tokens.get(auth.removeprefix("Bearer "))
        if node is None:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "unknown bootstrap token")
        return node


@dataclass
class Pki:
    roots_pem: bytes
    chain_pem: bytes
    key_pem: bytes


@pytest.fixture(scope="module")
def pki() -> Pki:
    root_key = x509u.new_key()
    root = x509u.self_signed_root(root_key, "cluster.local")
    issuer = x509u.Issuer(root_key, root, (), (root,))
    key = x509u.new_key()
    leaf = issuer.issue(key.public_key(), dns_names=["localhost"], ips=["127.0.0.1"],
                        ttl=dt.timedelta(hours=1), client_auth=False)
    return Pki(issuer.roots_pem, x509u.certs_pem([leaf, root]), x509u.private_key_pem(key))


def namespace_yaml() -> str:
    return """
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels:
    istio.io/dataplane-mode: ambient
"""


def pod_yaml(name: str, ip: str, node: str, app: str = "web") -> str:
    return f"""
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: demo
  labels: {{app: {app}}}
spec:
  nodeName: {node}
  serviceAccountName: {app}
  containers:
  - name: main
    ports: [{{name: http, containerPort: 8080}}]
status:
  podIP: {ip}
"""


def service_yaml(name: str, vip: str, app: str = "web") -> str:
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: demo}}
spec:
  selector: {{app: {app}}}
  clusterIP: {vip}
  ports: [{{port: 80, targetPort: http, name: http}}]
"""


@dataclass
class Agent:
    node: str
    store: StateStore
    client: ConfigClient
    admin: AdminServer
    channel: grpc.aio.Channel
    task: asyncio.Task[None] | None = None

    async def dump(self) -> Any:
        async with asyncio.timeout(5):
            return await get_json("127.0.0.1", self.admin.port, "/config_dump")


@dataclass
class Mesh:
    config_dir: Path
    pki: Pki
    auth: FakeTokens
    controller: Controller | None = None
    grpc_port: int = 0
    agents: list[Agent] = field(default_factory=list)

    def cfg(self) -> ControllerConfig:
        return ControllerConfig(config_dir=self.config_dir,
                                grpc_address=f"127.0.0.1:{self.grpc_port}",
                                admin_address="127.0.0.1:0", debounce_s=0.02)

    async def start_controller(self) -> Controller:
        creds = grpc.ssl_server_credentials([(self.pki.key_pem, self.pki.chain_pem)])
        controller = Controller(self.cfg(), authenticator=self.auth, server_credentials=creds)
        await controller.start()
        self.grpc_port = controller.grpc_port
        self.controller = controller
        return controller

    async def stop_controller(self) -> None:
        assert self.controller is not None
        # a short grace, as the CLI's stop has: the controller ends every stream with OK
        # first, and the handlers return on their own; with none, grpc.aio cancels them
        # mid-return, and now and then such a task did not finish unwinding in time for
        # the leak check (CI: HandleExceptions[MeshConfig/Stream] still cancelling)
        await self.controller.stop(grace=0.5)
        self.controller = None

    async def start_agent(self, node: str, *, token: str | None = None) -> Agent:
        creds = grpc.ssl_channel_credentials(root_certificates=self.pki.roots_pem)
        channel = grpc.aio.secure_channel(f"127.0.0.1:{self.grpc_port}", creds,
                                          options=list(GRPC_OPTIONS))
        store = StateStore()
        client = ConfigClient(channel, store, node=node,
                              token=token if token is not None else self.auth.token_for(node),
                              backoff_initial_s=0.05, backoff_max_s=0.5)
        admin = AdminServer("127.0.0.1", 0)
        admin.route("/config_dump", lambda: snapshot_to_json(store.current))
        await admin.start()
        agent = Agent(node, store, client, admin, channel)
        agent.task = asyncio.create_task(client.run(), name=f"agent-{node}")
        self.agents.append(agent)
        return agent

    async def close(self) -> None:
        for agent in self.agents:
            assert agent.task is not None
            agent.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await agent.task
            await agent.admin.close()
            await agent.channel.close(None)
        if self.controller is not None:
            await self.stop_controller()


@pytest.fixture
async def mesh(tmp_path: Path, pki: Pki) -> AsyncIterator[Mesh]:
    config_dir = tmp_path / "config"
    (config_dir / "apps").mkdir(parents=True)
    (config_dir / "namespace.yaml").write_text(namespace_yaml())
    (config_dir / "apps" / "web.yaml").write_text(
        "---".join([pod_yaml("web-1", "10.1.0.1", "node-a"), pod_yaml("web-2", "10.1.0.2",
                                                                        "node-b")]))
    (config_dir / "apps" / "web-svc.yml").write_text(service_yaml("web", "10.96.0.10"))
    m = Mesh(config_dir, pki, FakeTokens(NODES))
    await m.start_controller()
    try:
        yield m
    finally:
        await m.close()


async def eventually(check: Callable[[], Awaitable[bool]], limit_s: float = 10.0) -> float:
    """Seconds until ``check()`` holds (fails after ``limit_s``: a bound, not a benchmark).

    Polls: the agents' admin endpoints are the observable being tested."""
    start = time.monotonic()
    async with asyncio.timeout(limit_s):
        while not await check():  # noqa: ASYNC110 - polling an HTTP endpoint, not a flag
            await asyncio.sleep(0.01)
    return time.monotonic() - start


def pod_names(dump: Any) -> set[str]:
    return {w["name"] for w in dump["workload"]}


async def controller_agents(m: Mesh) -> Any:
    assert m.controller is not None
    async with asyncio.timeout(5):
        return await get_json("127.0.0.1", m.controller.admin.port, "/agents")


async def all_acked(m: Mesh) -> bool:
    info = await controller_agents(m)
    acked = {a["node"]: a["acked_version"] for a in info["agents"]}
    return set(acked) == set(NODES) and all(v == info["latest_version"] for v in acked.values())


async def test_edit_add_delete_reach_both_agents_and_controller_sees_acks(mesh: Mesh) -> None:
    agents = [await mesh.start_agent(n) for n in NODES]
    for a in agents:
        await eventually(lambda a=a: _has_pods(a, {"web-1", "web-2"}))
    dump = await agents[0].dump()
    svc = dump["service"][0]
    assert svc["hostname"] == "web.demo.svc.cluster.local"
    assert {e["address"] for e in svc["endpoints"]} == {"10.1.0.1", "10.1.0.2"}
    assert all(e["ports"] == {"80": 8080} for e in svc["endpoints"])
    assert all(w["enrolled"] for w in dump["workload"])

    # edit: move web-2 to a new IP and add a pod in a new file
    apps = mesh.config_dir / "apps"
    (apps / "web.yaml").write_text("---".join([pod_yaml("web-1", "10.1.0.1", "node-a"),
                                               pod_yaml("web-2", "10.1.0.22", "node-b")]))
    (apps / "db.yaml").write_text(pod_yaml("db-1", "10.1.0.3", "node-a", app="db"))

    async def edited(a: Agent) -> bool:
        d = await a.dump()
        ips = {ip for w in d["workload"] for ip in w["ips"]}
        return ips == {"10.1.0.1", "10.1.0.22", "10.1.0.3"}

    for a in agents:
        await eventually(lambda a=a: edited(a))
    svc = (await agents[1].dump())["service"][0]
    assert {e["address"] for e in svc["endpoints"]} == {"10.1.0.1", "10.1.0.22"}

    # delete
    (apps / "db.yaml").unlink()
    for a in agents:
        await eventually(lambda a=a: _has_pods(a, {"web-1", "web-2"}))
    await eventually(lambda: all_acked(mesh))
    info = await controller_agents(mesh)
    assert all(a["last_nack"] is None for a in info["agents"])
    versions = {(await a.dump())["version"] for a in agents}
    assert versions == {info["latest_version"]}


async def _has_pods(a: Agent, names: set[str]) -> bool:
    return pod_names(await a.dump()) == names


GOOD_WEB_2 = pod_yaml("web-2", "10.1.0.2", "node-b")


@pytest.mark.parametrize(
    ("web_yaml", "where"),
    [
        # the whole file stops parsing: it keeps its last good objects
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: bad\n---\n" + GOOD_WEB_2,
         "YAML does not parse"),
        # web-1's new version is refused: web-1 keeps its last good version
        (pod_yaml("web-1", "10.1.0.99", "node-a").replace("nodeName: node-a", "nodeName: [a]")
         + "---\n" + GOOD_WEB_2, "spec.nodeName"),
        # an unknown kind beside the good pods is dropped alone
        (pod_yaml("web-1", "10.1.0.1", "node-a") + "---\n" + GOOD_WEB_2
         + "---\napiVersion: v1\nkind: Podd\nmetadata: {name: x, namespace: demo}\n",
         "unknown kind 'Podd'"),
    ],
    ids=["bad-yaml", "wrong-type", "unknown-kind"],
)
async def test_malformed_document_is_reported_and_good_state_kept(
    mesh: Mesh, web_yaml: str, where: str
) -> None:
    agents = [await mesh.start_agent(n) for n in NODES]
    for a in agents:
        await eventually(lambda a=a: _has_pods(a, {"web-1", "web-2"}))
    assert mesh.controller is not None
    apps = mesh.config_dir / "apps"
    (apps / "web.yaml").write_text(web_yaml)
    # another file changes at the same time: the rest of the directory still applies
    (apps / "extra.yaml").write_text(pod_yaml("extra", "10.1.0.9", "node-b", app="extra"))
    for a in agents:
        await eventually(lambda a=a: _has_pods(a, {"web-1", "web-2", "extra"}))
    problems = mesh.controller.sync.problems
    errors = [str(p) for p in problems if p.severity == "error"]
    assert errors, problems
    assert any("[apps/web.yaml" in e and where in e for e in errors), errors
    # web-1 kept its last good state (IP, node) on both agents
    for a in agents:
        w1 = next(w for w in (await a.dump())["workload"] if w["name"] == "web-1")
        assert w1["ips"] == ["10.1.0.1"] and w1["node"] == "node-a"
    # analyze gives the same messages, and fails
    from_analyze = [str(p) for p in analyze(mesh.config_dir) if p.severity == "error"]
    for e in from_analyze:
        assert e in errors or "keeping" in e
    assert set(from_analyze) >= {e for e in errors if "keeping" not in e}


async def test_controller_restart_agents_keep_state_and_converge(mesh: Mesh) -> None:
    agents = [await mesh.start_agent(n) for n in NODES]
    for a in agents:
        await eventually(lambda a=a: _has_pods(a, {"web-1", "web-2"}))
    old_version = (await agents[0].dump())["version"]
    await mesh.stop_controller()
    (mesh.config_dir / "apps" / "db.yaml").write_text(pod_yaml("db-1", "10.1.0.3", "node-a",
                                                               app="db"))
    await asyncio.sleep(30)  # the issue's 30 s away; agents keep retrying with backoff
    for a in agents:
        d = await a.dump()
        assert d["version"] == old_version and pod_names(d) == {"web-1", "web-2"}
        assert not a.client.status.connected
        assert a.client.status.reconnects >= 2
    await mesh.start_controller()
    for a in agents:
        await eventually(lambda a=a: _has_pods(a, {"web-1", "web-2", "db-1"}))
    await eventually(lambda: all_acked(mesh))
    assert (await agents[0].dump())["version"] != old_version
    assert all(a.client.status.connected for a in agents)  # taken by the new controller


async def test_bad_token_is_refused_and_agent_keeps_trying(mesh: Mesh) -> None:
    agent = await mesh.start_agent("node-a", token="not-a-token")
    await eventually(lambda: _reconnected(agent))
    assert "refused our credential" in agent.client.status.last_error
    assert pod_names(await agent.dump()) == set()
    assert (await controller_agents(mesh))["agents"] == []


async def _reconnected(a: Agent) -> bool:
    return a.client.status.reconnects >= 2


async def test_controller_admin_dumps_model_and_problems(mesh: Mesh) -> None:
    assert mesh.controller is not None
    async with asyncio.timeout(5):
        dump = await get_json("127.0.0.1", mesh.controller.admin.port, "/config_dump")
    assert pod_names(dump) == {"web-1", "web-2"}
    assert dump["problems"] == []
    json.dumps(dump)


async def test_refused_update_is_nacked_and_never_replaces_good_state(mesh: Mesh) -> None:
    from dataclasses import replace

    from ztunnel_py.state.model import Endpoint

    agents = [await mesh.start_agent(n) for n in NODES]
    for a in agents:
        await eventually(lambda a=a: _has_pods(a, {"web-1", "web-2"}))
    assert mesh.controller is not None
    latest = mesh.controller.core.latest
    assert latest is not None
    good = latest.snapshot
    # a model whose service names a workload it does not contain (a translator bug, say)
    svc = replace(good.services[0], endpoints=(Endpoint("demo/ghost", "10.1.0.77"),))
    bad_version = mesh.controller.service.publish(replace(good, services=(svc,)))

    async def nacked() -> bool:
        info = await controller_agents(mesh)
        return all(a["last_nack"] and a["last_nack"]["version"] == bad_version
                   for a in info["agents"]) and len(info["agents"]) == 2

    await eventually(nacked)
    info = await controller_agents(mesh)
    assert all("demo/ghost" in a["last_nack"]["error"] for a in info["agents"])
    for a in agents:
        d = await a.dump()
        assert d["version"] != bad_version  # good.version, or a later re-publish of it
        assert {e["address"] for e in d["service"][0]["endpoints"]} == {"10.1.0.1", "10.1.0.2"}
    # the next good model converges everybody
    (mesh.config_dir / "apps" / "db.yaml").write_text(pod_yaml("db-1", "10.1.0.3", "node-a",
                                                               app="db"))
    for a in agents:
        await eventually(lambda a=a: _has_pods(a, {"web-1", "web-2", "db-1"}))
    await eventually(lambda: all_acked(mesh))


async def test_admin_server_is_loopback_only_read_only_json() -> None:
    from ztunnel_py.telemetry.admin import AdminError

    with pytest.raises(AdminError, match="not loopback"):
        AdminServer("0.0.0.0", 0)
    admin = AdminServer("127.0.0.1", 0)
    admin.route("/x", lambda: {"ok": True})

    async def boom() -> None:
        raise RuntimeError("kaput")

    admin.route("/boom", boom)
    await admin.start()
    try:
        assert await get_json("127.0.0.1", admin.port, "/x?verbose=1") == {"ok": True}
        assert "/x" in (await get_json("127.0.0.1", admin.port, "/"))["routes"]
        with pytest.raises(AdminError, match="HTTP 404"):
            await get_json("127.0.0.1", admin.port, "/nope")
        with pytest.raises(AdminError, match=r"HTTP 500(?s:.*)kaput"):
            await get_json("127.0.0.1", admin.port, "/boom")
        reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
        writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(5):
            reply = await reader.read()
        writer.close()
        await writer.wait_closed()
        assert reply.startswith(b"HTTP/1.1 405")
    finally:
        await admin.close()
