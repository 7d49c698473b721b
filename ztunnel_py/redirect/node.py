"""The node's network namespace as the capture sees it: one seam over netlink.

:class:`NodeNet` wraps pyroute2 (in the current namespace, or a named one);
unit tests use :class:`FakeNodeNet`, which keeps the same facts in dicts.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading
from pathlib import Path
from typing import Protocol

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ztunnel_py.redirect import links, routing, tc
from ztunnel_py.redirect.hooks import Hook
from ztunnel_py.redirect.routing import PolicyRoute


class NodeNetApi(Protocol):
    def underlay(self) -> int: ...
    def addresses(self) -> set[str]: ...
    def pod_veth(self, ip: str, not_on: set[int]) -> int | None: ...
    def loopback(self) -> int: ...
    def attach(self, ifindex: int, hook: Hook, prog_fd: int) -> None: ...
    def detach(self, ifindex: int, hook: Hook) -> bool: ...
    def links_with(self, hook: Hook) -> set[int]: ...
    def tidy(self, ifindex: int) -> None: ...
    def install_route(self, pr: PolicyRoute) -> None: ...
    def remove_route(self, pr: PolicyRoute) -> None: ...
    def sysctl(self, key: str, value: str) -> None: ...
    def accept_local(self, ifindex: int, on: bool) -> None: ...
    def close(self) -> None: ...


CLONE_NEWNET = 0x40000000


def write_sysctl(key: str, value: str, netns: str | None = None) -> None:
    """``sysctl -w key=value`` in ``netns`` (a thread joins it; the caller stays put)."""
    path = Path("/proc/sys") / key.replace(".", "/")
    if netns is None:
        path.write_text(value)
        return
    errors: list[BaseException] = []

    def run() -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
            path.write_text(value)
        except BaseException as exc:  # reported to the caller below
            errors.append(exc)
        finally:
            os.close(fd)

    # The thread ends inside the namespace; it is never reused.
    t = threading.Thread(target=run, name=f"sysctl-{netns}")
    t.start()
    t.join()
    if errors:
        raise errors[0]


class NodeNet:
    def __init__(self, netns: str | None = None, underlay: str | None = None) -> None:
        # flags=0: never create a namespace by accident
        self._ipr = IPRoute(netns=netns, flags=0) if netns else IPRoute()
        self._netns = netns
        self._underlay_name = underlay

    def underlay(self) -> int:
        return links.underlay_ifindex(self._ipr, self._underlay_name)

    def addresses(self) -> set[str]:
        return links.node_addresses(self._ipr)

    def pod_veth(self, ip: str, not_on: set[int]) -> int | None:
        return links.pod_veth(self._ipr, ip, not_on)

    def loopback(self) -> int:
        return links.ifindex_of(self._ipr, "lo")

    def attach(self, ifindex: int, hook: Hook, prog_fd: int) -> None:
        tc.attach(self._ipr, ifindex, hook, prog_fd)

    def detach(self, ifindex: int, hook: Hook) -> bool:
        return tc.detach(self._ipr, ifindex, hook)

    def links_with(self, hook: Hook) -> set[int]:
        return {
            int(link["index"]) for link in self._ipr.get_links()
            if hook.name in tc.attached(self._ipr, int(link["index"]), hook.direction)
        }

    def tidy(self, ifindex: int) -> None:
        tc.remove_clsact_if_empty(self._ipr, ifindex)

    def install_route(self, pr: PolicyRoute) -> None:
        routing.install(self._ipr, pr)

    def remove_route(self, pr: PolicyRoute) -> None:
        routing.remove(self._ipr, pr)

    def sysctl(self, key: str, value: str) -> None:
        write_sysctl(key, value, self._netns)

    def accept_local(self, ifindex: int, on: bool) -> None:
        """The agent's HBONE to a local pod is turned back in with the node's source."""
        try:
            found = self._ipr.get_links(ifindex)
        except NetlinkError:
            return  # the veth is gone with its pod
        if not found:
            return
        name = found[0].get_attr("IFLA_IFNAME")
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile
            write_sysctl(f"net.ipv4.conf.{name}.accept_local", "1" if on else "0", self._netns)

    def close(self) -> None:
        self._ipr.close()


class FakeNodeNet:
    """Dict-backed twin: routes are ``veths`` (pod ip -> ifindex), filters are sets."""

    def __init__(self, veths: dict[str, int] | None = None, underlay: int = 2,
                 addresses: set[str] | None = None) -> None:
        self.veths = dict(veths or {})
        self.underlay_index = underlay
        self.node_addrs = set(addresses or {"127.0.0.1"})
        self.filters: dict[tuple[int, str], str] = {}  # (ifindex, direction) -> hook name
        self.routes: set[PolicyRoute] = set()
        self.sysctls: dict[str, str] = {}
        self.log: list[tuple[str, int, str]] = []

    def underlay(self) -> int:
        return self.underlay_index

    def addresses(self) -> set[str]:
        return set(self.node_addrs)

    def pod_veth(self, ip: str, not_on: set[int]) -> int | None:
        ifindex = self.veths.get(ip)
        return None if ifindex is None or ifindex in not_on else ifindex

    def loopback(self) -> int:
        return 1

    def attach(self, ifindex: int, hook: Hook, prog_fd: int) -> None:
        self.filters[(ifindex, hook.direction)] = hook.name
        self.log.append(("attach", ifindex, hook.name))

    def detach(self, ifindex: int, hook: Hook) -> bool:
        if self.filters.get((ifindex, hook.direction)) != hook.name:
            return False
        del self.filters[(ifindex, hook.direction)]
        self.log.append(("detach", ifindex, hook.name))
        return True

    def links_with(self, hook: Hook) -> set[int]:
        return {i for (i, d), name in self.filters.items() if name == hook.name}

    def tidy(self, ifindex: int) -> None:
        pass

    def install_route(self, pr: PolicyRoute) -> None:
        self.routes.add(pr)

    def remove_route(self, pr: PolicyRoute) -> None:
        self.routes.discard(pr)

    def sysctl(self, key: str, value: str) -> None:
        self.sysctls[key] = value

    def accept_local(self, ifindex: int, on: bool) -> None:
        self.sysctls[f"accept_local/{ifindex}"] = "1" if on else "0"

    def close(self) -> None:
        pass
