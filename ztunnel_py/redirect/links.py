"""Where things are in the node's network namespace, found with netlink.

A pod's host-side veth is the output interface of the route to its IP, which
holds in the namespace topology and on a real node alike (CNIs install a /32
route per local pod). The underlay interface is the one carrying the default
route, else the first route through a gateway, else the first non-loopback
interface with a subnet address (not a /32), unless named.
"""

from __future__ import annotations

import socket
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError


class DiscoveryError(LookupError):
    """An interface the capture needs could not be found."""


def ifindex_of(ipr: Any, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise DiscoveryError(f"no interface {name!r} in this network namespace")
    return int(found[0])


def node_addresses(ipr: Any) -> set[str]:
    """Every IPv4 address the node holds (pods' traffic to these is not captured)."""
    return {
        str(a.get_attr("IFA_ADDRESS") or a.get_attr("IFA_LOCAL"))
        for a in ipr.get_addr(family=socket.AF_INET)
    }


def route_oif(ipr: Any, ip: str) -> int | None:
    """The output interface of the route to ``ip``, or None (no route)."""
    try:
        routes = ipr.route("get", dst=ip)
    except NetlinkError:
        return None
    for r in routes:
        oif = r.get_attr("RTA_OIF")
        if oif is not None:
            return int(oif)
    return None


def pod_veth(ipr: Any, ip: str, not_on: set[int]) -> int | None:
    """The host-side veth of the local pod ``ip``; None if its route leaves the node."""
    oif = route_oif(ipr, ip)
    if oif is None or oif in not_on:
        return None
    return oif


def underlay_ifindex(ipr: Any, name: str | None = None) -> int:
    if name:
        return ifindex_of(ipr, name)
    gateway_oif: int | None = None
    for r in ipr.get_routes(family=socket.AF_INET, table=254):
        oif = r.get_attr("RTA_OIF")
        if oif is None:
            continue
        if r["dst_len"] == 0:
            return int(oif)
        if gateway_oif is None and r.get_attr("RTA_GATEWAY"):
            gateway_oif = int(oif)
    if gateway_oif is not None:
        return gateway_oif
    lo = set(ipr.link_lookup(ifname="lo"))
    for a in ipr.get_addr(family=socket.AF_INET):
        if a["index"] not in lo and a["prefixlen"] < 32:
            return int(a["index"])
    raise DiscoveryError(
        "cannot tell the underlay interface: no default route, no route via a gateway and "
        "no subnet address; name it explicitly"
    )
