"""Two agents on loopback, real TLS from an in-memory CA: the L4 data path end to end."""

from __future__ import annotations

import asyncio
import hashlib
import os
import select
import socket
from collections.abc import AsyncIterator, Callable

import pytest

from ztunnel_py.config import HboneConfig
from ztunnel_py.hbone import core
from ztunnel_py.hbone.aio import HboneProtocol
from ztunnel_py.hbone.core import Role
from ztunnel_py.identity.testing import InMemoryCA
from ztunnel_py.identity.tls import client_context
from ztunnel_py.policy.types import Connection, Verdict
from ztunnel_py.proxy.outbound import Authorizer, allow_all
from ztunnel_py.proxy.pool import PoolKey
from ztunnel_py.proxy.testing import LoopbackMesh, loopback_prefix
from ztunnel_py.state.model import Workload
from ztunnel_py.state.snapshot import Snapshot
from ztunnel_py.telemetry import connection as telemetry

APP_PORT = 8080
TCP_CLOSE_WAIT = 8  # tcpi_state (include/net/tcp_states.h)


def pod(name: str, ip: str, node: str, sa: str, enrolled: bool = True) -> Workload:
    return Workload(
        uid=f"default/{name}", name=name, namespace="default", service_account=sa,
        node=node, ips=(ip,), enrolled=enrolled,
    )


