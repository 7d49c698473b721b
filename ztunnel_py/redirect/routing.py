"""The policy routing the transparent listeners need, and nothing else (no iptables).

A steered packet keeps its original destination (a remote pod or VIP), so the
node would forward it; the programs mark it, and one rule sends marked packets
to a table whose only route says "everything is local":

    ip rule add fwmark <route_mark> lookup <table> pref <priority>
    ip route add local 0.0.0.0/0 dev lo table <table>
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

RTN_LOCAL = 2
RT_SCOPE_HOST = 254


@dataclass(frozen=True)
class PolicyRoute:
    mark: int
    table: int
    priority: int


class RoutingError(OSError):
    """The policy route could not be installed or removed."""


def _lo(ipr: Any) -> int:
    found = ipr.link_lookup(ifname="lo")
    if not found:
        raise RoutingError(errno.ENODEV, "no loopback interface in this network namespace")
    return int(found[0])


def _rules(ipr: Any, pr: PolicyRoute) -> list[Any]:
    return [
        r for r in ipr.get_rules(family=socket.AF_INET)
        if r.get_attr("FRA_PRIORITY") == pr.priority
        and r.get_attr("FRA_FWMARK") == pr.mark
        and (r.get_attr("FRA_TABLE") or r["table"]) == pr.table
    ]


def install(ipr: Any, pr: PolicyRoute) -> None:
    """Idempotent: adds the rule and the route if they are missing."""
    try:
        ipr.route("replace", dst="0.0.0.0/0", type=RTN_LOCAL, scope=RT_SCOPE_HOST,
                  oif=_lo(ipr), table=pr.table, family=socket.AF_INET)
        if not _rules(ipr, pr):
            ipr.rule("add", family=socket.AF_INET, fwmark=pr.mark, fwmask=0xFFFFFFFF,
                     table=pr.table, priority=pr.priority)
    except NetlinkError as exc:
        raise RoutingError(exc.code, f"policy route {pr}: {exc}") from None


def installed(ipr: Any, pr: PolicyRoute) -> bool:
    if not _rules(ipr, pr):
        return False
    routes = ipr.get_routes(family=socket.AF_INET, table=pr.table)
    return any(r["type"] == RTN_LOCAL and r["dst_len"] == 0 for r in routes)


def remove(ipr: Any, pr: PolicyRoute) -> None:
    for _ in _rules(ipr, pr):
        try:
            ipr.rule("del", family=socket.AF_INET, fwmark=pr.mark, fwmask=0xFFFFFFFF,
                     table=pr.table, priority=pr.priority)
        except NetlinkError as exc:
            if exc.code != errno.ENOENT:
                raise RoutingError(exc.code, f"remove rule {pr}: {exc}") from None
    try:
        ipr.route("del", dst="0.0.0.0/0", type=RTN_LOCAL, scope=RT_SCOPE_HOST,
                  oif=_lo(ipr), table=pr.table, family=socket.AF_INET)
    except NetlinkError as exc:
        if exc.code not in (errno.ESRCH, errno.ENOENT):
            raise RoutingError(exc.code, f"remove route {pr}: {exc}") from None
