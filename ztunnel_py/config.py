"""The one configuration object.

Every setting is a field of a frozen dataclass with a default. Each leaf names
its environment variable once (``env`` in the field metadata); values are
resolved as flags > environment > file (YAML) > default, in :func:`load`, and
nowhere else. Parse errors name the variable and the value.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting could not be parsed; the message names the source and value."""


def setting(default: Any, env: str, help: str) -> Any:
    """A configuration leaf: its default, its environment variable, its help text."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed in the configuration")
    return field(default=default, metadata={"env": env, "help": help})


# -- ports (DESIGN.md: same numbers as Istio) ---------------------------------

OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
HBONE_PORT = 15008
ADMIN_PORT = 15000
METRICS_PORT = 15020
READINESS_PORT = 15021
CONTROLLER_GRPC_PORT = 15012
CONTROLLER_ADMIN_PORT = 15010

DEFAULT_TRUST_DOMAIN = "cluster.local"


@dataclass(frozen=True)
class LogConfig:
    format: str = setting("console", "LOG_FORMAT", "console (for humans) or json")
    level: str = setting("info", "LOG_LEVEL", "debug, info, warning or error")


@dataclass(frozen=True)
class HboneConfig:
    max_streams_per_connection: int = setting(
        100, "ZTUNNEL_HBONE_MAX_STREAMS", "streams carried by one pooled HBONE connection"
    )
    idle_timeout_s: float = setting(
        60.0, "ZTUNNEL_HBONE_IDLE_TIMEOUT", "seconds before an idle pooled connection is closed"
    )
    stream_window: int = setting(
        4 * 1024 * 1024, "ZTUNNEL_HBONE_STREAM_WINDOW", "HTTP/2 per-stream flow-control window"
    )
    connection_window: int = setting(
        16 * 1024 * 1024, "ZTUNNEL_HBONE_CONN_WINDOW", "HTTP/2 connection flow-control window"
    )
    max_frame_size: int = setting(
        256 * 1024, "ZTUNNEL_HBONE_MAX_FRAME", "HTTP/2 SETTINGS_MAX_FRAME_SIZE we accept"
    )
    connect_timeout_s: float = setting(
        5.0, "ZTUNNEL_HBONE_CONNECT_TIMEOUT", "seconds to establish TCP+TLS to a peer"
    )
    linger_s: float = setting(
        30.0,
        "ZTUNNEL_HBONE_LINGER",
        "seconds a client may go on sending, its bytes dropped, once the server ended the"
        " exchange with its answer complete (RST_STREAM NO_ERROR); then its connection closes",
    )


@dataclass(frozen=True)
class AgentConfig:
    node: str = setting("", "NODE_NAME", "the Kubernetes node (or demo node) this agent serves")
    controller: str = setting(
        f"127.0.0.1:{CONTROLLER_GRPC_PORT}",
        "ZTUNNEL_CONTROLLER",
        "controller gRPC address host:port",
    )
    controller_ca: Path | None = setting(
        None, "ZTUNNEL_CONTROLLER_CA", "PEM root used to verify the controller's TLS certificate"
    )
    token_file: Path | None = setting(
        None, "ZTUNNEL_TOKEN_FILE", "bootstrap token (directory mode) or service-account token"
    )
    bind_ip: str = setting("0.0.0.0", "ZTUNNEL_BIND_IP", "address the data-path listeners bind")
    admin_address: str = setting(
        f"127.0.0.1:{ADMIN_PORT}", "ZTUNNEL_ADMIN_ADDR", "admin HTTP (loopback only)"
    )
    metrics_address: str = setting(
        f"0.0.0.0:{METRICS_PORT}", "ZTUNNEL_METRICS_ADDR", "Prometheus metrics HTTP"
    )
    readiness_address: str = setting(
        f"0.0.0.0:{READINESS_PORT}", "ZTUNNEL_READINESS_ADDR", "readiness HTTP"
    )
    capture: str = setting("ebpf", "ZTUNNEL_CAPTURE", "ebpf, or none (listeners only)")
    bpf_pin_root: Path = setting(
        Path("/sys/fs/bpf/ztunnel-py"), "ZTUNNEL_BPF_PIN_ROOT",
        "bpffs directory for pinned programs and maps (a subdirectory per node)",
    )
    socket_mark: int = setting(
        0, "ZTUNNEL_SOCKET_MARK",
        "SO_MARK on the agent's own upstream sockets so capture skips them (0: none)",
    )
    drain_timeout_s: float = setting(
        10.0, "ZTUNNEL_DRAIN_TIMEOUT", "seconds streams may finish after SIGTERM"
    )
    trust_domain: str = setting(DEFAULT_TRUST_DOMAIN, "TRUST_DOMAIN", "SPIFFE trust domain")
    hbone: HboneConfig = field(default_factory=HboneConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def missing_bootstrap(self) -> list[str]:
        """The flags an agent or waypoint needs to reach the controller and are unset."""
        return [flag for flag, value in (("--node", self.node),
                                         ("--controller-ca", self.controller_ca),
                                         ("--token-file", self.token_file)) if not value]


@dataclass(frozen=True)
class ControllerConfig:
    config_dir: Path | None = setting(
        None, "ZTUNNEL_CONFIG_DIR", "directory of Kubernetes-shaped YAML (directory mode)"
    )
    kubernetes: bool = setting(False, "ZTUNNEL_KUBERNETES", "watch the Kubernetes API instead")
    state_dir: Path = setting(
        Path("/var/lib/ztunnel-py/controller"), "ZTUNNEL_STATE_DIR",
        "CA key, bootstrap tokens (created 0700/0600)",
    )
    grpc_address: str = setting(
        f"0.0.0.0:{CONTROLLER_GRPC_PORT}", "ZTUNNEL_GRPC_ADDR", "gRPC (TLS) listen address"
    )
    admin_address: str = setting(
        f"127.0.0.1:{CONTROLLER_ADMIN_PORT}", "ZTUNNEL_CONTROLLER_ADMIN_ADDR",
        "admin HTTP (loopback only)",
    )
    trust_domain: str = setting(DEFAULT_TRUST_DOMAIN, "TRUST_DOMAIN", "SPIFFE trust domain")
    root_namespace: str = setting(
        "istio-system", "ZTUNNEL_ROOT_NAMESPACE", "namespace whose policies apply mesh-wide"
    )
    cert_max_ttl_s: int = setting(
        24 * 3600, "ZTUNNEL_CERT_MAX_TTL", "maximum leaf certificate validity, seconds"
    )
    debounce_s: float = setting(
        0.05, "ZTUNNEL_DEBOUNCE", "seconds to gather changes before pushing a version"
    )
    # Kubernetes mode (--kubernetes): where the CA Secret lives, who the agents are.
    kube_namespace: str = setting(
        "", "POD_NAMESPACE", "the controller's namespace (CA Secret); default: its pod's"
    )
    agent_service_account: str = setting(
        "", "ZTUNNEL_AGENT_SERVICE_ACCOUNT",
        "<namespace>/<name> of the node agents; default: <controller ns>/ztunnel-py-agent",
    )
    token_audience: str = setting(
        "istio-ca", "ZTUNNEL_TOKEN_AUDIENCE", "audience of the agents' projected tokens"
    )
    log: LogConfig = field(default_factory=LogConfig)


# -- loading -----------------------------------------------------------------


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse(raw: Any, typ: Any, source: str) -> Any:
    """Convert ``raw`` (a string from env/flags, or a YAML value) to ``typ``."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if raw is None or raw == "":
            return None
        return _parse(raw, args[0], source)
    try:
        if typ is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if typ is int:
            if isinstance(raw, bool):
                raise ValueError("expected an integer")
            return int(raw)
        if typ is float:
            return float(raw)
        if typ is Path:
            return Path(str(raw))
        if typ is str:
            if not isinstance(raw, (str, int, float)):
                raise ValueError("expected a string")
            return str(raw)
    except ValueError as exc:
        raise ConfigError(f"{source}={raw!r}: {exc}") from None
    raise ConfigError(f"{source}: unsupported setting type {typ!r}")


