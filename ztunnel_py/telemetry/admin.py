"""A small admin HTTP/1.1 server for loopback: JSON from routes the caller registers.

Used by the agent (``/config_dump`` on 127.0.0.1:15000) and the controller
(``/config_dump``, ``/agents``). Only GET, no keep-alive, one JSON document per
request. It refuses to bind anything but a loopback address: the admin port can
reveal the whole mesh and must never be reachable from outside the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
from collections.abc import Awaitable, Callable
from typing import Any

from ztunnel_py import log
from ztunnel_py.telemetry.http import reason


def _log() -> Any:
    """Resolved at each use, so that ``log.configure`` (run after imports) applies."""
    return log.get("telemetry.admin")

Handler = Callable[[], Any | Awaitable[Any]]
_MAX_REQUEST = 16 * 1024


class AdminError(Exception):
    """The admin server cannot start (bad or non-loopback address, port in use)."""


class AdminServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            raise AdminError(f"admin address {host!r} is not loopback; the admin port must "
                             "only be reachable from the node itself (use 127.0.0.1)")
        self._host = host
        self._port = port
        self._routes: dict[str, Handler] = {}
        self._server: asyncio.Server | None = None

    def route(self, path: str, handler: Handler) -> None:
        self._routes[path] = handler

    @property
    def port(self) -> int:
        if self._server is None:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self._host, self._port)
        except OSError as exc:
            raise AdminError(f"cannot listen on {self._host}:{self._port} for admin: {exc}; "
                             "is another agent or controller running?") from None
        self.route("/", self._index)

    def _index(self) -> dict[str, list[str]]:
        return {"routes": sorted(self._routes)}

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body = await self._respond(reader)
            payload = json.dumps(body, indent=1, sort_keys=True, default=str).encode() + b"\n"
            writer.write(
                f"HTTP/1.1 {status} {reason(status)}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                "Connection: close\r\n\r\n".encode() + payload
            )
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[int, Any]:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        if len(head) > _MAX_REQUEST:
            return 400, {"error": "request too large"}
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ")
        if len(parts) != 3:
            return 400, {"error": "malformed request line"}
        method, target, _version = parts
        if method != "GET":
            return 405, {"error": f"{method} not allowed; the admin API is read-only"}
        handler = self._routes.get(target.split("?", 1)[0])
        if handler is None:
            return 404, {"error": f"no route {target}", "routes": sorted(self._routes)}
        try:
            result = handler()
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                result = await result
        except Exception as exc:
            _log().exception("admin handler failed", path=target)
            return 500, {"error": str(exc)}
        return 200, result


async def get_json(host: str, port: int, path: str) -> Any:
    """GET a JSON document from an admin server (tests and ``ztunnel-py ctl``); bound it with
    ``asyncio.timeout`` at the call site."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status != 200:
        raise AdminError(f"GET {path}: HTTP {status}: {body.decode(errors='replace')[:200]}")
    return json.loads(body)
