"""The demo's HTTP service, like Istio's helloworld sample.

Every response names the pod and version that served it, in the
``x-served-by`` header (``<pod>/<version>``, also split into ``x-pod`` and
``x-version``) and in the body::

    Hello version: v1, instance: helloworld-v1

``GET /headers`` answers with the request's headers as JSON (to see what a
proxy added); ``GET /status/<code>`` answers with that status. HTTP/1.1 with
keep-alive, on an asyncio Protocol (no streams), uvloop when available.

    python -m ztunnel_py.demo.httpservice --pod helloworld-v1 --version v1 --port 8080
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from ztunnel_py.telemetry.http import reason

MAX_HEAD = 64 * 1024
MAX_BODY = 1024 * 1024


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def keep_alive(self) -> bool:
        conn = (self.header("connection") or "").lower()
        if self.version == "HTTP/1.0":
            return conn == "keep-alive"
        return conn != "close"


class BadRequest(ValueError):
    pass


class TooLarge(BadRequest):
    """A request head or body over MAX_HEAD / MAX_BODY."""


def parse_head(head: bytes) -> tuple[str, str, str, tuple[tuple[str, str], ...]]:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes anything
        raise BadRequest(str(exc)) from exc
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"bad request line {lines[0]!r}")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise BadRequest(f"bad header line {line!r}")
        headers.append((name.strip().lower(), value.strip()))
    return parts[0], parts[1], parts[2], tuple(headers)


def take_request(buf: bytearray) -> Request | None:
    """The first complete request in ``buf`` (removed from it), None until there is one.

    :class:`BadRequest` for a malformed one, :class:`TooLarge` for an oversized one.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise TooLarge("request head too large")
        return None
    method, target, version, headers = parse_head(bytes(buf[:end]))
    length = dict(headers).get("content-length", "0")
    if not length.isdigit():
        raise BadRequest(f"bad content-length {length!r}")
    if int(length) > MAX_BODY:
        raise TooLarge(f"content-length {length} over {MAX_BODY}")
    if "chunked" in dict(headers).get("transfer-encoding", ""):
        raise BadRequest("chunked request bodies are not supported")
    if len(buf) < end + 4 + int(length):
        return None
    body = bytes(buf[end + 4 : end + 4 + int(length)])
    del buf[: end + 4 + int(length)]
    return Request(method, target, version, headers, body)


def respond(req: Request, pod: str, version: str) -> tuple[int, str, bytes]:
    """The response to ``req``: (status, content type, body). Pure."""
    path = req.target.split("?", 1)[0]
    if path == "/headers":
        body = json.dumps({k: v for k, v in req.headers}, indent=1, sort_keys=True) + "\n"
        return 200, "application/json", body.encode()
    if path.startswith("/status/"):
        code = path.removeprefix("/status/")
        if code.isdigit() and 200 <= int(code) <= 599:
            return int(code), "text/plain", f"status {code} from {pod}\n".encode()
        return 400, "text/plain", b"bad status code\n"
    return 200, "text/plain", f"Hello version: {version}, instance: {pod}\n".encode()


def response(status: int, ctype: str, body: bytes, headers: Sequence[tuple[str, str]],
             keep: bool) -> bytes:
    """An HTTP/1.1 response: status line, content type and length, ``headers``, and
    ``connection`` (keep-alive or close), then ``body``."""
    head = [
        f"HTTP/1.1 {status} {reason(status)}",
        f"content-type: {ctype}",
        f"content-length: {len(body)}",
        *(f"{k}: {v}" for k, v in headers),
        f"connection: {'keep-alive' if keep else 'close'}",
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def render(status: int, ctype: str, body: bytes, pod: str, version: str, keep: bool) -> bytes:
    """This service's response: who served it in ``x-served-by``, ``x-pod``, ``x-version``."""
    return response(status, ctype, body, (("x-served-by", f"{pod}/{version}"), ("x-pod", pod),
                                          ("x-version", version)), keep)


class HttpProtocol(asyncio.Protocol):
    def __init__(self, pod: str, version: str) -> None:
        self.pod = pod
        self.version = version
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's aren't subclasses

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.transport is not None and not self.transport.is_closing():
            try:
                req = take_request(self.buf)
            except TooLarge:
                self._fail(413)
                return
            except BadRequest:
                self._fail(400)
                return
            if req is None:
                return
            status, ctype, out = respond(req, self.pod, self.version)
            keep = req.keep_alive
            self.transport.write(render(status, ctype, out, self.pod, self.version, keep))
            if not keep:
                self.transport.close()

    def _fail(self, status: int) -> None:
        assert self.transport is not None
        msg = f"{reason(status)}\n".encode()
        self.transport.write(render(status, "text/plain", msg, self.pod, self.version, False))
        self.transport.close()

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(pod: str, version: str, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HttpProtocol(pod, version), host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"httpservice {pod}/{version} listening on {host}:{port}", flush=True)
    async with server:
        await stop.wait()


def command(pod: str, version: str = "v1", port: int = 8080) -> list[str]:
    """The argv that runs this service (in a pod, via ``Topology.popen``)."""
    argv = [sys.executable, "-m", "ztunnel_py.demo.httpservice", "--pod", pod]
    argv += ["--version", version, "--port", str(port)]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pod", required=True, help="pod name to report")
    p.add_argument("--version", default="v1", help="version to report")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    args = p.parse_args(argv)
    runner = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    runner(serve(args.pod, args.version, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
