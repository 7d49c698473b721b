"""Inbound plaintext (:15006) and graceful drain."""

from __future__ import annotations

import asyncio
import socket

import pytest

from ztunnel_py.proxy.testing import LoopbackMesh, loopback_prefix
from ztunnel_py.state.model import Workload
from ztunnel_py.state.snapshot import Snapshot
from ztunnel_py.telemetry import connection as telemetry

from .test_proxy_mesh import APP_PORT, Servers, echo, make_world, pod


async def plaintext_connect(
    mesh: LoopbackMesh, src_ip: str, dst: tuple[str, int], node: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client at ``src_ip`` whose connection to ``dst`` the node captured to :15006."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((src_ip, 0))
        mesh.dst.by_peer[(src_ip, sock.getsockname()[1])] = dst
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, mesh.agents[node].plaintext)
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def test_plaintext_allowed_without_identity_unless_strict() -> None:
    prefix = loopback_prefix()
    strict_port = APP_PORT + 1

    def strict(w: Workload, port: int, snapshot: Snapshot) -> bool:
        return w.name == "b" and port == strict_port

    workloads = [
        pod("b", f"{prefix}20", "node-2", "server"),
        pod("c", f"{prefix}30", "node-2", "legacy", enrolled=False),
        pod("x", f"{prefix}40", "node-1", "other"),
    ]
    mesh = LoopbackMesh(workloads, ["node-1", "node-2"], prefix, strict=strict)
    servers = Servers()
    records: list[telemetry.ConnectionResult] = []
    telemetry.add_sink(records.append)
    try:
        await mesh.start()
        b, c = f"{prefix}20", f"{prefix}30"
        await servers.serve(b, APP_PORT, echo)
        await servers.serve(b, strict_port, echo)
        await servers.serve(c, APP_PORT, echo)

        # a legacy (not enrolled) client reaches an enrolled pod in plaintext
        r, w = await plaintext_connect(mesh, c, (b, APP_PORT), "node-2")
        w.write(b"plain hello")
        w.write_eof()
        assert await asyncio.wait_for(r.read(), 5) == b"plain hello"
        w.close()

        # STRICT: reset, and the app never sees the connection
        r, w = await plaintext_connect(mesh, c, (b, strict_port), "node-2")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(r.read(), 5)
        w.close()

        # not a local enrolled workload (c is not enrolled; x is on another node): reset
        for target in [(c, APP_PORT), (f"{prefix}40", APP_PORT)]:
            r, w = await plaintext_connect(mesh, c, target, "node-2")
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(r.read(), 5)
            w.close()
        assert servers.accepted == 1

        for _ in range(100):
            if len(records) >= 4:
                break
            await asyncio.sleep(0.01)
        ok = [rec for rec in records if rec.result == "ok"]
        assert len(ok) == 1 and ok[0].security == "none" and ok[0].src.principal == ""
        assert ok[0].bytes_sent == ok[0].bytes_received == len(b"plain hello")
        assert any(rec.response_flags == "DENY" for rec in records)
    finally:
        telemetry.remove_sink(records.append)
        await mesh.stop()
        await servers.close()


async def test_drain_stops_accepting_and_lets_open_streams_finish() -> None:
    world = await make_world()
    try:
        release = asyncio.Event()

        async def slow(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.readexactly(5)
            await release.wait()
            w.write(b"done")
            w.write_eof()

        await world.servers.serve(world.b, APP_PORT, slow)
        r, w = await world.mesh.connect(world.a, (world.b, APP_PORT))
        w.write(b"hello")
        proxy = world.mesh.agents["node-1"].proxy
        for _ in range(200):
            if proxy.active:
                break
            await asyncio.sleep(0.01)
        outbound = proxy.addresses["outbound"][0]
        drain = asyncio.create_task(proxy.drain(5.0))
        await asyncio.sleep(0.2)
        assert not drain.done()  # waiting for the open connection
        with pytest.raises(OSError):  # no longer accepting
            await asyncio.wait_for(asyncio.open_connection(*outbound), 2)
        release.set()
        assert await asyncio.wait_for(r.read(), 5) == b"done"
        w.close()
        await asyncio.wait_for(drain, 5)

    finally:
        await world.mesh.stop()
        await world.servers.close()


async def test_drain_closes_what_is_left_at_the_deadline() -> None:
    world = await make_world()
    try:
        stuck = asyncio.Event()  # never set: the app never answers

        async def never(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await stuck.wait()

        await world.servers.serve(world.b, APP_PORT, never)
        r, w = await world.mesh.connect(world.a, (world.b, APP_PORT))
        w.write(b"anyone?")
        proxy = world.mesh.agents["node-1"].proxy
        for _ in range(200):
            if proxy.outbound.relays:
                break
            await asyncio.sleep(0.01)
        assert proxy.active
        loop = asyncio.get_running_loop()
        started = loop.time()
        await proxy.drain(0.3)
        assert 0.25 < loop.time() - started < 2
        assert proxy.active == 0
        with pytest.raises(ConnectionResetError):  # the client is told: reset, not silence
            await asyncio.wait_for(r.read(), 5)
        w.close()
        stuck.set()
    finally:
        await world.mesh.stop()
        await world.servers.close()
