"""``ztunnel-py ctl``: the operator's view of a running agent or controller.

In the spirit of ``istioctl ztunnel-config``::

    ztunnel-py ctl workloads                  # table, from the agent on this node
    ztunnel-py ctl policies -o yaml
    ztunnel-py ctl --admin 127.0.0.1:15000 certs -o json
    ztunnel-py ctl --controller-admin services -n default

It reads JSON from the admin HTTP port (loopback only): an agent's
(``--admin``, default 127.0.0.1:15000) or the controller's
(``--controller-admin``, default 127.0.0.1:15010).

JSON shapes expected from the admin endpoints (field names are the model's,
``ztunnel_py.state.model``; enums by value; mappings as objects):

``GET /config_dump`` (agent and controller)::

    {"version": "42",
     "root_namespace": "istio-system",            # optional
     "workloads": [{"uid", "name", "namespace", "service_account", "node",
                    "ips": [...], "trust_domain", "labels": {...}, "enrolled",
                    "waypoint": {"name", "namespace"} | null, "healthy",
                    "is_waypoint", ...}],
     "services": [{"name", "namespace", "hostname", "vips": [...],
                   "ports": [{"port", "target_port", "name", "protocol", ...}],
                   "endpoints": [{"workload_uid", "address", "ports": {...}, "ready"}],
                   "waypoint": {...} | null}],
     "authorization_policies": [{"name", "namespace", "action": "ALLOW",
                                 "selector": {...} | null, "target_refs": [...],
                                 "rules": [{"sources": [...], "operations": [...],
                                            "conditions": [...]}], "provider"}],
     "peer_authentications": [{"name", "namespace", "selector": {...} | null,
                               "mode": "STRICT", "port_level": {"8080": "PERMISSIVE"}}]}

(a list may also be an object keyed by uid/key: its values are used; the
singular keys of ``ztunnel_py.state.codec.snapshot_to_json`` — ``workload``,
``service``, ``authorization_policy``, ``peer_authentication`` — are read too,
and a field left out takes the model's default, as the codec omits defaults.)

``GET /certs`` (agent)::

    [{"identity": "spiffe://...", "serial": "1f...", "not_before": <ISO-8601 or Unix>,
      "not_after": <ISO-8601 or Unix>, "rotate_in_s": 3600.0}]

``GET /connections`` (agent): a list of open connections as
``ztunnel_py.telemetry.accesslog.connection_json`` makes them
(``direction``, ``src``/``dst`` peers with ``address``, ``workload``,
``namespace``, ``principal``..., ``security``, ``bytes_sent``,
``bytes_received``, ``duration_s``, ``result``...).

``-o json`` prints valid JSON (the resource list, or the whole dump for
``config-dump``); ``-o yaml`` the same as YAML; ``-o table`` aligned columns.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TextIO

import yaml

from ztunnel_py.config import ADMIN_PORT, CONTROLLER_ADMIN_PORT

DEFAULT_ADMIN = f"127.0.0.1:{ADMIN_PORT}"
DEFAULT_CONTROLLER_ADMIN = f"127.0.0.1:{CONTROLLER_ADMIN_PORT}"
DEFAULT_ROOT_NAMESPACE = "istio-system"


class CtlError(Exception):
    """The admin endpoint could not be read; the message says what to try."""


# The admin port is on loopback: never send its requests through an HTTP(S)_PROXY.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# -- fetching --------------------------------------------------------------------------


def fetch(address: str, path: str, timeout_s: float = 5.0) -> Any:
    """GET ``path`` from the admin server at ``address`` (host:port) and decode its JSON."""
    url = f"http://{address}{path}"
    try:
        with _OPENER.open(url, timeout=timeout_s) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise CtlError(
                f"{address} has no {path} endpoint: is it the right admin port "
                "(agent 15000, controller 15010)? certs and connections are agent-only"
            ) from None
        raise CtlError(f"GET {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CtlError(
            f"cannot reach the admin port at {address}: {reason}; is the agent (or controller) "
            "running on this node? The admin port listens on loopback only: run ctl on the "
            "node, or pass --admin / --controller-admin"
        ) from None
    try:
        return json.loads(body)
    except ValueError as exc:
        raise CtlError(f"GET {url}: the answer is not JSON ({exc})") from None


# -- shaping ---------------------------------------------------------------------------


def items(value: Any) -> list[dict[str, Any]]:
    """A JSON list of objects, or the values of an object keyed by id."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        value = list(value.values())
    if not isinstance(value, list):
        raise CtlError(f"expected a list of objects, got {type(value).__name__}")
    return [v for v in value if isinstance(v, dict)]


