"""``ztunnel-py waypoint``: run the namespace L7 proxy.

The waypoint is a mesh destination with its own identity
(``spiffe://<td>/ns/<namespace>/sa/<service account>``, the Gateway's name by
default, as in Istio): it gets its certificate from the controller's CA and its
configuration from the controller's stream (as a ``waypoint`` client of the
node it runs on), listens for HBONE on :15008 and sends to endpoints over
HBONE. Shared settings (controller, CA root, token, trust domain, metrics and
readiness addresses, HBONE tuning, logging) are the agent's configuration
(``AgentConfig``: flag > environment > --config file > default).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import Any

from ztunnel_py import config, log
from ztunnel_py.agent_cli import CLIENT_FLAGS, add_client_arguments
from ztunnel_py.config import HBONE_PORT, AgentConfig

_FLAGS = {**CLIENT_FLAGS, "metrics_address": "metrics_address",
          "readiness_address": "readiness_address"}


def _log() -> Any:
    return log.get("waypoint")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "waypoint",
        help="run a waypoint: the namespace L7 proxy (HBONE in and out)",
        description=(
            "The L7 proxy of one namespace (a Gateway of class istio-waypoint): "
            "VirtualService / HTTPRoute routing, retries, timeouts, faults, mirroring, "
            "DestinationRule policies and L7 AuthorizationPolicy, between HBONE tunnels."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--name", required=True, help="the waypoint Gateway's name")
    p.add_argument("--namespace", required=True, help="the waypoint Gateway's namespace")
    p.add_argument("--service-account", help="identity's service account (default: --name)")
    p.add_argument("--listen", default=f"0.0.0.0:{HBONE_PORT}",
                   help="HBONE listen address (default: %(default)s)")
    add_client_arguments(p, "waypoint")
    p.add_argument("--metrics-address", help="Prometheus metrics address (host:port)")
    p.add_argument("--readiness-address", help="readiness address (host:port)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config.load_args(AgentConfig, args, _FLAGS)
        listen = config.split_host_port(args.listen, "--listen")
    except config.ConfigError as exc:
        print(f"ztunnel-py waypoint: {exc}")
        return 2
    missing = cfg.missing_bootstrap()
    if missing:
        print(f"ztunnel-py waypoint: missing {', '.join(missing)} (see --help)")
        return 2
    log.configure(cfg.log)
    # Imported here so that building the CLI (every subcommand's parser) stays cheap.
    import uvloop

    from ztunnel_py.telemetry.admin import AdminError

    try:
        uvloop.run(serve(cfg, args.namespace, args.name, args.service_account or args.name,
                         listen))
    except (OSError, AdminError) as exc:
        _log().error("waypoint cannot start", error=str(exc))
        return 1
    return 0


async def serve(cfg: AgentConfig, namespace: str, name: str, service_account: str,
                listen: tuple[str, int]) -> None:
    # Imported here so that building the CLI (every subcommand's parser) stays cheap.
    import grpc

    from waypoint.mesh import HboneConnector, HboneListener
    from waypoint.proxy import WaypointProxy
    from waypoint.telemetry import WaypointMetrics
    from waypoint.upstream import Upstreams
    from ztunnel_py import native
    from ztunnel_py.identity.errors import IdentityError
    from ztunnel_py.identity.manager import GrpcCaClient, SecretManager
    from ztunnel_py.proxy.pool import ConnectionPool
    from ztunnel_py.state.client import GRPC_OPTIONS, ConfigClient
    from ztunnel_py.state.model import spiffe_id
    from ztunnel_py.state.snapshot import StateStore
    from ztunnel_py.telemetry.admin import AdminServer
    from ztunnel_py.telemetry.http import CERTIFICATES, CONFIG, Readiness, TelemetryServer

    assert cfg.token_file is not None and cfg.controller_ca is not None
    token_file = cfg.token_file
    identity = spiffe_id(cfg.trust_domain, namespace, service_account)
    credentials = grpc.ssl_channel_credentials(root_certificates=cfg.controller_ca.read_bytes())
    channel = grpc.aio.secure_channel(cfg.controller, credentials, options=list(GRPC_OPTIONS))
    store = StateStore()
    client = ConfigClient(channel, store, node=cfg.node, kind="waypoint",
                          token=lambda: token_file.read_text().strip())
    secrets = SecretManager(GrpcCaClient(channel, token=lambda: token_file.read_text().strip(),
                                         node=cfg.node))
    pool = ConnectionPool(cfg.hbone, secrets, cfg.trust_domain)
    metrics = WaypointMetrics()
    proxy = WaypointProxy(store, namespace, name, Upstreams(HboneConnector(pool, identity)),
                          metrics=metrics)
    listener = HboneListener(proxy, secrets, identity, cfg.trust_domain, host=listen[0],
                             port=listen[1], config=cfg.hbone)
    admin_host, admin_port = config.split_host_port(cfg.admin_address, "--admin-address")
    admin = AdminServer(admin_host, admin_port)
    admin.route("/config_dump", proxy.describe)
    admin.route("/status", lambda: vars(client.status))
    readiness = Readiness(CONFIG, CERTIFICATES)
    telemetry = TelemetryServer(metrics.render, readiness, metrics_address=cfg.metrics_address,
                                readiness_address=cfg.readiness_address)
    config_task = asyncio.create_task(client.run(), name="config-client")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def start_up() -> None:
        await client.wait_synced()
        readiness.set(CONFIG)
        delay = 0.5
        while True:
            try:
                await listener.start()  # with our certificate (the CA knows us once synced)
                break
            except IdentityError as exc:
                _log().error("waypoint has no certificate yet; retrying", identity=identity,
                             error=str(exc), retry_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
            except OSError as exc:
                _log().error("waypoint cannot listen for HBONE",
                             address=f"{listen[0]}:{listen[1]}", error=str(exc))
                stop.set()
                return
        readiness.set(CERTIFICATES)
        _log().info("waypoint ready", waypoint=f"{namespace}/{name}", identity=identity,
                    hbone=f"{listen[0]}:{listener.port}", compiled=native.compiled)

    up: asyncio.Task[None] | None = None
    try:
        await telemetry.start()
        await admin.start()
        up = asyncio.create_task(start_up(), name="waypoint-start")
        await stop.wait()
    finally:
        for task in (config_task, up):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await listener.stop()
        await proxy.close()
        pool.close()
        await secrets.close()
        await telemetry.close()
        await admin.close()
        await channel.close(None)
