"""Small servers and clients the waypoint's network-namespace tests run in pods.

``http``: HTTP/1.1 backends that misbehave on purpose, several ports per process,
each port with its own behaviour, on an asyncio Protocol (no streams)::

    python -m tests.netns.waypoint_tools http --pod web-v1 --version v1 \\
        --serve 8081:fail-every=2:fail-status=503 --serve 8082:status=500 \\
        --serve 8083:delay=0.3

Requests are parsed and answered as the demo's service does
(:mod:`ztunnel_py.demo.httpservice`: ``x-served-by: <pod>/<version>``), and
each one is logged as a JSON line on stdout (port, method, path, Host, status)
so that a test can count what an endpoint received from its log.

``grpc-server`` / ``grpc-client``: the ``demo.Echo`` service of the loopback
gRPC tests (:mod:`tests.integration.test_waypoint_grpc`), served on a pod's
port, and a client making a unary call, a server-streaming call and a call the
server fails with INVALID_ARGUMENT; the client prints what it got as JSON.

Nothing heavy is imported at the top: each command imports what it needs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from ztunnel_py.demo import httpservice

# -- misbehaving HTTP backends ------------------------------------------------------------


@dataclass(frozen=True)
class Behaviour:
    """How one port answers: every ``fail_every``-th request (1st, 3rd, ... for 2) gets
    ``fail_status``; the others get ``status``; each answer waits ``delay`` s first."""

    port: int
    status: int = 200
    fail_every: int = 0
    fail_status: int = 503
    delay: float = 0.0

    @staticmethod
    def parse(spec: str) -> Behaviour:
        """``PORT[:status=N][:fail-every=N][:fail-status=N][:delay=SECONDS]``."""
        port, *opts = spec.split(":")
        kw: dict[str, float] = {}
        for opt in opts:
            key, sep, value = opt.partition("=")
            field_name = key.replace("-", "_")
            if not sep or field_name not in ("status", "fail_every", "fail_status", "delay"):
                raise argparse.ArgumentTypeError(f"bad option {opt!r} in {spec!r}")
            kw[field_name] = float(value)
        return Behaviour(int(port), status=int(kw.get("status", 200)),
                         fail_every=int(kw.get("fail_every", 0)),
                         fail_status=int(kw.get("fail_status", 503)),
                         delay=kw.get("delay", 0.0))

    def status_of(self, n: int) -> int:
        """The status of the ``n``-th request (from 1) on this port. Pure."""
        if self.fail_every and (n - 1) % self.fail_every == 0:
            return self.fail_status
        return self.status


class Port:
    """One listening port: its behaviour and the count of requests it answered."""

    def __init__(self, behaviour: Behaviour, pod: str, version: str) -> None:
        self.behaviour = behaviour
        self.pod = pod
        self.version = version
        self.requests = 0

    def answer(self, req: httpservice.Request) -> tuple[int, bytes]:
        self.requests += 1
        status = self.behaviour.status_of(self.requests)
        print(json.dumps({"port": self.behaviour.port, "n": self.requests,
                          "method": req.method, "path": req.target,
                          "host": req.header("host") or "", "status": status,
                          "t": round(time.monotonic(), 6)}), flush=True)
        body = f"{status} from {self.pod} port {self.behaviour.port}\n".encode()
        return status, body


class BackendProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive, one request at a time per connection (a delayed answer holds
    back the next pipelined request, so answers stay in order)."""

    def __init__(self, port: Port) -> None:
        self.port = port
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.waiting: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's aren't subclasses

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._serve()

    def _serve(self) -> None:
        while self.transport is not None and self.waiting is None:
            try:
                req = httpservice.take_request(self.buf)
            except httpservice.BadRequest:
                self.transport.close()
                return
            if req is None:
                return
            status, out = self.port.answer(req)
            wire = httpservice.render(status, "text/plain", out, self.port.pod,
                                      self.port.version, req.keep_alive)
            delay = self.port.behaviour.delay
            if delay:
                self.waiting = asyncio.get_running_loop().call_later(
                    delay, self._write, wire, req.keep_alive)
                return
            self._write(wire, req.keep_alive)

    def _write(self, wire: bytes, keep: bool) -> None:
        self.waiting = None
        if self.transport is None:
            return
        self.transport.write(wire)
        if not keep:
            self.transport.close()
            return
        self._serve()

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiting is not None:
            self.waiting.cancel()
            self.waiting = None


async def _until_signalled() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve_http(pod: str, version: str, behaviours: Sequence[Behaviour]) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for b in behaviours:
        port = Port(b, pod, version)
        servers.append(await loop.create_server(
            lambda port=port: BackendProtocol(port), "0.0.0.0", b.port))  # type: ignore[misc]
    print(json.dumps({"listening": [b.port for b in behaviours], "pod": pod}), flush=True)
    try:
        await _until_signalled()
    finally:
        for s in servers:
            s.close()
            await s.wait_closed()


def tool(*args: str) -> list[str]:
    """The argv that runs this module's command ``args`` (in a pod, via ``Topology``)."""
    return [sys.executable, "-m", "tests.netns.waypoint_tools", *args]


def http_command(pod: str, version: str, *specs: str) -> list[str]:
    """The argv that runs ``http`` in a pod (``specs`` as for ``--serve``)."""
    return tool("http", "--pod", pod, "--version", version,
                *(a for s in specs for a in ("--serve", s)))


# -- gRPC -----------------------------------------------------------------------------------


async def serve_grpc(port: int) -> None:
    from tests.integration.test_waypoint_grpc import Echo, _grpc_backend

    server, bound = await _grpc_backend(Echo(), f"0.0.0.0:{port}")
    print(json.dumps({"listening": [bound], "service": "demo.Echo"}), flush=True)
    try:
        await _until_signalled()
    finally:
        await server.stop(None)


async def grpc_calls(target: str) -> dict[str, object]:
    """A unary call, a server-streaming call and a call that fails; what each returned."""
    import grpc
    import grpc.aio

    from tests.integration.test_waypoint_grpc import SERVICE, _ident

    out: dict[str, object] = {}
    async with grpc.aio.insecure_channel(target) as ch:
        unary = ch.unary_unary(f"/{SERVICE}/Unary", _ident, _ident)
        stream = ch.unary_stream(f"/{SERVICE}/Stream", _ident, _ident)
        out["unary"] = (await asyncio.wait_for(unary(b"hi"), 10)).decode()
        out["stream"] = [m.decode() async for m in stream(b"4")]
        try:
            await asyncio.wait_for(unary(b"fail"), 10)
            out["fail"] = "no error"
        except grpc.aio.AioRpcError as exc:
            out["fail"] = [exc.code().name, exc.details()]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="waypoint_tools", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("http", help="misbehaving HTTP/1.1 backends")
    h.add_argument("--pod", required=True)
    h.add_argument("--version", default="v1")
    h.add_argument("--serve", type=Behaviour.parse, action="append", required=True,
                   metavar="PORT[:status=N][:fail-every=N][:fail-status=N][:delay=S]")
    sub.add_parser("grpc-server").add_argument("port", type=int)
    sub.add_parser("grpc-client").add_argument("target", help="host:port")
    args = p.parse_args(argv)
    runner = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    if args.cmd == "http":
        runner(serve_http(args.pod, args.version, args.serve))
    elif args.cmd == "grpc-server":
        runner(serve_grpc(args.port))
    else:
        print(json.dumps(runner(grpc_calls(args.target))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
