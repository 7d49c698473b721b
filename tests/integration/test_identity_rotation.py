"""Rotation with a 4-second TTL: replaced before expiry, new contexts work, old TLS lives on."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography import x509

from ztunnel_py.identity import tls
from ztunnel_py.identity.certs import WorkloadCertificate
from ztunnel_py.identity.manager import RefreshPolicy, SecretManager
from ztunnel_py.identity.testing import InMemoryCA, InMemoryCaClient

pytestmark = pytest.mark.slow

TD = "cluster.local"
SERVER = f"spiffe://{TD}/ns/default/sa/server"
CLIENT = f"spiffe://{TD}/ns/default/sa/client"


async def eventually(predicate: Callable[[], object], timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.02)


class ContextCache:
    """What the data path does: one context per certificate serial."""

    def __init__(self, build: Callable[[WorkloadCertificate], ssl.SSLContext]) -> None:
        self._build = build
        self._by_serial: dict[int, ssl.SSLContext] = {}

    def get(self, cert: WorkloadCertificate) -> ssl.SSLContext:
        if cert.serial not in self._by_serial:
            self._by_serial[cert.serial] = self._build(cert)
        return self._by_serial[cert.serial]


class Echo(asyncio.Protocol):
    """The data path's style: an asyncio Protocol, and every transport closed."""

    def __init__(self, server: EchoServer) -> None:
        self.server = server
        self.transport: Any = None  # uvloop's SSL transport is not an asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.server.transports.add(transport)
        self.server.peers.append(tls.peer_identity(transport.get_extra_info("ssl_object"), TD))

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.transports.discard(self.transport)


@dataclass
class EchoServer:
    """A TLS echo server on loopback that picks the current certificate per accepted socket."""

    manager: SecretManager
    contexts: ContextCache = field(default_factory=lambda: ContextCache(tls.server_context))
    peers: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    transports: set[Any] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    sock: socket.socket | None = None

    async def start(self) -> int:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.setblocking(False)
        self._spawn(self._accept_loop(self.sock))
        return int(self.sock.getsockname()[1])

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(sock)
            self._spawn(self._handshake(conn))

    async def _handshake(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            cert = await self.manager.fetch(SERVER)
            await loop.connect_accepted_socket(
                lambda: Echo(self), conn, ssl=self.contexts.get(cert), ssl_handshake_timeout=5
            )
        except (ssl.SSLError, OSError) as exc:
            self.errors.append(exc)
            conn.close()

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for transport in list(self.transports):
            transport.abort()
        if self.sock is not None:
            self.sock.close()


@dataclass
class Client:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def echo(self, payload: bytes) -> bytes:
        self.writer.write(payload)
        await self.writer.drain()
        return await asyncio.wait_for(self.reader.readexactly(len(payload)), 5)

    def server_serial(self) -> int:
        der = self.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return int(x509.load_der_x509_certificate(der).serial_number)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await self.writer.wait_closed()


async def connect(port: int, ctx: ssl.SSLContext) -> Client:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    return Client(reader, writer)


@pytest.fixture
async def setup() -> AsyncIterator[tuple[SecretManager, EchoServer, int, InMemoryCaClient]]:
    ca_client = InMemoryCaClient(InMemoryCA())
    manager = SecretManager(ca_client, policy=RefreshPolicy(ttl_s=4, jitter=0.05))
    server = EchoServer(manager)
    port = await server.start()
    try:
        yield manager, server, port, ca_client
    finally:
        await server.stop()
        await manager.close()


async def test_four_second_certificates_rotate_before_expiry_and_connections_survive(
    setup: tuple[SecretManager, EchoServer, int, InMemoryCaClient],
) -> None:
    manager, server, port, ca_client = setup
    manager.retain([SERVER, CLIENT])
    first_server = await manager.fetch(SERVER)
    first_client = await manager.fetch(CLIENT)
    assert first_server.lifetime <= dt.timedelta(seconds=4 + 1)  # + backdate: a quarter
    client_contexts = ContextCache(tls.client_context)

    long_lived = await connect(port, client_contexts.get(first_client))
    try:
        assert await long_lived.echo(b"before rotation") == b"before rotation"
        assert long_lived.server_serial() == first_server.serial

        # both identities are replaced at about half-life, before they expire
        def rotated() -> bool:
            s, c = manager.current(SERVER), manager.current(CLIENT)
            return bool(s and c and s.serial != first_server.serial
                        and c.serial != first_client.serial)

        await eventually(rotated, timeout_s=6)
        seen_at = dt.datetime.now(dt.UTC)
        assert seen_at < first_server.not_after and seen_at < first_client.not_after
        new_server, new_client = manager.current(SERVER), manager.current(CLIENT)
        assert new_server is not None and new_client is not None
        assert new_server.identity == SERVER and new_client.identity == CLIENT

        # contexts built from the new certificates work: the server presents the new one
        fresh = await connect(port, client_contexts.get(new_client))
        try:
            assert await fresh.echo(b"after rotation") == b"after rotation"
            assert fresh.server_serial() == new_server.serial
        finally:
            await fresh.close()

        # the connection made before rotation keeps working, even past the old expiry
        while dt.datetime.now(dt.UTC) < first_client.not_after + dt.timedelta(seconds=0.3):
            assert await long_lived.echo(b"x" * 1000) == b"x" * 1000
            await asyncio.sleep(0.2)
        assert await long_lived.echo(b"still here") == b"still here"
    finally:
        await long_lived.close()

    # an expired certificate cannot open new connections: rotation was needed
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        stale = await connect(port, tls.client_context(first_client))
        try:
            await stale.echo(b"expired")
        finally:
            await stale.close()
    assert server.peers == [CLIENT, CLIENT]
    assert server.errors, "the server refused the expired client certificate"
    assert ca_client.calls >= 4  # two identities, at least one rotation each