# config_dump key -> the codec's singular key for the same list
_KIND_KEYS = {
    "workloads": "workload",
    "services": "service",
    "authorization_policies": "authorization_policy",
    "peer_authentications": "peer_authentication",
}


def kind(dump: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    """One resource list of a config dump, under its plural or the codec's singular key."""
    value = dump.get(key)
    if value is None:
        value = dump.get(_KIND_KEYS[key])
    return items(value)


def _ns_filter(rows: list[dict[str, Any]], namespace: str | None) -> list[dict[str, Any]]:
    if not namespace:
        return rows
    return [r for r in rows if r.get("namespace") == namespace]


def _sorted(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (str(r.get("namespace", "")), str(r.get("name", ""))))


def _waypoint(value: Any) -> str:
    if isinstance(value, Mapping) and value.get("name"):
        return f"{value.get('namespace', '')}/{value['name']}".lstrip("/")
    return "None"


def _when(value: Any) -> dt.datetime | None:
    if isinstance(value, (int, float)):
        return dt.datetime.fromtimestamp(float(value), dt.UTC)
    if isinstance(value, str) and value:
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
    return None


def _iso(value: Any) -> str:
    when = _when(value)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ") if when else str(value or "")


def policy_scope(policy: Mapping[str, Any], root_namespace: str) -> str:
    """Global / Namespace / WorkloadSelector like ztunnel's config dump; Waypoint if attached."""
    if policy.get("target_refs"):
        return "Waypoint"
    if policy.get("selector") is not None:
        return "WorkloadSelector"
    if policy.get("namespace") == root_namespace:
        return "Global"
    return "Namespace"


# -- tables ----------------------------------------------------------------------------

Row = Sequence[str]


def table(header: Row, rows: Iterable[Row]) -> str:
    all_rows = [list(header), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in all_rows
    ]
    return "\n".join(lines) + "\n"


def workload_rows(rows: list[dict[str, Any]]) -> tuple[Row, list[Row]]:
    header = ("NAMESPACE", "POD NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL")
    out: list[Row] = [
        (
            str(w.get("namespace", "")),
            str(w.get("name", "")),
            ",".join(w.get("ips") or []) or "None",
            str(w.get("node", "")),
            _waypoint(w.get("waypoint")),
            "HBONE" if w.get("enrolled") else "TCP",
        )
        for w in _sorted(rows)
    ]
    return header, out


def service_rows(rows: list[dict[str, Any]]) -> tuple[Row, list[Row]]:
    header = ("NAMESPACE", "SERVICE NAME", "SERVICE VIP", "PORTS", "WAYPOINT", "ENDPOINTS")
    out: list[Row] = []
    for s in _sorted(rows):
        endpoints = items(s.get("endpoints"))
        ready = sum(1 for e in endpoints if e.get("ready", True))
        ports = ",".join(str(p.get("port")) for p in items(s.get("ports")))
        out.append(
            (
                str(s.get("namespace", "")),
                str(s.get("name", "")),
                ",".join(s.get("vips") or []) or "None",
                ports or "None",
                _waypoint(s.get("waypoint")),
                f"{ready}/{len(endpoints)}",
            )
        )
    return header, out


def policy_rows(dump: Mapping[str, Any], namespace: str | None) -> tuple[Row, list[Row]]:
    root = str(dump.get("root_namespace") or DEFAULT_ROOT_NAMESPACE)
    header = ("NAMESPACE", "POLICY NAME", "KIND", "ACTION", "SCOPE", "RULES")
    out: list[Row] = []
    for p in _sorted(_ns_filter(kind(dump, "authorization_policies"), namespace)):
        out.append(
            (
                str(p.get("namespace", "")),
                str(p.get("name", "")),
                "AuthorizationPolicy",
                str(p.get("action", "ALLOW")),
                policy_scope(p, root),
                str(len(p.get("rules") or [])),
            )
        )
    for p in _sorted(_ns_filter(kind(dump, "peer_authentications"), namespace)):
        ports = p.get("port_level") or {}
        mode = str(p.get("mode", "UNSET"))
        if ports:
            mode += " (" + ",".join(f"{k}:{v}" for k, v in sorted(ports.items())) + ")"
        scope = "WorkloadSelector" if p.get("selector") else (
            "Global" if p.get("namespace") == root else "Namespace"
        )
        out.append(
            (str(p.get("namespace", "")), str(p.get("name", "")), "PeerAuthentication", mode,
             scope, "-")
        )
    return header, out


def cert_rows(rows: list[dict[str, Any]], now: dt.datetime | None = None) -> tuple[Row, list[Row]]:
    now = now or dt.datetime.now(dt.UTC)
    header = ("CERTIFICATE NAME", "STATUS", "VALID", "SERIAL NUMBER", "NOT AFTER", "NOT BEFORE")
    out: list[Row] = []
    for c in sorted(rows, key=lambda r: str(r.get("identity", ""))):
        not_before, not_after = _when(c.get("not_before")), _when(c.get("not_after"))
        valid = bool(not_before and not_after and not_before <= now < not_after)
        out.append(
            (
                str(c.get("identity", "")),
                "Active" if valid else "Expired" if not_after and now >= not_after else "Pending",
                str(valid).lower(),
                str(c.get("serial", "")),
                _iso(c.get("not_after")),
                _iso(c.get("not_before")),
            )
        )
    return header, out


def connection_rows(rows: list[dict[str, Any]]) -> tuple[Row, list[Row]]:
    header = ("DIRECTION", "SOURCE", "SOURCE IDENTITY", "DESTINATION", "DESTINATION IDENTITY",
              "SECURITY", "SENT", "RECEIVED", "AGE")
    out: list[Row] = []
    for c in sorted(rows, key=lambda r: -float(r.get("duration_s") or 0)):
        src, dst = c.get("src") or {}, c.get("dst") or {}
        out.append(
            (
                str(c.get("direction", "")),
                str(src.get("address", "")),
                str(src.get("principal", "")) or "-",
                str(dst.get("address", "")),
                str(dst.get("principal", "")) or "-",
                str(c.get("security", "")),
                str(c.get("bytes_sent", 0)),
                str(c.get("bytes_received", 0)),
                f"{float(c.get('duration_s') or 0):.1f}s",
            )
        )
    return header, out


# -- commands --------------------------------------------------------------------------


RESOURCES: dict[str, tuple[str, str]] = {
    # name: (endpoint, help)
    "workloads": ("/config_dump", "workloads known to the agent"),
    "services": ("/config_dump", "services and their endpoints"),
    "policies": ("/config_dump", "AuthorizationPolicies and PeerAuthentications"),
    "certs": ("/certs", "certificates held by the agent (agent only)"),
    "connections": ("/connections", "connections open now (agent only)"),
    "config-dump": ("/config_dump", "the whole configuration snapshot"),
}


def select(resource: str, data: Any, namespace: str | None) -> tuple[Any, Callable[[], str]]:
    """The JSON-able view of ``resource`` in ``data`` and a function rendering it as a table."""
    if resource == "config-dump":
        if not isinstance(data, Mapping):
            raise CtlError("config_dump: expected a JSON object")
        summary = {
            k: len(kind(data, k)) for k in _KIND_KEYS
        }
        return data, lambda: table(
            ("VERSION", *(k.upper() for k in summary)),
            [(str(data.get("version", "")), *(str(v) for v in summary.values()))],
        )
    if resource in ("workloads", "services", "policies") and not isinstance(data, Mapping):
        raise CtlError("config_dump: expected a JSON object")
    if resource == "workloads":
        rows = _sorted(_ns_filter(kind(data, "workloads"), namespace))
        return rows, lambda: table(*workload_rows(rows))
    if resource == "services":
        rows = _sorted(_ns_filter(kind(data, "services"), namespace))
        return rows, lambda: table(*service_rows(rows))
    if resource == "policies":
        view = {
            "authorization_policies": _sorted(
                _ns_filter(kind(data, "authorization_policies"), namespace)
            ),
            "peer_authentications": _sorted(
                _ns_filter(kind(data, "peer_authentications"), namespace)
            ),
        }
        return view, lambda: table(*policy_rows(data, namespace))
    if resource == "certs":
        rows = items(data)
        return rows, lambda: table(*cert_rows(rows))
    if resource == "connections":
        rows = items(data)
        if namespace:
            rows = [
                r for r in rows
                if namespace in ((r.get("src") or {}).get("namespace"),
                                 (r.get("dst") or {}).get("namespace"))
            ]
        return rows, lambda: table(*connection_rows(rows))
    raise CtlError(f"unknown resource {resource!r}")


def render(resource: str, data: Any, output: str, namespace: str | None = None) -> str:
    view, as_table = select(resource, data, namespace)
    if output == "json":
        return json.dumps(view, indent=2, sort_keys=False) + "\n"
    if output == "yaml":
        return str(yaml.safe_dump(view, sort_keys=False, default_flow_style=False))
    return as_table()


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    resource = args.ctl_command
    if args.controller_admin is not None:
        address = args.controller_admin
        if resource in ("certs", "connections"):
            print(f"ztunnel-py ctl: {resource} is only served by an agent (--admin)",
                  file=sys.stderr)
            return 2
    else:
        address = args.admin
    output = args.output or ("json" if resource == "config-dump" else "table")
    try:
        data = fetch(address, RESOURCES[resource][0], args.timeout)
        out.write(render(resource, data, output, args.namespace))
    except CtlError as exc:
        print(f"ztunnel-py ctl: {exc}", file=sys.stderr)
        return 1
    return 0


def _target_args(parser: argparse.ArgumentParser, *, top: bool) -> None:
    default = argparse.SUPPRESS
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--admin", metavar="HOST:PORT", default=DEFAULT_ADMIN if top else default,
        help=f"agent admin address (default {DEFAULT_ADMIN})",
    )
    target.add_argument(
        "--controller-admin", metavar="HOST:PORT", nargs="?", const=DEFAULT_CONTROLLER_ADMIN,
        default=None if top else default,
        help=f"read from the controller's admin port instead (default {DEFAULT_CONTROLLER_ADMIN})",
    )
    parser.add_argument(
        "--timeout", type=float, metavar="SECONDS", default=5.0 if top else default,
        help="seconds to wait for the admin port (default 5)",
    )


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "ctl",
        help="inspect a running agent or controller (workloads, services, policies, certs...)",
        description=(
            "The operator's view of a running agent (admin port, loopback only) or "
            "controller, in the spirit of istioctl ztunnel-config."
        ),
    )
    _target_args(parser, top=True)
    sub = parser.add_subparsers(dest="ctl_command", metavar="RESOURCE", required=True)
    for name, (_path, help_text) in RESOURCES.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        _target_args(sp, top=False)
        sp.add_argument("-o", "--output", choices=("json", "yaml", "table"), default=None,
                        help="output format (default table; json for config-dump)")
        sp.add_argument("-n", "--namespace", default=None, help="only this namespace")
        sp.set_defaults(func=run)
