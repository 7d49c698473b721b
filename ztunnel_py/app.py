"""The agent's composition root (``ztunnel-py agent``, see ``agent_cli``). Wiring only.

One gRPC channel to the controller (TLS, bootstrap or service-account token)
carries the config stream (-> ``StateStore``) and certificate requests (->
``SecretManager``). On every snapshot swap: the secret manager prefetches the
identities of this node's enrolled workloads, eBPF capture is reconciled to
the enrolled pods, and open connections that a new policy denies are closed.
The proxy's three listeners (15001, 15006, 15008) take captured connections;
telemetry sinks (metrics, access log) see every connection at close; admin
(loopback) serves ``/config_dump``, ``/certs``, ``/connections``, ``/config``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc

from ztunnel_py import config, log, native, policy
from ztunnel_py.config import AgentConfig
from ztunnel_py.identity.manager import GrpcCaClient, SecretManager, wanted_identities
from ztunnel_py.proxy.server import Proxy
from ztunnel_py.proxy.sockets import plain_listener
from ztunnel_py.redirect import AGENT_MARK, Capture
from ztunnel_py.redirect.sockets import transparent_listener
from ztunnel_py.state.client import GRPC_OPTIONS, ConfigClient
from ztunnel_py.state.codec import snapshot_to_json
from ztunnel_py.state.snapshot import Snapshot, StateStore
from ztunnel_py.telemetry.accesslog import AccessLog, connection_json
from ztunnel_py.telemetry.admin import AdminServer
from ztunnel_py.telemetry.http import (
    AGENT_CONDITIONS,
    CAPTURE,
    CERTIFICATES,
    CONFIG,
    Readiness,
    TelemetryServer,
)
from ztunnel_py.telemetry.metrics import CertificateExpiry, Metrics

_log = log.get("agent")

def controller_channel(cfg: AgentConfig) -> grpc.aio.Channel:
    assert cfg.controller_ca is not None
    credentials = grpc.ssl_channel_credentials(root_certificates=cfg.controller_ca.read_bytes())
    return grpc.aio.secure_channel(cfg.controller, credentials, options=list(GRPC_OPTIONS))


async def serve(cfg: AgentConfig) -> None:
    assert cfg.token_file is not None
    token_file = cfg.token_file

    def token() -> str:
        return token_file.read_text().strip()

    store = StateStore()
    channel = controller_channel(cfg)
    client = ConfigClient(channel, store, node=cfg.node, token=token)
    secrets = SecretManager(GrpcCaClient(channel, token=token, node=cfg.node))
    capture: Capture | None = None
    # pyroute2 runs an event loop of its own: every capture call happens on one
    # dedicated thread, in order.
    netlink = ThreadPoolExecutor(1, thread_name_prefix="capture")
    loop = asyncio.get_running_loop()
    if cfg.capture == "ebpf":
        capture = await loop.run_in_executor(
            netlink, lambda: Capture(cfg.node, listen_ip=cfg.bind_ip, pin_root=cfg.bpf_pin_root))
        await loop.run_in_executor(netlink, capture.install)
    elif cfg.capture != "none":
        raise config.ConfigError(f"ZTUNNEL_CAPTURE={cfg.capture!r}: expected ebpf or none")

    readiness = Readiness(*(AGENT_CONDITIONS if capture else (CONFIG, CERTIFICATES)))
    if capture:
        readiness.set(CAPTURE)
    metrics = Metrics(
        certificates=lambda: certificate_expiries(secrets),
        config_version=lambda: store.current.version,
        capture_counters=capture.counters if capture else None,
        process=True,
    )
    access_log = AccessLog()
    metrics.attach()
    access_log.attach()
    proxy = Proxy.from_config(
        cfg, store, secrets,
        socket_mark=AGENT_MARK if capture else cfg.socket_mark,
        authorizer=policy.evaluate,
        strict=policy.strict,
        listener=transparent_listener if capture else plain_listener,
    )

    def on_swap(old: Snapshot, new: Snapshot) -> None:
        secrets.track_snapshot(new, cfg.node)
        if capture is not None:
            netlink.submit(reconcile, capture, new)
        if policy.security_changed(old, new):
            proxy.revoke(lambda conns: policy.recheck(conns, new))
        readiness.set(CONFIG)

    store.subscribe(on_swap)
    host, port = config.split_host_port(cfg.admin_address, "--admin-address")
    admin = AdminServer(host, port)
    admin.route("/config_dump", lambda: snapshot_to_json(store.current))
    admin.route("/config", lambda: config.as_dict(cfg))
    admin.route("/status", lambda: vars(client.status))
    admin.route("/certs", secrets.describe)
    admin.route("/connections",
                lambda: [connection_json(r) for r in metrics.connections.snapshot()])
    telemetry = TelemetryServer(metrics.render, readiness, metrics_address=cfg.metrics_address,
                                readiness_address=cfg.readiness_address)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks: list[asyncio.Task[None]] = []
    try:
        await proxy.start()
        await admin.start()
        await telemetry.start()
        tasks.append(asyncio.create_task(client.run(), name="config-client"))
        tasks.append(asyncio.create_task(
            watch_certificates(secrets, store, cfg.node, readiness), name="cert-readiness"))
        _log.info("agent started", node=cfg.node, controller=cfg.controller,
                  capture=cfg.capture, admin_port=admin.port, compiled=native.compiled)
        await stop.wait()
        _log.info("draining", deadline_s=cfg.drain_timeout_s)
        await proxy.drain(cfg.drain_timeout_s)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await proxy.stop()
        await telemetry.close()
        await admin.close()
        await secrets.close()
        metrics.detach()
        access_log.detach()
        if capture is not None:
            # programs stay attached and pinned: fail closed while we are away
            await loop.run_in_executor(netlink, capture.close)
        netlink.shutdown()
        await channel.close(None)


def reconcile(capture: Capture, snapshot: Snapshot) -> None:
    try:
        result = capture.reconcile(snapshot)
    except Exception as exc:  # keep the agent up; the next swap retries
        _log.error("capture reconcile failed", version=snapshot.version, error=repr(exc))
        return
    if result.added or result.removed or result.unresolved:
        _log.info("capture reconciled", version=snapshot.version, added=result.added,
                  removed=result.removed, unresolved=result.unresolved)


def certificate_expiries(secrets: SecretManager) -> list[CertificateExpiry]:
    rows = []
    for row in secrets.describe():
        not_after = row.get("not_after")
        if isinstance(not_after, str):
            rows.append(CertificateExpiry(str(row["identity"]),
                                          dt.datetime.fromisoformat(not_after).timestamp()))
    return rows


async def watch_certificates(secrets: SecretManager, store: StateStore, node: str,
                             readiness: Readiness, period_s: float = 0.5) -> None:
    """Readiness: every enrolled workload of this node holds a valid certificate."""
    while True:
        wanted = wanted_identities(store.current, node)
        readiness.set(CERTIFICATES, all(secrets.current(i) is not None for i in wanted))
        await asyncio.sleep(period_s)
