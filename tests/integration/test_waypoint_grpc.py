"""gRPC (HTTP/2, trailers) and WebSocket (HTTP/1.1 Upgrade) through the waypoint."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import h11
import pytest

from tests.integration.test_waypoint_http import Client, Mesh, service

SERVICE = "demo.Echo"


def _ident(b: bytes) -> bytes:
    return b


class Echo:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []  # (method, :authority)
        self.gate: asyncio.Event | None = None  # Stream waits on it after the first item

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        meta = dict(context.invocation_metadata() or ())
        self.calls.append(("Unary", str(meta.get(":authority", ""))))
        if request == b"fail":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "asked to fail")
        return b"echo:" + request

    async def stream(self, request: bytes,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        self.calls.append(("Stream", ""))
        for i in range(int(request.decode() or "3")):
            yield f"item-{i}".encode()
            if i == 0 and self.gate is not None:
                await asyncio.wait_for(self.gate.wait(), 10)


    async def collect(self, requests: AsyncIterator[bytes],
                      context: grpc.aio.ServicerContext) -> bytes:
        self.calls.append(("Collect", ""))
        return b"+".join([m async for m in requests])

    async def chat(self, requests: AsyncIterator[bytes],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        self.calls.append(("Chat", ""))
        async for m in requests:
            yield m.upper()


async def _grpc_backend(echo: Echo, address: str = "127.0.0.1:0") -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(echo.unary, _ident, _ident),
        "Stream": grpc.unary_stream_rpc_method_handler(echo.stream, _ident, _ident),
        "Collect": grpc.stream_unary_rpc_method_handler(echo.collect, _ident, _ident),
        "Chat": grpc.stream_stream_rpc_method_handler(echo.chat, _ident, _ident),
    })
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(address)
    await server.start()
    return server, port


@pytest.fixture
async def grpc_mesh() -> AsyncIterator[tuple[Mesh, Echo]]:
    m = Mesh()
    echo = Echo()
    server, port = await _grpc_backend(echo)
    m.external("echo-v1", {"app": "echo", "version": "v1"}, port)
    m.objects.append(service("echo", "10.96.0.20", port=50051))
    try:
        await m.start()
        yield m, echo
    finally:
        await m.stop()
        await server.stop(None)


async def test_grpc_unary_and_streaming_through_the_waypoint(
        grpc_mesh: tuple[Mesh, Echo]) -> None:
    mesh, echo = grpc_mesh
    target = f"{mesh.address[0]}:{mesh.address[1]}"
    async with grpc.aio.insecure_channel(
            target, options=[("grpc.default_authority", "echo:50051")]) as ch:
        unary = ch.unary_unary(f"/{SERVICE}/Unary", _ident, _ident)
        stream = ch.unary_stream(f"/{SERVICE}/Stream", _ident, _ident)
        assert await asyncio.wait_for(unary(b"hi"), 10) == b"echo:hi"
        items = [m async for m in stream(b"4")]
        assert items == [b"item-0", b"item-1", b"item-2", b"item-3"]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(unary(b"fail"), 10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "asked to fail"
    assert [c[0] for c in echo.calls] == ["Unary", "Stream", "Unary"]
    svc = "echo.bookinfo.svc.cluster.local"
    m = mesh.metrics
    assert m.count(request_protocol="grpc", grpc_response_status="0",
                   destination_service=svc) == 2
    assert m.count(request_protocol="grpc", grpc_response_status="3") == 1
    assert b'grpc_response_status="3"' in m.render()


async def test_grpc_server_stream_is_relayed_as_it_comes(
        grpc_mesh: tuple[Mesh, Echo]) -> None:
    """The backend sends item-1 only after the client has seen item-0: a waypoint that
    buffered the response would deadlock here."""
    mesh, echo = grpc_mesh
    echo.gate = asyncio.Event()
    target = f"{mesh.address[0]}:{mesh.address[1]}"
    got: list[bytes] = []
    async with grpc.aio.insecure_channel(
            target, options=[("grpc.default_authority", "echo:50051")]) as ch:
        stream = ch.unary_stream(f"/{SERVICE}/Stream", _ident, _ident)

        async def consume() -> None:
            async for m in stream(b"3"):
                got.append(m)
                echo.gate.set()  # type: ignore[union-attr]

        await asyncio.wait_for(consume(), 15)
    assert got == [b"item-0", b"item-1", b"item-2"]
    assert mesh.metrics.count(request_protocol="grpc", grpc_response_status="0") == 1
    assert b"istio_response_bytes_sum" in mesh.metrics.render()


async def test_grpc_client_streaming_and_bidirectional_ping_pong(
        grpc_mesh: tuple[Mesh, Echo]) -> None:
    """Each chat reply is read before the next message is written: the request side is
    relayed as it comes, not when the client has finished sending."""
    mesh, echo = grpc_mesh
    target = f"{mesh.address[0]}:{mesh.address[1]}"
    async with grpc.aio.insecure_channel(
            target, options=[("grpc.default_authority", "echo:50051")]) as ch:
        collect = ch.stream_unary(f"/{SERVICE}/Collect", _ident, _ident)

        async def three() -> AsyncIterator[bytes]:
            for m in (b"a", b"b", b"c"):
                yield m

        assert await asyncio.wait_for(collect(three()), 10) == b"a+b+c"
        call = ch.stream_stream(f"/{SERVICE}/Chat", _ident, _ident)()
        for word in (b"ping", b"pong", b"again"):
            await asyncio.wait_for(call.write(word), 5)
            assert await asyncio.wait_for(call.read(), 5) == word.upper()
        await call.done_writing()
        assert await asyncio.wait_for(call.code(), 5) == grpc.StatusCode.OK
    assert [c[0] for c in echo.calls] == ["Collect", "Chat"]
    assert mesh.metrics.count(request_protocol="grpc", grpc_response_status="0") == 2


async def test_grpc_fault_abort_and_retry_on_unavailable(grpc_mesh: tuple[Mesh, Echo]) -> None:
    mesh, echo = grpc_mesh
    mesh.apply("""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: bookinfo}
