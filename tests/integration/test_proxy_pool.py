"""The HBONE connection pool, exercised through two loopback agents."""

from __future__ import annotations

import asyncio
import os

import pytest

from ztunnel_py.config import HboneConfig
from ztunnel_py.hbone.aio import StreamLeg
from ztunnel_py.policy.types import Verdict
from ztunnel_py.proxy.pool import PoolError, PoolKey

from .test_proxy_mesh import APP_PORT, World, echo, make_world, wait_for


async def close_world(world: World) -> None:
    await world.mesh.stop()
    await world.servers.close()


async def roundtrip(world: World, payload: bytes) -> bytes:
    r, w = await world.mesh.connect(world.a, (world.b, APP_PORT))
    try:
        w.write(payload)
        w.write_eof()
        return await asyncio.wait_for(r.read(), 30)
    finally:
        w.close()


def never_answer(world: World, monkeypatch: pytest.MonkeyPatch) -> list[StreamLeg]:
    """node-2's agent takes every CONNECT and never answers; the streams, as they come."""
    held: list[StreamLeg] = []

    async def hold(conn: object, leg: StreamLeg, *args: object) -> None:
        held.append(leg)

    monkeypatch.setattr(world.mesh.agents["node-2"].proxy.inbound, "_stream", hold)
    return held


async def test_500_concurrent_streams_share_one_connection() -> None:
    world = await make_world(HboneConfig(max_streams_per_connection=1000))
    try:
        await world.servers.serve(world.b, APP_PORT, echo)
        gate = asyncio.Event()
        held: list[asyncio.StreamWriter] = []

        async def one(i: int) -> bytes:
            r, w = await world.mesh.connect(world.a, (world.b, APP_PORT))
            held.append(w)
            w.write(b"%d;" % i)
            data = await asyncio.wait_for(r.readexactly(len(b"%d;" % i)), 30)
            await gate.wait()  # keep every stream open until all 500 are up
            w.write_eof()
            await asyncio.wait_for(r.read(), 30)
            return data

        tasks = [asyncio.create_task(one(i)) for i in range(500)]
        pool = world.mesh.agents["node-1"].proxy.pool
        await wait_for(
            lambda: sum(c.active_streams for c in pool.connections()) == 500, 60
        )
        assert pool.dials == 1
        assert len(pool.connections()) == 1
        assert pool.connections()[0].active_streams == 500
        gate.set()
        results = await asyncio.gather(*tasks)
        assert results == [b"%d;" % i for i in range(500)]
        for w in held:
            w.close()
        await wait_for(lambda: pool.connections()[0].active_streams == 0)
    finally:
        await close_world(world)


async def test_single_flight_dial_and_second_connection_past_the_stream_limit() -> None:
    world = await make_world(HboneConfig(max_streams_per_connection=3))
    try:
        await world.servers.serve(world.b, APP_PORT, echo)
        pool = world.mesh.agents["node-1"].proxy.pool
        key = PoolKey(
            "spiffe://cluster.local/ns/default/sa/client",
            "spiffe://cluster.local/ns/default/sa/server", (world.b, 15008),
        )
        legs = await asyncio.gather(
            *(pool.open_stream(key, f"{world.b}:{APP_PORT}") for _ in range(3))
        )
        assert pool.dials == 1  # three concurrent opens, one dial
        legs.append(await pool.open_stream(key, f"{world.b}:{APP_PORT}"))
        assert pool.dials == 2  # the fourth does not fit on the first connection
        assert sorted(c.active_streams for c in pool.connections(key)) == [1, 3]
        for leg in legs:
            leg.reset()
    finally:
        await close_world(world)


async def test_idle_connections_are_released_and_redialled() -> None:
    world = await make_world(HboneConfig(idle_timeout_s=0.2))
    try:
        await world.servers.serve(world.b, APP_PORT, echo)
        pool = world.mesh.agents["node-1"].proxy.pool
        assert await roundtrip(world, b"one") == b"one"
        assert len(pool.connections()) == 1
        await wait_for(lambda: not pool.connections(), 5)  # closed after the idle timeout
        assert await roundtrip(world, b"two") == b"two"
        assert pool.dials == 2
    finally:
        await close_world(world)


async def test_a_broken_connection_fails_its_streams_and_the_next_request_redials() -> None:
    world = await make_world()
    try:
        await world.servers.serve(world.b, APP_PORT, echo)
        pool = world.mesh.agents["node-1"].proxy.pool
        r, w = await world.mesh.connect(world.a, (world.b, APP_PORT))
        w.write(b"x")
        assert await asyncio.wait_for(r.readexactly(1), 5) == b"x"
        # the far agent's end of the HBONE connection dies
        server_side = world.mesh.agents["node-2"].proxy.inbound.connections
        assert len(server_side) == 1
        for conn in list(server_side):
            conn.abort()
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            data = await asyncio.wait_for(r.read(), 5)
            assert data == b""  # either FIN or reset is acceptable, but promptly
        except ConnectionResetError:
            pass
        assert loop.time() - started < 2
        w.close()
        await wait_for(lambda: not pool.connections())
        assert await roundtrip(world, b"again") == b"again"
        assert pool.dials == 2
    finally:
        await close_world(world)


