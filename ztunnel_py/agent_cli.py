"""``ztunnel-py agent``: the node agent's command line (the agent itself is ``app``).

Settings come from flags, the environment and an optional YAML file
(``AgentConfig``: flag > environment > --config file > default); the agent's
modules are imported only when it runs, so that ``ztunnel-py --help`` and the
other subcommands start quickly.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ztunnel_py import config, log
from ztunnel_py.config import AgentConfig

# What the agent and the waypoint share: both are clients of the controller with an
# AgentConfig (flag > environment > --config file > default).
CLIENT_FLAGS = {
    "node": "node",
    "controller": "controller",
    "controller_ca": "controller_ca",
    "token_file": "token_file",
    "trust_domain": "trust_domain",
    "admin_address": "admin_address",
    "log_level": "log.level",
    "log_format": "log.format",
}
_FLAGS = {**CLIENT_FLAGS, "capture": "capture", "bpf_pin_root": "bpf_pin_root"}


def add_client_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """The flags of ``CLIENT_FLAGS`` (and ``--config``) on ``what``'s parser."""
    p.add_argument("--node", help=f"the node this {what} runs on (NODE_NAME)")
    p.add_argument("--controller", help="controller gRPC address HOST:PORT")
    p.add_argument("--controller-ca", type=Path, help="PEM root to verify the controller")
    p.add_argument("--token-file", type=Path, help="this node's bootstrap token")
    p.add_argument("--trust-domain")
    p.add_argument("--admin-address", help="admin HTTP address (loopback only)")
    p.add_argument("--config", type=Path, help="YAML settings file (the agent's settings)")
    p.add_argument("--log-level")
    p.add_argument("--log-format")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "agent",
        help="run the node agent: eBPF capture, HBONE tunnel, L4 policy, telemetry",
        description=(
            "The per-node agent (run it in the node's host network, as root). It keeps the "
            "mesh state pushed by the controller (TLS gRPC, bootstrap or service-account "
            "token), holds the certificates of this node's enrolled workloads, captures their "
            "traffic with eBPF (--capture ebpf) into :15001 (outbound), :15008 (HBONE) and "
            ":15006 (inbound plaintext), carries it between nodes in HBONE (mTLS HTTP/2 "
            "CONNECT), enforces AuthorizationPolicy and PeerAuthentication, and serves "
            "metrics on :15020, readiness on :15021 and admin on 127.0.0.1:15000 "
            "(/config_dump, /certs, /connections). SIGTERM drains open connections."
        ),
        epilog=config.settings_epilog(AgentConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_client_arguments(p, "agent")
    p.add_argument("--capture", help="ebpf, or none")
    p.add_argument("--bpf-pin-root", type=Path, help="bpffs directory for pins")
    p.add_argument("--uninstall", action="store_true",
                   help="remove this node's eBPF programs, pins and policy route, and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config.load_args(AgentConfig, args, _FLAGS)
    except config.ConfigError as exc:
        print(f"ztunnel-py agent: {exc}")
        return 2
    log.configure(cfg.log)
    if args.uninstall:
        if not cfg.node:
            print("ztunnel-py agent --uninstall: give --node (or NODE_NAME)")
            return 2
        from ztunnel_py.redirect import uninstall

        uninstall(cfg.node, pin_root=cfg.bpf_pin_root)
        print(f"capture for node {cfg.node} removed")
        return 0
    missing = cfg.missing_bootstrap()
    if missing:
        print(f"ztunnel-py agent: missing {', '.join(missing)} (see --help for the "
              "environment variables)")
        return 2
    # Imported here so that building the CLI (every subcommand's parser) stays cheap.
    import uvloop

    from ztunnel_py.app import serve
    from ztunnel_py.redirect import CaptureError
    from ztunnel_py.telemetry.admin import AdminError
    from ztunnel_py.telemetry.http import EndpointError

    try:
        uvloop.run(serve(cfg))
    except (AdminError, EndpointError, CaptureError, OSError) as exc:
        log.get("agent").error("agent cannot start", error=str(exc))
        return 1
    return 0
