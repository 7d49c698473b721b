"""Attach and detach the capture programs with tc (clsact + a direct-action bpf filter).

Our filters are found by their name (the hook's), at one priority and handle,
so attaching is a ``replace`` (an atomic program swap on restart or upgrade),
detaching never touches another tool's filters, and the state of a node can be
read back from the kernel after an agent restart.
"""

from __future__ import annotations

import contextlib
import errno
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from ztunnel_py.redirect.hooks import Hook

FILTER_PRIO = 0x2D1  # ours, on each clsact hook
FILTER_HANDLE = 1
ETH_P_ALL = 0x0003
PARENT = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}


class AttachError(OSError):
    """tc refused an attach or detach; the message names the interface."""


def ensure_clsact(ipr: Any, ifindex: int) -> None:
    try:
        ipr.tc("add", "clsact", ifindex)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise AttachError(exc.code, f"add clsact on ifindex {ifindex}: {exc}") from None


def attach(ipr: Any, ifindex: int, hook: Hook, prog_fd: int) -> None:
    """Attach (or atomically replace) ``hook`` on ``ifindex``."""
    ensure_clsact(ipr, ifindex)
    try:
        ipr.tc(
            "replace-filter", "bpf", ifindex, FILTER_HANDLE,
            fd=prog_fd, name=hook.name, parent=PARENT[hook.direction],
            prio=FILTER_PRIO, protocol=ETH_P_ALL, direct_action=True,
        )
    except NetlinkError as exc:
        raise AttachError(
            exc.code, f"attach {hook.name} ({hook.direction}) on ifindex {ifindex}: {exc}"
        ) from None


def detach(ipr: Any, ifindex: int, hook: Hook) -> bool:
    """Remove ``hook`` from ``ifindex``; False if it was not there (or the link is gone)."""
    if hook.name not in attached(ipr, ifindex, hook.direction):
        return False
    try:
        ipr.tc(
            "del-filter", "bpf", ifindex, FILTER_HANDLE,
            parent=PARENT[hook.direction], prio=FILTER_PRIO, protocol=ETH_P_ALL,
        )
    except NetlinkError as exc:
        if exc.code in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            return False
        raise AttachError(exc.code, f"detach {hook.name} from ifindex {ifindex}: {exc}") from None
    return True


def attached(ipr: Any, ifindex: int, direction: str) -> set[str]:
    """Names of the bpf filters on ``ifindex``'s clsact ``direction`` (any tool's)."""
    try:
        msgs = ipr.get_filters(index=ifindex, parent=PARENT[direction])
    except NetlinkError as exc:
        if exc.code in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            return set()
        raise AttachError(exc.code, f"list filters on ifindex {ifindex}: {exc}") from None
    names: set[str] = set()
    for msg in msgs:
        if msg.get_attr("TCA_KIND") != "bpf":
            continue
        options = msg.get_attr("TCA_OPTIONS")
        name = options.get_attr("TCA_BPF_NAME") if options is not None else None
        if name:
            names.add(str(name))
    return names


def remove_clsact_if_empty(ipr: Any, ifindex: int) -> None:
    """Drop the clsact qdisc when no filter is left on it (ours were the only users)."""
    if attached(ipr, ifindex, "ingress") or attached(ipr, ifindex, "egress"):
        return
    with contextlib.suppress(NetlinkError):
        ipr.tc("del", "clsact", ifindex)
