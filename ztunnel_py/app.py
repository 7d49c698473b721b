"""The agent's composition root: ``ztunnel-py agent``. Wiring only, no logic.

For now: settings, the config stream client (TLS to the controller, bootstrap
token) feeding the state store, and the loopback admin server with
``/config_dump`` and ``/config``. Identity, the proxy and capture plug in here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any

import grpc
import uvloop

from ztunnel_py import config, log
from ztunnel_py.config import AgentConfig
from ztunnel_py.state.client import GRPC_OPTIONS, ConfigClient
from ztunnel_py.state.codec import snapshot_to_json
from ztunnel_py.state.snapshot import StateStore, settle_heap
from ztunnel_py.telemetry.admin import AdminError, AdminServer


def _log() -> Any:
    """Resolved at each use, so that ``log.configure`` (run after imports) applies."""
    return log.get("agent")

_FLAGS = {
    "node": "node",
    "controller": "controller",
    "controller_ca": "controller_ca",
    "token_file": "token_file",
    "admin_address": "admin_address",
    "trust_domain": "trust_domain",
    "capture": "capture",
    "log_level": "log.level",
    "log_format": "log.format",
}


def _epilog() -> str:
    rows = config.describe(AgentConfig)
    lines = ["settings (flag > environment variable > --config file > default):"]
    lines += [f"  {env:30} {path:26} {help_}" for path, env, help_, _d in rows if env]
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "agent",
        help="run the node agent (config from the controller; admin on loopback)",
        description=(
            "The per-node agent: keeps the mesh state pushed by the controller (TLS gRPC, "
            "bootstrap token) and serves it on the loopback admin port (/config_dump)."
        ),
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--node", help="the node this agent serves")
    p.add_argument("--controller", help="controller gRPC address HOST:PORT")
    p.add_argument("--controller-ca", type=Path, help="PEM root to verify the controller")
    p.add_argument("--token-file", type=Path, help="this node's bootstrap token")
    p.add_argument("--admin-address", help="admin HTTP address (loopback)")
    p.add_argument("--trust-domain")
    p.add_argument("--capture", help="ebpf, or none")
    p.add_argument("--config", type=Path, help="YAML settings file")
    p.add_argument("--log-level")
    p.add_argument("--log-format")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    flags = {dst: getattr(args, src) for src, dst in _FLAGS.items()}
    try:
        cfg = config.load(AgentConfig, flags=flags, file=args.config)
    except config.ConfigError as exc:
        print(f"ztunnel-py agent: {exc}")
        return 2
    log.configure(cfg.log)
    missing = [f for f, v in (("--node", cfg.node), ("--controller-ca", cfg.controller_ca),
                              ("--token-file", cfg.token_file)) if not v]
    if missing:
        print(f"ztunnel-py agent: missing {', '.join(missing)} (see --help for the "
              "environment variables)")
        return 2
    try:
        uvloop.run(serve(cfg))
    except (AdminError, OSError) as exc:
        _log().error("agent cannot start", error=str(exc))
        return 1
    return 0


def controller_channel(cfg: AgentConfig) -> grpc.aio.Channel:
    assert cfg.controller_ca is not None
    credentials = grpc.ssl_channel_credentials(root_certificates=cfg.controller_ca.read_bytes())
    return grpc.aio.secure_channel(cfg.controller, credentials, options=list(GRPC_OPTIONS))


async def serve(cfg: AgentConfig) -> None:
    assert cfg.token_file is not None
    token_file = cfg.token_file
    store = StateStore()
    store.subscribe(lambda _old, _new: settle_heap())
    channel = controller_channel(cfg)
    client = ConfigClient(channel, store, node=cfg.node,
                          token=lambda: token_file.read_text().strip())
    host, port = config.split_host_port(cfg.admin_address, "--admin-address")
    admin = AdminServer(host, port)
    admin.route("/config_dump", lambda: snapshot_to_json(store.current))
    admin.route("/config", lambda: config.as_dict(cfg))
    admin.route("/status", lambda: vars(client.status))
    await admin.start()
    task = asyncio.create_task(client.run(), name="config-client")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    _log().info("agent started", node=cfg.node, controller=cfg.controller, admin_port=admin.port)
    try:
        await stop.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await admin.close()
        await channel.close(None)
