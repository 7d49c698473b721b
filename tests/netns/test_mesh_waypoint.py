"""Issue 9 through real agents and a real waypoint process, in network namespaces.

    node1: client (demo), web-v2 (demo)
    node2: web-v1 (demo), waypoint demo/wp
    Service web.demo 10.96.0.30:80 -> 8080; namespace demo uses waypoint wp.

The client's agent sends traffic for web to the waypoint (HBONE), the waypoint
applies the namespace's L7 configuration and forwards over HBONE to the chosen
endpoint's agent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import require_root
from tests.netns.mesh_fixtures import Mesh, eventually, running_mesh, world_of
from ztunnel_py.demo.configdir import ObjectRef
from ztunnel_py.demo.world import AMBIENT, DemoPod, DemoService, DemoWaypoint, ServicePortDef

WEB_VIP = "10.96.0.30"

WORLD = world_of(
    {"demo": {**AMBIENT, "istio.io/use-waypoint": "wp"}},
    [
        DemoPod("client", "demo", "node1", "client", "v1", "client"),
        DemoPod("web-v1", "demo", "node2", "web", "v1", "web"),
        DemoPod("web-v2", "demo", "node1", "web", "v2", "web"),
    ],
    [DemoService("web", "demo", WEB_VIP, {"app": "web"}, (ServicePortDef("http", 80, 8080),))],
    [DemoWaypoint("wp", "demo", "node2")],
)

SUBSETS = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "DestinationRule",
    "metadata": {"name": "web", "namespace": "demo"},
    "spec": {"host": "web", "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                       {"name": "v2", "labels": {"version": "v2"}}]},
}


def virtual_service(http: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "web", "namespace": "demo"},
        "spec": {"hosts": ["web"], "http": http},
    }


@pytest.fixture(scope="module")
def mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Mesh]:
    require_root()
    with running_mesh(request.node.nodeid, WORLD, tmp_path_factory.mktemp("wp-mesh")) as m:
        yield m


@pytest.fixture
def routing(mesh: Mesh) -> Iterator[list[ObjectRef]]:
    """Objects a test applies; removed afterwards."""
    applied: list[ObjectRef] = []
    yield applied
    for ref in applied:
        mesh.delete(ref)


def served_by(mesh: Mesh, headers: dict[str, str] | None = None) -> str:
    extra = [a for k, v in (headers or {}).items() for a in ("-H", f"{k}: {v}")]
    res = mesh.curl("client", mesh.vip_url("web"), extra=extra)
    assert res.status == 200, res
    return res.header("x-served-by") or ""


def test_header_match_through_the_waypoint(mesh: Mesh, routing: list[ObjectRef]) -> None:
    routing.append(mesh.apply(SUBSETS))
    routing.append(mesh.apply(virtual_service([
        {"match": [{"headers": {"end-user": {"exact": "jason"}}}],
         "route": [{"destination": {"host": "web", "subset": "v2"}}]},
        {"route": [{"destination": {"host": "web", "subset": "v1"}}]},
    ])))
    eventually(lambda: served_by(mesh, {"end-user": "jason"}).startswith("web-v2")
               and served_by(mesh).startswith("web-v1"), 15, "the route reached the waypoint")
    assert {served_by(mesh, {"end-user": "jason"}) for _ in range(5)} == {"web-v2/v2"}
    assert {served_by(mesh) for _ in range(5)} == {"web-v1/v1"}
