"""The agent's metrics (:15020) and readiness (:15021) HTTP endpoints.

Deliberately tiny: HTTP/1.1 GET and HEAD, one request per connection
(``Connection: close``), a bounded request head and a read deadline, on
asyncio. Routes:

* :15020 ``/metrics`` and ``/stats/prometheus`` (Istio's path): the Prometheus
  text format from a callable (``Metrics.render``);
* :15021 ``/healthz/ready``: 200 ``ready`` once every readiness condition the
  agent registered (config, certificates, capture...) is true; otherwise 503
  with the missing ones listed. With no condition registered it is not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus

import structlog

MAX_HEAD = 8192
READ_TIMEOUT_S = 5.0
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

def reason(status: int) -> str:
    """The status line's reason phrase (``http.HTTPStatus``; "Unknown" for others)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class EndpointError(RuntimeError):
    """A telemetry endpoint could not listen; the message says where and the likely cause."""


# The agent's readiness conditions (DESIGN.md): configuration received, certificates
# held for the node's workloads, capture in place.
CONFIG, CERTIFICATES, CAPTURE = "config", "certificates", "capture"
AGENT_CONDITIONS = (CONFIG, CERTIFICATES, CAPTURE)


class Readiness:
    """Named conditions the agent sets as its parts come up (all must hold to be ready).

    ``Readiness(*AGENT_CONDITIONS)`` for an agent; one without capture
    (``ZTUNNEL_CAPTURE=none``) simply does not register ``capture``.
    """

    def __init__(self, *conditions: str) -> None:
        self._conditions: dict[str, bool] = dict.fromkeys(conditions, False)

    def register(self, *names: str) -> None:
        for name in names:
            self._conditions.setdefault(name, False)

    def set(self, name: str, ok: bool = True) -> None:
        if name not in self._conditions:
            raise KeyError(
                f"readiness condition {name!r} was never registered "
                f"(registered: {', '.join(sorted(self._conditions)) or 'none'})"
            )
        self._conditions[name] = ok

    def missing(self) -> list[str]:
        return sorted(name for name, ok in self._conditions.items() if not ok)

    @property
    def ready(self) -> bool:
        return bool(self._conditions) and not self.missing()

    def status(self) -> tuple[int, str]:
        if not self._conditions:
            return 503, "not ready: no readiness condition registered yet\n"
        missing = self.missing()
        if missing:
            return 503, f"not ready: waiting for {', '.join(missing)}\n"
        return 200, "ready\n"


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: Mapping[str, str] = field(default_factory=dict)

    def encode(self, head_only: bool = False) -> bytes:
        lines = [
            f"HTTP/1.1 {self.status} {reason(self.status)}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Connection: close",
            *(f"{k}: {v}" for k, v in self.headers.items()),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + self.body


Handler = Callable[[], Response]


def parse_request_line(head: bytes) -> tuple[str, str]:
    """(method, path without query) of an HTTP/1.x request head; ValueError if malformed."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError(f"malformed request line {line[:80]!r}")
    method, target, _ = parts
    return method, target.split("?", 1)[0]


class HttpEndpoint:
    """One listener serving a fixed set of GET routes."""

    def __init__(self, routes: Mapping[str, Handler], name: str) -> None:
        self.routes = dict(routes)
        self.name = name
        self._server: asyncio.Server | None = None
        self._log = structlog.get_logger().bind(component=f"http.{name}")

    def respond(self, head: bytes) -> tuple[Response, bool]:
        """The response to a request head, and whether it was a HEAD request (pure)."""
        try:
            method, path = parse_request_line(head)
        except ValueError as exc:
            return Response(400, f"{exc}\n".encode()), False
        if method not in ("GET", "HEAD"):
            return Response(405, b"only GET and HEAD\n", headers={"Allow": "GET, HEAD"}), False
        handler = self.routes.get(path)
        if handler is None:
            known = ", ".join(sorted(self.routes))
            return Response(404, f"no such path {path}; try {known}\n".encode()), False
        return handler(), method == "HEAD"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            response, head_only = self.respond(head)
            writer.write(response.encode(head_only))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.LimitOverrunError:
            writer.write(Response(400, b"request head too large\n").encode())
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        except Exception as exc:  # one bad request must not take the endpoint down
            self._log.error("request failed", error=repr(exc))
            with contextlib.suppress(ConnectionError):
                writer.write(Response(500, b"internal error\n").encode())
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def start(self, host: str, port: int) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD)
        except OSError as exc:
            hint = (
                "the port is taken (another agent on this host?)"
                if exc.errno == errno.EADDRINUSE
                else "is the address assigned to this host?"
            )
            raise EndpointError(
                f"{self.name} endpoint cannot listen on {host}:{port}: {exc.strerror}; {hint}"
            ) from exc

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError(f"{self.name} endpoint is not listening")
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


def split_address(address: str) -> tuple[str, int]:
    """``"0.0.0.0:15020"`` / ``"[::1]:15020"`` -> (host, port); ValueError names the value."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r}: expected host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


class TelemetryServer:
    """The :15020 metrics and :15021 readiness listeners of one agent."""

    def __init__(
        self,
        render_metrics: Callable[[], bytes],
        readiness: Readiness,
        *,
        metrics_address: str = "0.0.0.0:15020",
        readiness_address: str = "0.0.0.0:15021",
    ) -> None:
        self.readiness = readiness
        self._metrics_address = split_address(metrics_address)
        self._readiness_address = split_address(readiness_address)

        def metrics() -> Response:
            return Response(200, render_metrics(), PROMETHEUS_CONTENT_TYPE)

        def ready() -> Response:
            status, text = readiness.status()
            return Response(status, text.encode())

        self.metrics = HttpEndpoint({"/metrics": metrics, "/stats/prometheus": metrics}, "metrics")
        self.ready = HttpEndpoint({"/healthz/ready": ready}, "readiness")

    async def start(self) -> None:
        await self.metrics.start(*self._metrics_address)
        try:
            await self.ready.start(*self._readiness_address)
        except BaseException:
            await self.metrics.close()
            raise

    async def close(self) -> None:
        await self.metrics.close()
        await self.ready.close()

    async def __aenter__(self) -> TelemetryServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