async def test_churn_of_short_connections_leaks_no_fds_or_transports() -> None:
    world = await make_world()
    try:
        await world.servers.serve(world.b, APP_PORT, echo)
        await world.servers.serve(world.c, APP_PORT, echo)  # passthrough too
        assert await roundtrip(world, b"warm") == b"warm"
        fds_before = len(os.listdir("/proc/self/fd"))

        async def one(i: int) -> None:
            dst = world.b if i % 2 else world.c
            r, w = await world.mesh.connect(world.a, (dst, APP_PORT))
            w.write(b"hello")
            w.write_eof()
            assert await asyncio.wait_for(r.read(), 30) == b"hello"
            w.close()
            await w.wait_closed()

        for batch in range(20):
            await asyncio.gather(*(one(batch * 100 + i) for i in range(100)))
        proxies = [a.proxy for a in world.mesh.agents.values()]
        await wait_for(lambda: all(p.active == 0 for p in proxies), 10)
        await wait_for(lambda: len(os.listdir("/proc/self/fd")) <= fds_before + 5, 10)
        assert world.mesh.agents["node-1"].proxy.pool.dials == 1
    finally:
        await close_world(world)


async def test_a_connect_without_answer_times_out_and_resets_the_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server takes the CONNECT and never answers: the client gives up after twice the
    connect timeout, says so, and resets the stream instead of leaving it open; a caller
    cancelled while waiting resets its stream too."""
    world = await make_world(HboneConfig(connect_timeout_s=0.2))
    try:
        held = never_answer(world, monkeypatch)
        pool = world.mesh.agents["node-1"].proxy.pool
        key = PoolKey("spiffe://cluster.local/ns/default/sa/client",
                      "spiffe://cluster.local/ns/default/sa/server", (world.b, 15008))
        with pytest.raises(PoolError, match="no answer in time"):
            await pool.open_stream(key, f"{world.b}:{APP_PORT}")
        await wait_for(lambda: len(held) == 1 and held[0].was_reset, 5)
        [conn] = pool.connections()
        assert conn.active_streams == 0

        waiter = asyncio.create_task(pool.open_stream(key, f"{world.b}:{APP_PORT}"))
        await wait_for(lambda: len(held) == 2, 5)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await wait_for(lambda: held[1].was_reset, 5)
        assert conn.active_streams == 0
    finally:
        await close_world(world)


async def test_the_clients_first_bytes_go_with_the_connect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The outbound side does not wait for the 200 to send what the client wrote: its
    bytes reach the server's stream while the CONNECT is still unanswered (they wait
    there for the upstream), and on a CONNECT that gets no answer they go no further:
    the client is reset."""
    world = await make_world(HboneConfig(connect_timeout_s=0.5))
    try:
        held = never_answer(world, monkeypatch)
        r, w = await world.mesh.connect(world.a, (world.b, APP_PORT))
        try:
            w.write(b"hello")
            await wait_for(lambda: len(held) == 1 and held[0].rx_bytes == 5, 5)
            w.write(b", world")  # written after the CONNECT went out: it follows it
            await wait_for(lambda: held[0].rx_bytes == 12, 5)
            assert b"".join(held[0]._early) == b"hello, world"  # kept for the upstream
            assert held[0].peer is None  # and nothing was relayed anywhere
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(r.readexactly(1), 5)  # no answer in 1 s: reset
        finally:
            w.close()
    finally:
        await close_world(world)


async def test_a_refused_connect_gives_its_first_bytes_window_back() -> None:
    """The first bytes that went with a CONNECT the far agent refuses (401 here) are
    never written anywhere; the connection's receive window still gets them back, or
    each refusal would shrink it for every other stream on the connection."""
    world = await make_world(HboneConfig())
    try:
        await world.servers.serve(world.b, APP_PORT, echo)
        inbound = world.mesh.agents["node-2"].proxy.inbound
        inbound.authorizer = lambda conn, snapshot: Verdict.deny("test")
        r, w = await world.mesh.connect(world.a, (world.b, APP_PORT))
        w.write(b"x" * 1000)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(r.readexactly(1), 5)
        w.close()
        [conn] = inbound.connections
        window = conn.core._h2._inbound_flow_control_window_manager
        # received, not yet credited back: none (the refused stream's 1000 bytes were)
        await wait_for(lambda: window.max_window_size == window.current_window_size
                       + window._bytes_processed, 5)
        assert window._bytes_processed >= 1000
    finally:
        await close_world(world)
