"""``outbound.plan``: the pure routing decision for captured connections."""

from __future__ import annotations

import pytest

from ztunnel_py.proxy import outbound
from ztunnel_py.proxy.inbound import Accept, Refuse, decide, guess_service
from ztunnel_py.proxy.outbound import Local, Passthrough, Reject, Tunnel, plan
from ztunnel_py.state.model import (
    Endpoint,
    FrozenMap,
    Service,
    ServicePort,
    WaypointRef,
    Workload,
)
from ztunnel_py.state.snapshot import Snapshot


def wl(name: str, ip: str, node: str, *, enrolled: bool = True, **kw: object) -> Workload:
    return Workload(
        uid=f"ns/{name}", name=name, namespace="ns", service_account=name, node=node,
        ips=(ip,), enrolled=enrolled, **kw,  # type: ignore[arg-type]
    )


CLIENT = wl("client", "10.0.1.1", "n1")
SERVER1 = wl("server1", "10.0.2.1", "n2", named_ports=FrozenMap({"http": 8080}))
SERVER2 = wl("server2", "10.0.2.2", "n2")
SICK = wl("sick", "10.0.2.3", "n2", healthy=False)
LOCAL = wl("local", "10.0.1.2", "n1")
LEGACY = wl("legacy", "10.0.3.1", "n3", enrolled=False)
WP = wl("wp-abc", "10.0.4.1", "n3", is_waypoint=True)

SVC = Service(
    name="svc", namespace="ns", hostname="svc.ns.svc.cluster.local", vips=("10.96.0.10",),
    ports=(ServicePort(80, 8080),),
    endpoints=(
        Endpoint("ns/server1", "10.0.2.1", FrozenMap({80: 8080})),
        Endpoint("ns/server2", "10.0.2.2", FrozenMap({80: 9090})),
        Endpoint("ns/sick", "10.0.2.3", FrozenMap({80: 8080})),
        Endpoint("ns/gone", "10.0.2.9", FrozenMap({80: 8080}), ready=False),
    ),
)
NAMED = Service(
    name="named", namespace="ns", hostname="named.ns.svc.cluster.local", vips=("10.96.0.11",),
    ports=(ServicePort(80, "http"),),
    endpoints=(Endpoint("ns/server1", "10.0.2.1"),),
)
EMPTY = Service(
    name="empty", namespace="ns", hostname="empty.ns.svc.cluster.local", vips=("10.96.0.12",),
    ports=(ServicePort(80, 80),), endpoints=(Endpoint("ns/sick", "10.0.2.3"),),
)
WP_SVC = Service(
    name="wp", namespace="ns", hostname="wp.ns.svc.cluster.local", vips=("10.96.0.20",),
    ports=(ServicePort(15008, 15008),), endpoints=(Endpoint("ns/wp-abc", "10.0.4.1"),),
)
WAYPOINTED = Service(
    name="waypointed", namespace="ns", hostname="waypointed.ns.svc.cluster.local",
    vips=("10.96.0.13",), ports=(ServicePort(80, 8080),),
    endpoints=(Endpoint("ns/server1", "10.0.2.1", FrozenMap({80: 8080})),),
    waypoint=WaypointRef("wp", "ns"),
)

SNAP = Snapshot(
    workloads=(CLIENT, SERVER1, SERVER2, SICK, LOCAL, LEGACY, WP),
    services=(SVC, NAMED, EMPTY, WP_SVC, WAYPOINTED),
)


def test_pod_ip_on_another_node_is_tunnelled_with_both_identities() -> None:
    route = plan(("10.0.2.1", 8080), CLIENT, SNAP, "n1")
    assert route == Tunnel(
        ("10.0.2.1", 15008), "10.0.2.1:8080", CLIENT.identity, SERVER1.identity, SERVER1
    )


def test_service_vip_picks_healthy_endpoints_round_robin_and_translates_ports() -> None:
    routes = [plan(("10.96.0.10", 80), CLIENT, SNAP, "n1", rr=i) for i in range(4)]
    assert all(isinstance(r, Tunnel) for r in routes)
    targets = [r.authority for r in routes if isinstance(r, Tunnel)]
    # never the unhealthy or not-ready endpoints; alternating between the two healthy ones
    assert targets == ["10.0.2.1:8080", "10.0.2.2:9090", "10.0.2.1:8080", "10.0.2.2:9090"]
    assert routes[1].dst_identity == SERVER2.identity  # type: ignore[union-attr]
    assert routes[0].service == SVC  # type: ignore[union-attr]


def test_named_target_port_resolves_through_the_workload() -> None:
    route = plan(("10.96.0.11", 80), CLIENT, SNAP, "n1")
    assert isinstance(route, Tunnel) and route.authority == "10.0.2.1:8080"


def test_service_without_healthy_endpoints_is_rejected() -> None:
    route = plan(("10.96.0.12", 80), CLIENT, SNAP, "n1")
    assert isinstance(route, Reject) and "no healthy endpoints" in route.reason


