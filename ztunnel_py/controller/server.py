"""The controller's gRPC shell around the sans-IO ``PushCore``.

``MeshConfigService`` registers ``ztunnel.mesh.v1.MeshConfig/Stream`` on a
``grpc.aio.Server``: it authenticates the stream (metadata ``authorization:
Bearer <token>`` through an ``Authenticator``), reads the hello, then relays
core decisions to the wire. Each update is serialized once and the same bytes
go to every agent that needs them.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

import grpc

from ztunnel_py import log
from ztunnel_py.controller.push import NodeKind, Outgoing, PushCore
from ztunnel_py.proto_gen import mesh_pb2
from ztunnel_py.state.client import ACCEPTED_METADATA
from ztunnel_py.state.codec import CODEC_VERSION
from ztunnel_py.state.snapshot import Snapshot


def _log() -> Any:
    """Resolved at each use, so that ``log.configure`` (run after imports) applies."""
    return log.get("controller.server")

SERVICE_NAME = "ztunnel.mesh.v1.MeshConfig"
_END = b""  # queued by close(): the stream ends (an encoded update is never empty)
_NODE_KINDS: dict[int, NodeKind] = {
    mesh_pb2.NODE_KIND_AGENT: "agent",
    mesh_pb2.NODE_KIND_WAYPOINT: "waypoint",
}


class Authenticator(Protocol):
    """Who is calling: the node name, or raise (an error with ``.code``: a grpc.StatusCode)."""

    def authenticate(self, metadata: Mapping[str, str]) -> str: ...


def _serialize(message: Any) -> bytes:
    return message if isinstance(message, bytes) else bytes(message.SerializeToString())


class MeshConfigService:
    def __init__(self, core: PushCore, authenticator: Authenticator) -> None:
        self._core = core
        self._auth = authenticator
        self._queues: dict[int, asyncio.Queue[bytes]] = {}
        self._ids = itertools.count(1)
        self._wire: OrderedDict[tuple[str, str, str], bytes] = OrderedDict()
        self.bytes_sent = 0
        self.updates_sent = 0

    @property
    def core(self) -> PushCore:
        return self._core

    def add_to(self, server: grpc.aio.Server) -> None:
        handler = grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Stream": grpc.stream_stream_rpc_method_handler(
                self._stream,
                request_deserializer=mesh_pb2.AgentMessage.FromString,
                response_serializer=_serialize,
            ),
        })
        server.add_generic_rpc_handlers((handler,))

    def publish(self, snapshot: Snapshot) -> str | None:
        """Make ``snapshot`` the latest version and send it to idle agents; the new version."""
        sends = self._core.publish(snapshot)
        for stream_id, update in sends:
            self._enqueue(stream_id, update)
        latest = self._core.latest
        return latest.version if latest else None

    def close(self) -> None:
        """End every open stream with OK (the controller is stopping): the handlers return
        on their own, so the server's stop does not have to cancel them mid-send."""
        for queue in self._queues.values():
            queue.put_nowait(_END)

    # -- per stream ----------------------------------------------------------------

    def _encode(self, update: Outgoing) -> bytes:
        cached = self._wire.get(update.cache_key)
        if cached is None:
            msg = mesh_pb2.ControllerMessage(update=mesh_pb2.Update(
                version=update.version,
                base_version=update.base_version,
                codec_version=CODEC_VERSION,
                root_namespace=update.root_namespace,
                upserts=[mesh_pb2.Resource(kind=k, key=key, body=body)
                         for k, key, body in update.upserts],
                removals=[mesh_pb2.ResourceKey(kind=k, key=key) for k, key in update.removals],
            ))
            cached = msg.SerializeToString()
            self._wire[update.cache_key] = cached
            while len(self._wire) > 64:
                self._wire.popitem(last=False)
        return cached

    def _enqueue(self, stream_id: int, update: Outgoing | None) -> None:
        if update is None:
            return
        queue = self._queues.get(stream_id)
        if queue is not None:
            queue.put_nowait(self._encode(update))

    async def _stream(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        metadata = {k.lower(): v for k, v in context.invocation_metadata() or ()
                    if isinstance(v, str)}
        try:
            # off the event loop: an authenticator may read files or call the API server
            caller = await asyncio.to_thread(self._auth.authenticate, metadata)
        except Exception as exc:  # the authenticator's error names the status code
            code = getattr(exc, "code", None)
            if not isinstance(code, grpc.StatusCode):
                code = grpc.StatusCode.UNAUTHENTICATED
            _log().warning("config stream refused", peer=context.peer(), error=str(exc))
            await context.abort(code, str(exc))
            return
        iterator = aiter(requests)
        first = await anext(iterator, None)
        if first is None or not first.HasField("hello"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "the first message on the stream must be a hello")
            return
        hello = first.hello
        if hello.node != caller:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"credential is for node {caller!r}, hello names {hello.node!r}")
            return
        if hello.codec_version != CODEC_VERSION:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"agent speaks codec version {hello.codec_version}, the "
                                f"controller {CODEC_VERSION}; upgrade one of them")
            return
        kind = _NODE_KINDS.get(hello.kind, "agent")
        await context.send_initial_metadata(((ACCEPTED_METADATA, str(CODEC_VERSION)),))
        stream_id = next(self._ids)
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._queues[stream_id] = queue
        reader = asyncio.create_task(self._read(stream_id, iterator), name=f"mesh-read-{caller}")
        get: asyncio.Future[bytes] | None = None
        try:
            _log().info("agent connected", node=caller, kind=kind, peer=context.peer(),
                      last_version=hello.last_version)
            self._enqueue(stream_id, self._core.connect(
                stream_id, caller, kind, hello.last_version, context.peer()))
            while True:
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    break  # the agent went away
                data = get.result()
                get = None
                if data is _END:
                    break
                self.bytes_sent += len(data)
                self.updates_sent += 1
                yield data
        finally:
            pending = [t for t in (reader, get) if t is not None]
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self._queues.pop(stream_id, None)
            self._core.disconnect(stream_id)
            _log().info("agent disconnected", node=caller)

    async def _read(self, stream_id: int, iterator: AsyncIterator[Any]) -> None:
        async for msg in iterator:
            if msg.HasField("ack"):
                self._enqueue(stream_id, self._core.ack(stream_id, msg.ack.version))
            elif msg.HasField("nack"):
                _log().warning("agent refused an update", stream=stream_id,
                             version=msg.nack.version, error=msg.nack.error)
                self._enqueue(stream_id, self._core.nack(stream_id, msg.nack.version,
                                                         msg.nack.error))
