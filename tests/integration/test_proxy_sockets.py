"""The socket seams: listeners hand out TCP_NODELAY sockets, upstream sockets get it with
their transport; upstream connects fail with ``UpstreamError`` (refused, timed out) and
never leak the socket."""

from __future__ import annotations

import asyncio
import socket

import pytest

from ztunnel_py.proxy.sockets import (
    UpstreamError,
    connect,
    plain_listener,
    plain_upstream,
    sockname_original_dst,
    transport_addresses,
)
from ztunnel_py.proxy.testing import DstTable


def test_plain_listener_sockets_carry_nodelay_to_accepted_connections() -> None:
    listener = plain_listener("127.0.0.1", 0)
    client = socket.create_connection(listener.getsockname()[:2])
    try:
        listener.setblocking(True)
        accepted, _ = listener.accept()
        with accepted:
            assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        client.close()
        listener.close()


class Tracking:
    """An upstream factory that remembers its sockets."""

    def __init__(self) -> None:
        self.made: list[socket.socket] = []

    def __call__(self, family: int) -> socket.socket:
        sock = plain_upstream(family)
        self.made.append(sock)
        return sock


async def test_connect_succeeds_and_refusal_is_an_upstream_error() -> None:
    listener = plain_listener("127.0.0.1", 0)
    address = listener.getsockname()[:2]
    factory = Tracking()
    try:
        sock = await connect(factory, address, 2.0)
        assert sock.getpeername()[:2] == address
        # relayed bytes never wait for Nagle: the transport sets TCP_NODELAY
        transport, _ = await asyncio.get_running_loop().create_connection(
            asyncio.Protocol, sock=sock)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        transport.close()
    finally:
        listener.close()
    with pytest.raises(UpstreamError, match="failed"):
        await connect(factory, address, 2.0)  # nobody listens there any more
    assert factory.made[-1].fileno() == -1


async def full_listener() -> tuple[socket.socket, tuple[str, int], list[socket.socket]]:
    """A listener that never accepts, with its queue full (further SYNs are dropped), and
    the connecting sockets that fill it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()[:2]
    fillers: list[socket.socket] = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(address)
        fillers.append(s)
    await asyncio.sleep(0.05)
    return listener, address, fillers


async def test_connect_timeout_is_an_upstream_error_and_closes_the_socket() -> None:
    listener, address, fillers = await full_listener()
    factory = Tracking()
    try:
        with pytest.raises(UpstreamError, match=r"timed out after 0\.3s"):
            await connect(factory, address, 0.3)
        assert factory.made[-1].fileno() == -1
        # cancellation (agent shutdown) is not turned into an UpstreamError, and closes too
        task = asyncio.get_running_loop().create_task(connect(factory, address, 30.0))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert factory.made[-1].fileno() == -1
    finally:
        for s in fillers:
            s.close()
        listener.close()


async def test_connect_to_a_name_goes_through_the_loop_resolver() -> None:
    # the data path dials IP literals (by hand); anything else still works, via sock_connect
    listener = plain_listener("127.0.0.1", 0)
    port = listener.getsockname()[1]
    try:
        sock = await connect(Tracking(), ("localhost", port), 2.0)
        assert sock.getpeername()[:2] == ("127.0.0.1", port)
        sock.close()
    finally:
        listener.close()


async def test_connect_waits_when_the_handshake_is_not_done_at_once() -> None:
    # a local upstream usually completes inside connect(); a full accept queue makes the
    # SYN go unanswered until there is room again: the connect waits and then succeeds
    listener, address, fillers = await full_listener()
    factory = Tracking()
    try:
        task = asyncio.get_running_loop().create_task(connect(factory, address, 10.0))
        await asyncio.sleep(0.2)
        assert not task.done()  # waiting for the handshake
        for s in fillers:  # make room: the retransmitted SYN gets through
            s.close()
        listener.setblocking(False)
        deadline = asyncio.get_running_loop().time() + 8.0
        while not task.done() and asyncio.get_running_loop().time() < deadline:
            try:
                listener.accept()[0].close()
            except BlockingIOError:
                await asyncio.sleep(0.05)
        sock = await asyncio.wait_for(task, 1.0)
        assert sock.getpeername()[:2] == address
        sock.close()
    finally:
        for s in fillers:
            s.close()
        listener.close()


async def test_original_dst_seams_get_the_transports_addresses() -> None:
    """A seam answers from the accepted transport's (local, peer) record."""
    loop = asyncio.get_running_loop()
    made: asyncio.Future[asyncio.BaseTransport] = loop.create_future()

    class Accepted(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            made.set_result(transport)

    listener = plain_listener("127.0.0.1", 0)
    server = await loop.create_server(Accepted, sock=listener)
    address = listener.getsockname()[:2]
    try:
        client, _ = await loop.create_connection(asyncio.Protocol, *address)
        transport = await made
        local, peer = transport_addresses(transport)
        assert local == address and peer == client.get_extra_info("sockname")[:2]
        assert sockname_original_dst(local, peer) == address  # production: the local one
        table = DstTable()  # the tests': by client address, or by listener port
        assert table(local, peer) == address
        table.by_peer[peer] = ("10.0.0.2", 81)
        assert table(local, peer) == ("10.0.0.2", 81)
        assert table(local, peer) == address  # (used once)
        table.by_listen_port[address[1]] = ("10.0.0.3", 82)
        assert table(local, peer) == ("10.0.0.3", 82)
        client.close()
        transport.close()
    finally:
        server.close()


def test_a_connection_gone_before_its_addresses_were_read_is_an_oserror() -> None:
    # asyncio records None when getpeername failed at the accept (the client reset first)
    class Gone(asyncio.BaseTransport):
        def get_extra_info(self, name: str, default: object = None) -> object:
            return None

    with pytest.raises(OSError, match="gone"):
        transport_addresses(Gone())
