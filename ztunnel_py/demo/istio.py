"""Istio objects as the YAML users write (plain mappings), for the demo's story and tests.

    virtual_service("reviews", "bookinfo", ["reviews"], [{"route": [route_to("reviews", "v1")]}])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

NETWORKING = "networking.istio.io/v1"


def virtual_service(name: str, namespace: str, hosts: Sequence[str],
                    http: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": NETWORKING,
        "kind": "VirtualService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"hosts": list(hosts), "http": [dict(h) for h in http]},
    }


def destination_rule(name: str, namespace: str, host: str, *, versions: Sequence[str] = (),
                     traffic_policy: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A DestinationRule with a subset per version (by the ``version`` label) and/or a
    top-level traffic policy."""
    spec: dict[str, Any] = {"host": host}
    if versions:
        spec["subsets"] = [{"name": v, "labels": {"version": v}} for v in versions]
    if traffic_policy is not None:
        spec["trafficPolicy"] = dict(traffic_policy)
    return {
        "apiVersion": NETWORKING,
        "kind": "DestinationRule",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def route_to(host: str, subset: str | None = None, weight: int | None = None) -> dict[str, Any]:
    """One entry of an http route's ``route`` list."""
    dest: dict[str, Any] = {"host": host}
    if subset:
        dest["subset"] = subset
    return {"destination": dest} if weight is None else {"destination": dest, "weight": weight}