def load(
    cls: type[T],
    *,
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    file: Path | None = None,
) -> T:
    """Build ``cls`` from flags > environment > file > defaults.

    ``flags`` maps dotted field paths (``"hbone.stream_window"``, ``"node"``)
    to values; ``None`` means "not given". ``file`` is YAML with the same nested
    shape as the dataclass tree.
    """
    env = os.environ if env is None else env
    flags = flags or {}
    file_values: Mapping[str, Any] = {}
    if file is not None:
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"config file {file}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {file}: expected a mapping at the top level")
        file_values = loaded
    return _build(cls, "", flags, env, file_values, str(file))


def load_args(cls: type[T], args: Any, flag_map: Mapping[str, str]) -> T:
    """``load`` from parsed command-line arguments: ``flag_map`` maps each argparse
    destination to its dotted setting path; ``args.config`` is the optional YAML file."""
    flags = {path: getattr(args, dest) for dest, path in flag_map.items()}
    return load(cls, flags=flags, file=getattr(args, "config", None))


def _build(
    cls: type[T],
    prefix: str,
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    file_values: Mapping[str, Any],
    file_name: str,
) -> T:
    hints = _type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(file_values) - known
    if unknown:
        raise ConfigError(f"config file {file_name}: unknown setting(s) {sorted(unknown)}")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        typ = hints[f.name]
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(typ):
            nested = file_values.get(f.name) or {}
            if not isinstance(nested, dict):
                raise ConfigError(f"config file {file_name}: {path} must be a mapping")
            values[f.name] = _build(typ, path + ".", flags, env, nested, file_name)  # type: ignore[arg-type]
            continue
        var = f.metadata.get("env", "")
        if flags.get(path) is not None:
            flag = "--" + path.replace(".", "-").replace("_", "-")
            values[f.name] = _parse(flags[path], typ, flag)
        elif var and var in env:
            values[f.name] = _parse(env[var], typ, var)
        elif f.name in file_values:
            values[f.name] = _parse(file_values[f.name], typ, f"{file_name}:{path}")
    return cls(**values)


def describe(cls: type) -> list[tuple[str, str, str, Any]]:
    """(dotted path, environment variable, help, default) for every leaf, for --help."""
    rows: list[tuple[str, str, str, Any]] = []
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            rows += [(f"{f.name}.{p}", e, h, d) for p, e, h, d in describe(typ)]  # type: ignore[arg-type]
        else:
            rows.append((f.name, f.metadata.get("env", ""), f.metadata.get("help", ""), f.default))
    return rows


def settings_epilog(cls: type) -> str:
    """The ``--help`` epilog listing every environment variable of ``cls``."""
    rows = [(env, path, help_) for path, env, help_, _d in describe(cls) if env]
    width = max(len(env) for env, _p, _h in rows) + 2
    lines = ["settings (flag > environment variable > --config file > default):"]
    lines += [f"  {env:{width}}{path:26} {help_}" for env, path, help_ in rows]
    return "\n".join(lines)


def as_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-friendly dump (for the admin port's /config)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = as_dict(value)
        elif isinstance(value, Path):
            out[f.name] = str(value)
        else:
            out[f.name] = value
    return out


def split_host_port(address: str, source: str = "address") -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` → (host, port), with a clear error."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"{source}={address!r}: expected host:port")
    return host.strip("[]"), int(port)
