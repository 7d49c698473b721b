"""What the capture should look like for a snapshot: pure decisions, no I/O.

:func:`enrolled_pods` picks the pods to capture from the frozen snapshot;
:func:`diff` compares that with what the maps and filters hold now and says
what to add and remove. :class:`~ztunnel_py.redirect.capture.Capture` does it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from ztunnel_py.state.snapshot import Snapshot


def enrolled_pods(snapshot: Snapshot, node: str) -> dict[str, str]:
    """IPv4 of each enrolled pod on ``node`` -> its workload uid.

    Waypoints speak HBONE themselves and are never captured.
    """
    out: dict[str, str] = {}
    for w in snapshot.workloads_on(node):
        if not w.enrolled or w.is_waypoint:
            continue
        for ip in w.ips:
            if ipaddress.ip_address(ip).version == 4:
                out[ip] = w.uid
    return out


@dataclass(frozen=True)
class CapturePlan:
    put: Mapping[str, int]  # pod ip -> veth ifindex: write the map entry, attach
    drop: frozenset[str]  # pod ips whose map entries go
    detach: frozenset[int]  # veths that no longer carry an enrolled pod

    @property
    def empty(self) -> bool:
        return not self.put and not self.drop and not self.detach


def diff(
    current: Mapping[str, int],
    desired: Mapping[str, int],
    attached: frozenset[int] | set[int],
) -> CapturePlan:
    """From (pods map now, pods wanted, veths carrying our programs) to the changes.

    A pod is (re)put when its entry is missing or points at another veth, or
    when its veth lost the programs (recreated, or never attached).
    """
    put = {
        ip: ifindex for ip, ifindex in desired.items()
        if current.get(ip) != ifindex or ifindex not in attached
    }
    drop = frozenset(ip for ip in current if ip not in desired)
    wanted = set(desired.values())
    detach = frozenset(i for i in set(attached) | set(current.values()) if i not in wanted)
    return CapturePlan(put=put, drop=drop, detach=detach)
