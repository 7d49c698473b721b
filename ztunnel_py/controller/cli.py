"""``ztunnel-py controller``: serve configuration (and certificates) to agents.

Wiring only: settings from flags > environment > file, the CA and its serving
certificate for gRPC TLS, the bootstrap-token authenticator, the certificate
service and the config stream on one gRPC server, the config source (a
directory of YAML, or the Kubernetes API).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ztunnel_py import config, log
from ztunnel_py.config import ControllerConfig

if TYPE_CHECKING:
    import grpc


def _log() -> Any:
    """Resolved at each use, so that ``log.configure`` (run after imports) applies."""
    return log.get("controller.cli")

ROOTS_FILE = "roots.pem"

_FLAGS = {
    "config_dir": "config_dir",
    "kubernetes": "kubernetes",
    "state_dir": "state_dir",
    "grpc_address": "grpc_address",
    "admin_address": "admin_address",
    "trust_domain": "trust_domain",
    "root_namespace": "root_namespace",
    "debounce": "debounce_s",
    "log_level": "log.level",
    "log_format": "log.format",
}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "controller",
        help="run the controller: config source -> model -> gRPC push to agents, and the CA",
        description=(
            "Watches a directory of Kubernetes-shaped YAML (--config-dir) or the Kubernetes API "
            "(--kubernetes), translates it into the mesh model and pushes per-node versions to "
            "connected agents over gRPC (TLS, bootstrap-token authentication); also signs "
            "workload certificates. Admin JSON (loopback): /config_dump, /agents, /problems. "
            "Agents verify the controller with <state-dir>/roots.pem and authenticate with "
            "the token file printed by --issue-token NODE."
        ),
        epilog=config.settings_epilog(ControllerConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config-dir", type=Path, help="directory of YAML manifests (watched)")
    p.add_argument("--kubernetes", action="store_const", const=True,
                   help="watch the Kubernetes API instead of a directory")
    p.add_argument("--state-dir", type=Path, help="CA key and bootstrap tokens")
    p.add_argument("--grpc-address", help="gRPC (TLS) listen address host:port")
    p.add_argument("--admin-address", help="admin HTTP listen address (loopback)")
    p.add_argument("--trust-domain")
    p.add_argument("--root-namespace")
    p.add_argument("--debounce", type=float, help="seconds to gather changes into one version")
    p.add_argument("--tls-san", action="append", default=[],
                   help="extra DNS name or IP for the serving certificate (repeatable)")
    p.add_argument("--issue-token", action="append", default=[], metavar="NODE",
                   help="create NODE's bootstrap token if needed, print its file, and exit "
                        "(hand the file to that node's agent: --token-file)")
    p.add_argument("--config", type=Path, help="YAML settings file")
    p.add_argument("--log-level")
    p.add_argument("--log-format")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config.load_args(ControllerConfig, args, _FLAGS)
    except config.ConfigError as exc:
        print(f"ztunnel-py controller: {exc}")
        return 2
    log.configure(cfg.log)
    if args.issue_token:
        return _issue_tokens(cfg, args.issue_token)
    if cfg.config_dir is None and not cfg.kubernetes:
        print("ztunnel-py controller: give --config-dir DIR (or ZTUNNEL_CONFIG_DIR), "
              "or --kubernetes")
        return 2
    # Imported here so that building the CLI (every subcommand's parser) stays cheap.
    import uvloop

    from ztunnel_py.controller.runtime import ControllerError

    try:
        uvloop.run(_serve(cfg, args.tls_san))
    except ControllerError as exc:
        _log().error("controller cannot start", error=str(exc))
        return 1
    return 0


def _issue_tokens(cfg: ControllerConfig, nodes: list[str]) -> int:
    from ztunnel_py.controller.ca.auth import BootstrapTokens

    tokens = BootstrapTokens(cfg.state_dir)
    for node in nodes:
        try:
            tokens.token_for(node)
        except ValueError as exc:
            print(f"ztunnel-py controller: {exc}")
            return 2
        print(tokens.path_for(node))
    return 0


def _write_roots(cfg: ControllerConfig, roots_pem: bytes) -> Path:
    """The trust bundle agents verify the controller with (public): <state-dir>/roots.pem."""
    path = cfg.state_dir / ROOTS_FILE
    tmp = path.with_name(f".{ROOTS_FILE}.tmp")
    tmp.write_bytes(roots_pem)
    tmp.chmod(0o644)
    tmp.replace(path)
    return path


def _serving_names(cfg: ControllerConfig, extra: list[str]) -> tuple[list[str], list[str]]:
    host, _port = config.split_host_port(cfg.grpc_address, "--grpc-address")
    names = ["localhost", socket.gethostname(), "ztunnel-py-controller"]
    ips = ["127.0.0.1"]
    for value in [host, *extra]:
        if value in ("0.0.0.0", "::", ""):
            continue
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in value else socket.AF_INET, value)
            ips.append(value)
        except OSError:
            names.append(value)
    return sorted(set(names)), sorted(set(ips))


async def _serve(cfg: ControllerConfig, tls_san: list[str]) -> None:
    import grpc

    from ztunnel_py.controller.ca.auth import BootstrapTokens
    from ztunnel_py.controller.ca.authority import CertificateAuthority
    from ztunnel_py.controller.ca.service import add_certificate_service
    from ztunnel_py.controller.runtime import Controller
    from ztunnel_py.state.snapshot import Snapshot

    kube_mode: Any = None
    if cfg.kubernetes:
        from ztunnel_py.controller.kube_identity import kubernetes_mode

        # The CA from its Secret, TokenReview + the pod's node for agents (blocking: a thread).
        kube_mode = await asyncio.to_thread(kubernetes_mode, cfg)
        ca = kube_mode.ca
    else:
        ca = CertificateAuthority.load_or_create(
            cfg.state_dir, cfg.trust_domain, cfg.cert_max_ttl_s)
    names, ips = _serving_names(cfg, tls_san)
    chain, key = ca.serving_certificate(names, ips)
    roots = _write_roots(cfg, ca.roots_pem)
    _log().info("serving TLS", dns_names=names, ips=ips, roots=str(roots))
    credentials = grpc.ssl_server_credentials([(key, chain)])
    # Directory mode: per-node bootstrap tokens. (Kubernetes mode will swap in the
    # TokenReview authenticator, ztunnel_py.controller.ca.auth.KubernetesAuthenticator.)
    authenticator: Any = kube_mode.authenticator if kube_mode else BootstrapTokens(cfg.state_dir)
    holder: dict[str, Controller] = {}

    def snapshot() -> Snapshot:
        latest = holder["c"].core.latest
        return latest.snapshot if latest else Snapshot()

    def add_services(server: grpc.aio.Server) -> None:
        add_certificate_service(server, ca, authenticator, snapshot)

    controller = Controller(cfg, authenticator=authenticator, server_credentials=credentials,
                            add_services=add_services)
    holder["c"] = controller
    await controller.start()
    kube: Any = None
    if cfg.kubernetes:
        from ztunnel_py.controller.kube import KubernetesSource

        kube = kube_mode.source if kube_mode else KubernetesSource.from_config()
        await kube.start()
        # The whole set after the initial list, then once per burst of watch events.
        feeding = asyncio.create_task(kube.feed(controller.submit), name="controller-kube")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        _log().info("controller stopping")
        if kube is not None:
            feeding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeding
            with contextlib.suppress(Exception):
                await kube.stop()
        await controller.stop()