class Servers:
    """Plain TCP servers standing in for the pods' applications."""

    def __init__(self) -> None:
        self.servers: list[asyncio.AbstractServer] = []
        self.accepted = 0

    async def serve(
        self, ip: str, port: int,
        handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], object],
    ) -> None:
        async def wrapped(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.accepted += 1
            try:
                await handler(r, w)  # type: ignore[misc]
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                w.close()

        self.servers.append(await asyncio.start_server(wrapped, ip, port))

    async def close(self) -> None:
        for s in self.servers:
            s.close()
            await s.wait_closed()


async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while data := await r.read(1 << 16):
        w.write(data)
        await w.drain()
    w.write_eof()


async def digest_then_reply(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Read to EOF, then answer with the length and SHA-256 of what came in."""
    h = hashlib.sha256()
    n = 0
    while data := await r.read(1 << 18):
        h.update(data)
        n += len(data)
    w.write(f"{n} {h.hexdigest()}\n".encode())
    await w.drain()


class World:
    def __init__(self, mesh: LoopbackMesh, servers: Servers, prefix: str) -> None:
        self.mesh = mesh
        self.servers = servers
        self.prefix = prefix
        self.a = f"{prefix}10"  # client pod, node-1
        self.b = f"{prefix}20"  # server pod, node-2
        self.c = f"{prefix}30"  # outside the mesh, node-2
        self.d = f"{prefix}11"  # server pod, node-1 (same node as a)


async def make_world(
    config: HboneConfig | None = None, authorizer: Authorizer = allow_all,
) -> World:
    prefix = loopback_prefix()
    workloads = [
        pod("a", f"{prefix}10", "node-1", "client"),
        pod("b", f"{prefix}20", "node-2", "server"),
        pod("c", f"{prefix}30", "node-2", "legacy", enrolled=False),
        pod("d", f"{prefix}11", "node-1", "local"),
    ]
    mesh = LoopbackMesh(
        workloads, ["node-1", "node-2"], prefix, config=config or HboneConfig(),
        authorizer=authorizer,
    )
    servers = Servers()
    try:
        await mesh.start()
    except BaseException:
        await mesh.stop()
        raise
    return World(mesh, servers, prefix)


@pytest.fixture
async def world() -> AsyncIterator[World]:
    w = await make_world()
    try:
        yield w
    finally:
        await w.mesh.stop()
        await w.servers.close()


async def test_echo_through_the_tunnel_and_one_pooled_connection(world: World) -> None:
    await world.servers.serve(world.b, APP_PORT, echo)
    records: list[telemetry.ConnectionResult] = []
    telemetry.add_sink(records.append)
    try:
        for i in range(3):
            r, w = await world.mesh.connect(world.a, (world.b, APP_PORT))
            w.write(b"ping %d" % i)
            w.write_eof()
            assert await asyncio.wait_for(r.read(), 5) == b"ping %d" % i
            w.close()
            await w.wait_closed()
        await wait_for(lambda: len(records) >= 6)
    finally:
        telemetry.remove_sink(records.append)
    pool = world.mesh.agents["node-1"].proxy.pool
    assert pool.dials == 1  # three tunnels, one mTLS connection
    outbound = [r for r in records if r.direction == "outbound"]
    inbound = [r for r in records if r.direction == "inbound"]
    assert len(outbound) == 3 and len(inbound) == 3
    assert all(r.security == "mutual_tls" and r.result == "ok" for r in records)
    assert outbound[0].bytes_sent == 6 and outbound[0].bytes_received == 6
    assert inbound[0].src.principal == "spiffe://cluster.local/ns/default/sa/client"
    assert outbound[0].dst.principal == "spiffe://cluster.local/ns/default/sa/server"
    assert outbound[0].hbone_target == f"{world.b}:{APP_PORT}"


async def wait_for(cond: Callable[[], bool], limit_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + limit_s
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_100_mb_arrive_byte_identical(world: World) -> None:
    await world.servers.serve(world.b, APP_PORT, digest_then_reply)
    r, w = await world.mesh.connect(world.a, (world.b, APP_PORT))
    h = hashlib.sha256()
    chunk_src = os.urandom(1 << 20)
    total = 100 * (1 << 20)
    for i in range(100):
        # vary the bytes so that reordering or duplication would show
        chunk = chunk_src[i:] + chunk_src[:i]
        h.update(chunk)
        w.write(chunk)
        await w.drain()
    w.write_eof()
    line = await asyncio.wait_for(r.readline(), 60)
    assert line.decode().split() == [str(total), h.hexdigest()]
    w.close()


async def test_half_close_each_direction(world: World) -> None:
    # client shuts down its write side first, and still receives the full response
    await world.servers.serve(world.b, APP_PORT, digest_then_reply)
    r, w = await world.mesh.connect(world.a, (world.b, APP_PORT))
    w.write(b"x" * 100_000)
    w.write_eof()
    assert (await asyncio.wait_for(r.readline(), 5)).split()[0] == b"100000"
    assert await asyncio.wait_for(r.read(), 5) == b""  # then the server's FIN
    w.close()

    # the server shuts down first; the client can still send and the server still reads
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def greet_then_listen(sr: asyncio.StreamReader, sw: asyncio.StreamWriter) -> None:
        sw.write(b"hello")
        sw.write_eof()
        got.set_result(await sr.read())

    await world.servers.serve(world.b, APP_PORT + 1, greet_then_listen)
    r, w = await world.mesh.connect(world.a, (world.b, APP_PORT + 1))
    assert await asyncio.wait_for(r.read(), 5) == b"hello"  # EOF after the greeting
    w.write(b"still talking")
    w.write_eof()
    assert await asyncio.wait_for(got, 5) == b"still talking"
    w.close()


async def test_a_response_and_the_servers_close_reach_the_client_together(
    world: World,
) -> None:
    # the server sends its response and FIN in one segment; through both agents they
    # stay together (one HBONE write, one TCP segment to the client), so a client that
    # closes on seeing the response has the FIN already: it closes second, and the
    # TIME_WAIT is not its own (each kept one costs its next connects a port search)
    async def respond_and_close(sr: asyncio.StreamReader, sw: asyncio.StreamWriter) -> None:
        await sr.readexactly(4)
        raw = socket.socket(fileno=os.dup(sw.get_extra_info("socket").fileno()))
        raw.send(b"HTTP/1.0 200 OK\r\n\r\nbye", socket.MSG_MORE)
        raw.shutdown(socket.SHUT_WR)
        raw.close()

    await world.servers.serve(world.b, APP_PORT, respond_and_close)
    for _ in range(5):
        sock = await world.mesh.client_socket(world.a, (world.b, APP_PORT))

        def exchange(sock: socket.socket = sock) -> tuple[int, bytes]:
            sock.setblocking(True)
            sock.sendall(b"ping")
            select.select([sock], [], [], 5)
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]  # at once
            sock.settimeout(5)
            got = b""
            while chunk := sock.recv(100):
                got += chunk
            return state, got

        try:
            state, got = await asyncio.get_running_loop().run_in_executor(None, exchange)
        finally:
            sock.close()
        assert got == b"HTTP/1.0 200 OK\r\n\r\nbye"
        assert state == TCP_CLOSE_WAIT  # the FIN was in when the response became readable


async def test_reset_propagates_both_ways(world: World) -> None:
    # server resets -> client sees a reset
    async def rst(sr: asyncio.StreamReader, sw: asyncio.StreamWriter) -> None:
        await sr.readexactly(4)
        sock = sw.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sw.transport.abort()

    await world.servers.serve(world.b, APP_PORT, rst)
    r, w = await world.mesh.connect(world.a, (world.b, APP_PORT))
    w.write(b"boom")
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(r.read(), 5)
    w.close()

    # client resets -> the server's side is reset too
    seen: asyncio.Future[type[BaseException] | None] = (
        asyncio.get_running_loop().create_future()
    )

    async def wait_reset(sr: asyncio.StreamReader, sw: asyncio.StreamWriter) -> None:
        await sr.readexactly(2)
        try:
            await sr.read()
            seen.set_result(None)
        except ConnectionResetError as exc:
            seen.set_result(type(exc))

    await world.servers.serve(world.b, APP_PORT + 2, wait_reset)
    sock = await world.mesh.client_socket(world.a, (world.b, APP_PORT + 2))
    sock.setblocking(True)
    sock.sendall(b"hi")
    await asyncio.sleep(0.2)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
    assert await asyncio.wait_for(seen, 5) is ConnectionResetError


async def test_passthrough_to_a_pod_outside_the_mesh(world: World) -> None:
    await world.servers.serve(world.c, APP_PORT, echo)
    r, w = await world.mesh.connect(world.a, (world.c, APP_PORT))
    w.write(b"plain")
    w.write_eof()
    assert await asyncio.wait_for(r.read(), 5) == b"plain"
    w.close()
    assert world.mesh.agents["node-1"].proxy.pool.dials == 0


async def test_same_node_is_delivered_locally_with_inbound_policy() -> None:
    seen: list[Connection] = []

    def deny_d(conn: Connection, snapshot: Snapshot) -> Verdict:
        seen.append(conn)
        if conn.dst_port == APP_PORT + 1:
            return Verdict.deny("test policy", "default/deny-d")
        return Verdict.allow()

    world = await make_world(authorizer=deny_d)
    try:
        await world.servers.serve(world.d, APP_PORT, echo)
        await world.servers.serve(world.d, APP_PORT + 1, echo)
        r, w = await world.mesh.connect(world.a, (world.d, APP_PORT))
        w.write(b"local")
        w.write_eof()
        assert await asyncio.wait_for(r.read(), 5) == b"local"
        w.close()
        assert world.mesh.agents["node-1"].proxy.pool.dials == 0  # no network hop
        assert seen[0].src_identity == "spiffe://cluster.local/ns/default/sa/client"
        assert seen[0].dst_workload.name == "d"
        r, w = await world.mesh.connect(world.a, (world.d, APP_PORT + 1))
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(r.read(), 5)
        w.close()
        assert world.servers.accepted == 1  # the denied one never reached the app
    finally:
        await world.mesh.stop()
        await world.servers.close()


async def test_policy_denial_over_hbone_is_401_and_never_connects() -> None:
    world = await make_world(authorizer=lambda c, s: Verdict.deny("nope"))
    try:
        await world.servers.serve(world.b, APP_PORT, echo)
        r, w = await world.mesh.connect(world.a, (world.b, APP_PORT))
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(r.read(), 5)
        w.close()
        assert world.servers.accepted == 0
        assert world.mesh.agents["node-2"].proxy.inbound.upstream_attempts == 0
    finally:
        await world.mesh.stop()
        await world.servers.close()


async def test_upstream_refusal_is_503(world: World) -> None:
    # nothing listens on b:9 -> the inbound answers 503 -> the client is reset
    r, w = await world.mesh.connect(world.a, (world.b, 9))
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(r.read(), 5)
    w.close()
    pool = world.mesh.agents["node-1"].proxy.pool
    stream_status = await raw_connect(world, f"{world.b}:9")
    assert stream_status == core.SERVICE_UNAVAILABLE
    assert pool.dials == 1


async def raw_connect(world: World, authority: str, *, as_identity: str | None = None) -> int:
    """Open a CONNECT with our own client (certificate of pod a) and return the status."""
    pool = world.mesh.agents["node-1"].proxy.pool
    key = PoolKey(
        as_identity or "spiffe://cluster.local/ns/default/sa/client",
        "spiffe://cluster.local/ns/default/sa/server", (world.b, 15008),
    )
    try:
        leg = await pool.open_stream(key, authority)
    except Exception as exc:  # TunnelRefused carries the status
        return int(getattr(exc, "status", 0))
    leg.reset()
    return 200


@pytest.mark.parametrize("target", ["not-an-ip:80", "{c}:8080", "{a}:8080", "8.8.8.8:53"])
async def test_connect_to_anything_but_a_local_workload_is_refused(
    world: World, target: str
) -> None:
    authority = target.format(a=world.a, c=world.c)
    status = await raw_connect(world, authority)
    assert status in (400, 401)
    assert world.mesh.agents["node-2"].proxy.inbound.upstream_attempts == 0


async def test_wrong_server_identity_is_refused_by_the_client(world: World) -> None:
    await world.servers.serve(world.b, APP_PORT, echo)
    pool = world.mesh.agents["node-1"].proxy.pool
    key = PoolKey(
        "spiffe://cluster.local/ns/default/sa/client",
        "spiffe://cluster.local/ns/default/sa/someone-else", (world.b, 15008),
    )
    with pytest.raises(Exception, match=r"expected spiffe://cluster\.local/ns/default/sa/someone"):
        await pool.open_stream(key, f"{world.b}:{APP_PORT}")
    assert world.servers.accepted == 0


async def test_client_without_a_mesh_certificate_is_refused(world: World) -> None:
    await world.servers.serve(world.b, APP_PORT, echo)
    rogue_ca = InMemoryCA()
    cert = rogue_ca.issue("spiffe://cluster.local/ns/default/sa/client")
    ctx = client_context(cert)
    loop = asyncio.get_running_loop()
    # the rogue client does not trust the mesh root either; let it skip that check so
    # that it is the *server* that refuses
    ctx.load_verify_locations(cadata=world.mesh.ca.roots_pem.decode())
    proto: HboneProtocol | None = None
    try:
        transport, proto = await loop.create_connection(
            lambda: HboneProtocol(Role.CLIENT, HboneConfig()),
            world.b, 15008, ssl=ctx, server_hostname="",
        )
        fut = proto.open_stream(f"{world.b}:{APP_PORT}")
        with pytest.raises(Exception):  # noqa: B017 - reset, broken, or refused: not a 200
            await asyncio.wait_for(fut, 5)
        transport.abort()
    except (ConnectionError, OSError):
        pass  # refused during the handshake: also correct
    assert world.servers.accepted == 0
    await asyncio.sleep(0.05)
