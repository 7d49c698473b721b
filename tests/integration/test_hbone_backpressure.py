"""Backpressure: a receiver that stops reading must not make the agents buffer without bound."""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource

from ztunnel_py.config import HboneConfig
from ztunnel_py.hbone.aio import StreamLeg
from ztunnel_py.proxy.relay import TcpLeg

from .test_proxy_mesh import APP_PORT, World, make_world

WINDOW = 4 << 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def buffered_in_agents(world: World) -> int:
    """Bytes the agents hold: transport write buffers, pending tunnel data, early data."""
    total = 0
    for agent in world.mesh.agents.values():
        proxy = agent.proxy
        conns = [*proxy.pool.connections(), *proxy.inbound.connections]
        for conn in conns:
            if conn.transport is not None:
                total += conn.transport.get_write_buffer_size()
            for leg in conn.streams.values():
                total += conn.core.pending(leg.stream_id)
                total += sum(len(b) for b in leg._early)
        for relay in [*proxy.outbound.relays, *proxy.inbound.relays]:
            for leg in (relay.downstream, relay.upstream):
                if isinstance(leg, TcpLeg) and leg.transport is not None:
                    total += leg.transport.get_write_buffer_size()
                elif isinstance(leg, StreamLeg):
                    total += leg._held_ack  # received but not yet credited: in flight
    return total


async def test_stalled_receiver_bounds_agent_memory() -> None:
    world = await make_world(HboneConfig(stream_window=WINDOW, connection_window=4 * WINDOW))
    try:
        reading = asyncio.Event()
        digest: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

        async def slow_reader(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await reading.wait()  # not reading at all: the kernel buffer fills, then ours
            h = hashlib.sha256()
            n = 0
            while data := await r.read(1 << 18):
                h.update(data)
                n += len(data)
            digest.set_result((n, h.hexdigest()))

        await world.servers.serve(world.b, APP_PORT, slow_reader)
        r, w = await world.mesh.connect(world.a, (world.b, APP_PORT))
        chunk = os.urandom(1 << 20)
        sent = 0
        h = hashlib.sha256()

        async def push_until(stop: asyncio.Event) -> None:
            nonlocal sent
            while not stop.is_set():
                w.write(chunk)
                h.update(chunk)
                sent += len(chunk)
                await w.drain()

        # the tunnel is up (one byte made it through): baseline, then push at full speed
        w.write(b"!")
        h.update(b"!")
        sent = 1
        await asyncio.sleep(0.2)
        rss_base = rss_bytes()
        sent_base = sent
        warm = asyncio.Event()
        pusher = asyncio.create_task(push_until(warm))
        peak_buffered = 0
        peak_rss = rss_base
        for _ in range(50):  # 5 s of a stalled receiver, sender at full speed
            await asyncio.sleep(0.1)
            peak_buffered = max(peak_buffered, buffered_in_agents(world))
            peak_rss = max(peak_rss, rss_bytes())
        stalled_progress = sent - sent_base
        warm.set()
        pusher.cancel()  # it is blocked in drain(); what it wrote stays buffered
        await asyncio.gather(pusher, return_exceptions=True)

        print(f"peak buffered {peak_buffered}, rss growth {peak_rss - rss_base}, "
              f"sender progress while stalled {stalled_progress}")
        # bounded: one stream window plus the transports' high-water marks, not 5 s of data
        assert peak_buffered <= WINDOW + 4 * (1 << 20), peak_buffered
        assert peak_rss - rss_base < 4 * WINDOW, (peak_rss - rss_base)
        # the sender was held back: the kernel's socket buffers plus our windows, not the
        # gigabytes that 5 s of loopback would carry
        assert stalled_progress < 64 << 20, stalled_progress

        # and nothing was lost: resume reading, finish, compare
        reading.set()
        await w.drain()
        w.write_eof()
        n, hexdigest = await asyncio.wait_for(digest, 30)
        assert (n, hexdigest) == (sent, h.hexdigest())
        w.close()
        await asyncio.wait_for(r.read(), 5)
    finally:
        await world.mesh.stop()
        await world.servers.close()