def test_destination_outside_the_mesh_is_passthrough() -> None:
    assert plan(("10.0.3.1", 5432), CLIENT, SNAP, "n1") == Passthrough(("10.0.3.1", 5432))
    assert plan(("93.184.216.34", 443), CLIENT, SNAP, "n1") == Passthrough(
        ("93.184.216.34", 443)
    )


def test_same_node_destination_is_local() -> None:
    assert plan(("10.0.1.2", 80), CLIENT, SNAP, "n1") == Local(("10.0.1.2", 80), LOCAL)


def test_waypoint_gets_the_original_address() -> None:
    route = plan(("10.96.0.13", 80), CLIENT, SNAP, "n1")
    assert isinstance(route, Tunnel) and route.via_waypoint
    assert route.dial == ("10.0.4.1", 15008)
    assert route.authority == "10.96.0.13:80"
    assert route.dst_identity == WP.identity


def test_workload_waypoint_and_no_loop_from_the_waypoint_itself() -> None:
    server = wl("server3", "10.0.2.4", "n2", waypoint=WaypointRef("wp", "ns"))
    snap = Snapshot(workloads=(*SNAP.workloads, server), services=SNAP.services)
    route = plan(("10.0.2.4", 80), CLIENT, snap, "n1")
    assert isinstance(route, Tunnel) and route.via_waypoint and route.dial[0] == "10.0.4.1"
    from_wp = plan(("10.0.2.4", 80), WP, snap, "n3")
    assert isinstance(from_wp, Tunnel) and not from_wp.via_waypoint
    assert from_wp.dial == ("10.0.2.4", 15008)


def test_unknown_source_is_rejected_and_unenrolled_source_passes_through() -> None:
    assert isinstance(plan(("10.0.2.1", 80), None, SNAP, "n1"), Reject)
    assert plan(("10.0.2.1", 80), LEGACY, SNAP, "n3") == Passthrough(("10.0.2.1", 80))


def test_plan_is_pure() -> None:
    a = plan(("10.96.0.10", 80), CLIENT, SNAP, "n1", rr=7)
    b = plan(("10.96.0.10", 80), CLIENT, SNAP, "n1", rr=7)
    assert a == b


def test_inbound_decide_only_accepts_the_served_local_workload() -> None:
    served = SERVER1.identity
    assert decide("10.0.2.1:8080", SNAP, "n2", served) == Accept(SERVER1, ("10.0.2.1", 8080))
    for authority, why in [
        ("10.0.2.2:8080", "but this connection was made to"),  # local, other identity
        ("10.0.1.1:80", "not a mesh workload on node"),  # another node's workload
        ("10.0.3.1:80", "not a mesh workload on node"),  # not enrolled
        ("1.1.1.1:53", "not a mesh workload on node"),  # the internet
        ("svc:80", "does not name an IP"),
    ]:
        got = decide(authority, SNAP, "n2", served)
        assert isinstance(got, Refuse) and got.status == 400 and why in got.reason, authority


def test_guess_service_is_the_first_service_targeting_the_port_and_follows_swaps() -> None:
    # SVC and WAYPOINTED both front server1:8080: the first in snapshot order wins
    assert guess_service(SNAP, SERVER1, 8080) is SVC
    assert guess_service(SNAP, SERVER2, 9090) is SVC
    assert guess_service(SNAP, SERVER1, 9090) is None  # no Service targets that port
    assert guess_service(SNAP, LOCAL, 8080) is None  # not an endpoint of any Service
    # a new snapshot (swapped whole) is indexed afresh, never answered from the old one
    swapped = Snapshot(workloads=SNAP.workloads, services=(WAYPOINTED, SVC))
    assert guess_service(swapped, SERVER1, 8080) is WAYPOINTED
    assert guess_service(swapped, SERVER2, 9090) is SVC
    assert guess_service(SNAP, SERVER1, 8080) is SVC


def test_facts_are_the_workloads_and_follow_a_new_object() -> None:
    labelled = wl("api", "10.0.5.1", "n2", labels=FrozenMap({"app": "api", "version": "v7"}))
    f = outbound.facts(labelled)
    assert (f.identity, f.app, f.version) == (labelled.identity, "api", "v7")
    assert f.baggage == ("k8s.namespace.name=ns,k8s.pod.name=api,service.name=api,"
                         "service.version=v7")
    assert outbound.facts(labelled) is f  # remembered
    peer = outbound.peer_of(labelled, "10.0.5.1:80", SVC)
    assert (peer.workload, peer.namespace, peer.principal, peer.app, peer.version,
            peer.service) == ("api", "ns", labelled.identity, "api", "v7", SVC.hostname)
    # the next snapshot's object for the same uid (relabelled): facts made afresh
    relabelled = wl("api", "10.0.5.1", "n2", labels=FrozenMap({"app": "api", "version": "v8"}))
    assert outbound.facts(relabelled).version == "v8"
    assert outbound.facts(relabelled).workload is relabelled


def test_facts_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbound, "_FACTS_MAX", 8)
    for i in range(50):
        outbound.facts(wl(f"w{i}", f"10.0.6.{i}", "n1"))
        assert len(outbound._facts) <= 8