spec:
  hosts: [echo]
  http:
  - match: [{headers: {x-fail: {exact: "yes"}}}]
    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
    route: [{destination: {host: echo}}]
  - route: [{destination: {host: echo}}]
""")
    target = f"{mesh.address[0]}:{mesh.address[1]}"
    async with grpc.aio.insecure_channel(
            target, options=[("grpc.default_authority", "echo:50051")]) as ch:
        unary = ch.unary_unary(f"/{SERVICE}/Unary", _ident, _ident)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(unary(b"x", metadata=(("x-fail", "yes"),)), 10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await asyncio.wait_for(unary(b"ok"), 10) == b"echo:ok"
    assert [c[0] for c in echo.calls] == ["Unary"]
    assert mesh.metrics.count(grpc_response_status="14", response_flags="FI") == 1


async def test_http1_client_to_a_grpc_port_is_sent_upstream_as_http2() -> None:
    """Istio's protocol selection: the port name says grpc, so the upstream gets HTTP/2
    even though the client spoke HTTP/1.1."""
    m = Mesh()
    echo = Echo()
    server, port = await _grpc_backend(echo)
    m.external("echo-v1", {"app": "echo", "version": "v1"}, port)
    m.objects.append(service("echo", "10.96.0.20", port=50051, port_name="grpc"))
    try:
        await m.start()
        c = Client(m.address)
        try:
            framed = b"\x00" + len(b"hi").to_bytes(4, "big") + b"hi"
            r = await c.request("/demo.Echo/Unary", method="POST", host="echo:50051",
                                headers={"content-type": "application/grpc"}, body=framed)
        finally:
            await c.close()
    finally:
        await m.stop()
        await server.stop(None)
    assert r.status == 200 and r.body.endswith(b"echo:hi")
    assert [c[0] for c in echo.calls] == ["Unary"]


# -- WebSocket ------------------------------------------------------------------------------

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class EchoRaw(asyncio.Protocol):
    """Answers an Upgrade with 101, then echoes raw bytes back upper-cased."""

    def __init__(self) -> None:
        self.conn = h11.Connection(h11.SERVER)
        self.transport: asyncio.Transport | None = None
        self.raw = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.raw:
            self.transport.write(data.upper())
            return
        self.conn.receive_data(data)
        ev = self.conn.next_event()
        while ev is not h11.NEED_DATA and ev is not h11.PAUSED:
            if isinstance(ev, h11.Request):
                key = dict(ev.headers)[b"sec-websocket-key"]
                accept = base64.b64encode(
                    hashlib.sha1(key + WS_GUID.encode()).digest()).decode()
                self.transport.write(self.conn.send(h11.InformationalResponse(
                    status_code=101, headers=[("upgrade", "websocket"),
                                              ("connection", "Upgrade"),
                                              ("sec-websocket-accept", accept)])))
            ev = self.conn.next_event()
        if self.conn.our_state is h11.SWITCHED_PROTOCOL:
            self.raw = True
            trailing, _ = self.conn.trailing_data
            if trailing:
                self.transport.write(bytes(trailing).upper())


async def test_websocket_upgrade_passthrough() -> None:
    mesh = Mesh()
    loop = asyncio.get_running_loop()
    raw_server = await loop.create_server(EchoRaw, "127.0.0.1", 0)
    try:
        mesh.external("ws-v1", {"app": "ws"}, raw_server.sockets[0].getsockname()[1])
        mesh.objects.append(service("ws", "10.96.0.30", port=80))
        await mesh.start()
        reader, writer = await asyncio.open_connection(*mesh.address)
        try:
            writer.write(b"GET /chat HTTP/1.1\r\nHost: ws\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                         b"Sec-WebSocket-Version: 13\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 101")
            assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
            writer.write(b"hello frames")
            assert await asyncio.wait_for(reader.readexactly(12), 5) == b"HELLO FRAMES"
            writer.write(b"again")
            assert await asyncio.wait_for(reader.readexactly(5), 5) == b"AGAIN"
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        assert mesh.metrics.count(response_code="101") == 1
    finally:
        await mesh.stop()
        raw_server.close()
        await raw_server.wait_closed()
