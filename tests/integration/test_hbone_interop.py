"""Interop: drive an agent's inbound :15008 with Node.js's http2 (nghttp2), not ``h2``."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from ztunnel_py.identity.testing import InMemoryCA

from .test_proxy_mesh import APP_PORT, World, echo, make_world

CLIENT = Path(__file__).parent / "interop" / "hbone_client.mjs"


async def run_node(world: World, authority: str, payload: str, ca: InMemoryCA) -> dict[str, str]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("SKIPPED LOUDLY: `node` is not installed; the HBONE interop test needs it")
    cert = ca.issue("spiffe://cluster.local/ns/default/sa/client")
    request = {
        "host": world.b, "port": 15008, "authority": authority,
        "cert": cert.chain_pem.decode(), "key": cert.key_pem.decode(),
        "ca": world.mesh.ca.root_pem.decode(), "payload": payload,
        "forwarded": f"for={world.a}",
    }
    proc = await asyncio.create_subprocess_exec(
        node, str(CLIENT), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(json.dumps(request).encode()), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode()
    result: dict[str, str] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def test_node_http2_client_tunnels_through_inbound() -> None:
    world = await make_world()
    try:
        await world.servers.serve(world.b, APP_PORT, echo)
        payload = "hello from nghttp2 " * 1000
        result = await run_node(world, f"{world.b}:{APP_PORT}", payload, world.mesh.ca)
        assert result.get("error") is None, result
        assert result["status"] == 200
        assert result["alpn"] == "h2"
        assert result["received"] == payload  # both ways, then both half-closes
        assert "spiffe://cluster.local/ns/default/sa/server" in result["peer_san"]
        assert world.servers.accepted == 1

        # and an independent client is held to the same rules: no open proxy
        refused = await run_node(world, f"{world.c}:{APP_PORT}", "x", world.mesh.ca)
        assert refused.get("status") == 400, refused
        assert world.servers.accepted == 1

        # a client certificate from another CA is refused during the handshake (with TLS 1.3
        # the client learns it only when the connection drops: no status, no data)
        rogue = await run_node(world, f"{world.b}:{APP_PORT}", "x", InMemoryCA())
        assert rogue.get("status", 0) != 200 and not rogue.get("received"), rogue
        assert world.servers.accepted == 1
    finally:
        await world.mesh.stop()
        await world.servers.close()
