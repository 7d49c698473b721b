"""The controller process, assembled: config source -> model -> gRPC push, plus admin.

Used by ``ztunnel-py controller`` and by the in-process integration tests and
benchmark. Credentials and the authenticator are passed in: the CLI builds TLS
from the CA and the bootstrap-token authenticator; unit tests pass fakes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from ztunnel_py import log
from ztunnel_py.config import ControllerConfig, split_host_port
from ztunnel_py.controller import directory
from ztunnel_py.controller.push import PushCore
from ztunnel_py.controller.server import Authenticator, MeshConfigService
from ztunnel_py.controller.sync import ModelSync
from ztunnel_py.controller.translate import KubeObject, Problem
from ztunnel_py.state.client import GRPC_OPTIONS
from ztunnel_py.state.codec import snapshot_to_json
from ztunnel_py.state.snapshot import Snapshot, settle_heap
from ztunnel_py.telemetry.admin import AdminServer


def _log() -> Any:
    """Resolved at each use, so that ``log.configure`` (run after imports) applies."""
    return log.get("controller")


class ControllerError(Exception):
    """The controller cannot start (address in use, unreadable config directory)."""


class Controller:
    def __init__(
        self,
        cfg: ControllerConfig,
        *,
        authenticator: Authenticator,
        server_credentials: grpc.ServerCredentials | None,
        add_services: Callable[[grpc.aio.Server], None] | None = None,
        epoch: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.core = PushCore(epoch=epoch)
        self.service = MeshConfigService(self.core, authenticator)
        self.sync = ModelSync(self._publish, trust_domain=cfg.trust_domain,
                              root_namespace=cfg.root_namespace, debounce_s=cfg.debounce_s)
        self._credentials = server_credentials
        self._add_services = add_services
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        host, port = split_host_port(cfg.admin_address, "--admin-address")
        self.admin = AdminServer(host, port)
        self.admin.route("/config_dump", self.config_dump)
        self.admin.route("/agents", self.agents)
        self.admin.route("/problems", lambda: [str(p) for p in self.sync.problems])
        self.grpc_port = 0

    async def start(self) -> None:
        server = grpc.aio.server(options=list(GRPC_OPTIONS))
        self.service.add_to(server)
        if self._add_services is not None:
            self._add_services(server)
        address = self.cfg.grpc_address
        if self._credentials is None:
            self.grpc_port = server.add_insecure_port(address)
        else:
            self.grpc_port = server.add_secure_port(address, self._credentials)
        if not self.grpc_port:
            raise ControllerError(f"cannot listen on {address} for gRPC; is the port in use?")
        await server.start()
        self._server = server
        await self.admin.start()
        self._tasks.append(asyncio.create_task(self.sync.run(), name="controller-sync"))
        if self.cfg.config_dir is not None:
            loader = directory.DirectoryLoader(self.cfg.config_dir)
            try:
                objects, problems = loader.load()
            except directory.SourceError as exc:
                await self.stop()
                raise ControllerError(str(exc)) from None
            self.sync.rebuild(objects, problems)  # the first version before any agent asks
            self._tasks.append(asyncio.create_task(
                directory.watch(loader, self.sync.submit, reported=loader.generation),
                name="controller-directory"))
        _log().info("controller started", grpc_port=self.grpc_port, admin_port=self.admin.port,
                  config_dir=str(self.cfg.config_dir), tls=self._credentials is not None)

    def _publish(self, snapshot: Snapshot) -> str | None:
        version = self.service.publish(snapshot)
        settle_heap()
        return version

    def submit(self, objects: Sequence[KubeObject], problems: Sequence[Problem] = ()) -> None:
        """Feed a source's whole object set (Kubernetes watcher, benchmark)."""
        self.sync.submit(objects, problems)

    async def stop(self, grace: float = 1.0) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._server is not None:
            self.service.close()
            await self._server.stop(grace)
            self._server = None
        await self.admin.close()

    # -- admin ---------------------------------------------------------------------

    def config_dump(self) -> dict[str, Any]:
        latest = self.core.latest
        dump: dict[str, Any] = snapshot_to_json(latest.snapshot) if latest else {"version": ""}
        dump["problems"] = [str(p) for p in self.sync.problems]
        return dump

    def agents(self) -> dict[str, Any]:
        latest = self.core.latest
        return {
            "latest_version": latest.version if latest else "",
            "agents": [a.as_dict() for a in self.core.agents()],
            "updates_sent": self.service.updates_sent,
            "bytes_sent": self.service.bytes_sent,
        }
