"""Downstream connections: protocol sniffing and the plaintext listener.

Every accepted byte stream (a TCP connection or an HBONE stream) starts with a
``Sniff`` sink that waits for the HTTP/2 connection preface (prior knowledge,
what gRPC sends) or anything else (HTTP/1.1), then hands the stream to an
``H2Server`` or ``H1Server`` bound to the ``WaypointProxy``.

``PlainListener`` accepts plaintext HTTP on a TCP port: tests and benchmarks
use it to exercise the L7 path without TLS; in the mesh the waypoint only
listens for HBONE (``waypoint.mesh``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Sequence
from typing import Any, cast

from waypoint.http1 import ConnInfo, H1Server, Serving
from waypoint.http2 import PREFACE, H2Server
from waypoint.pipe import Pipe, TcpPipe
from waypoint.proxy import WaypointProxy
from waypoint.request import Peer


class Sniff:
    def __init__(self, pipe: Pipe, info: ConnInfo, proxy: Serving) -> None:
        self.pipe = pipe
        self.info = info
        self.proxy = proxy
        self.buf = b""
        self.chosen: H1Server | H2Server | None = None
        self.servers: set[H1Server | H2Server] | None = None
        pipe.set_sink(self)

    def on_data(self, data: bytes) -> None:
        if self.chosen is not None:
            self.chosen.on_data(data)
            return
        self.buf += data
        n = min(len(self.buf), len(PREFACE))
        if self.buf[:n] != PREFACE[:n]:
            self._choose(H1Server(self.pipe, self.info, self.proxy, self.proxy.spawn))
        elif len(self.buf) >= len(PREFACE):
            self._choose(H2Server(self.pipe, self.info, self.proxy, self.proxy.spawn))

    def _choose(self, server: H1Server | H2Server) -> None:
        self.chosen = server
        self.pipe.set_sink(server)  # from now on the pipe feeds the server directly
        buf, self.buf = self.buf, b""
        server.on_data(buf)

    def on_eof(self) -> None:
        if self.chosen is not None:
            self.chosen.on_eof()
        else:
            self.pipe.close()

    def on_lost(self, exc: BaseException | None) -> None:
        if self.chosen is not None:
            self.chosen.on_lost(exc)


class _Accepted(TcpPipe):
    def __init__(self, listener: PlainListener) -> None:
        super().__init__()
        self.listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.listener.pipes.add(self)
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        proxy = self.listener.proxy
        ip = str(peer[0])
        info = ConnInfo(Peer(ip, "", proxy.table.snapshot.by_ip.get(ip)),
                        (str(local[0]), int(local[1])))
        Sniff(self, info, proxy)

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.pipes.discard(self)
        super().connection_lost(exc)


class PlainListener:
    """Plaintext HTTP/1.1 + h2c on ``host:port`` (tests, benchmarks)."""

    def __init__(self, proxy: WaypointProxy, host: str = "127.0.0.1", port: int = 0) -> None:
        self.proxy = proxy
        self.host = host
        self.port = port
        self.server: asyncio.Server | None = None
        self.pipes: set[TcpPipe] = set()

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Accepted(self), self.host, self.port,
                                               backlog=4096)
        # (uvloop's server gives a list where typeshed says tuple: compiled code would check)
        listening: Sequence[socket.socket] = cast(Any, self.server).sockets
        sock = listening[0].getsockname()
        self.port = int(sock[1])
        return str(sock[0]), self.port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for p in list(self.pipes):
            p.abort()
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2.0)
