"""Capture decisions and bookkeeping, over the fake node and the dict-backed maps."""

from __future__ import annotations

import pytest

from ztunnel_py.redirect.capture import (
    DEFAULT_POLICY_ROUTE,
    EARLY_DEMUX,
    Capture,
    CaptureError,
    Ports,
    node_dir_name,
)
from ztunnel_py.redirect.maps import CaptureMaps, CaptureSettings
from ztunnel_py.redirect.node import FakeNodeNet
from ztunnel_py.redirect.plan import diff, enrolled_pods
from ztunnel_py.state.model import Workload
from ztunnel_py.state.snapshot import Snapshot


def wl(name: str, ip: str, node: str = "n1", enrolled: bool = True, **kw: object) -> Workload:
    return Workload(uid=f"ns/{name}", name=name, namespace="ns", service_account="sa",
                    node=node, ips=(ip,), enrolled=enrolled, **kw)  # type: ignore[arg-type]


def snap(*workloads: Workload) -> Snapshot:
    return Snapshot(workloads=workloads)


# -- plan ---------------------------------------------------------------------


def test_enrolled_pods_are_this_nodes_enrolled_ipv4_non_waypoints() -> None:
    s = snap(
        wl("a", "10.0.0.2"),
        wl("b", "10.0.0.3", enrolled=False),
        wl("c", "10.0.1.2", node="n2"),
        wl("wp", "10.0.0.4", is_waypoint=True),
        wl("v6", "fd00::2"),
    )
    assert enrolled_pods(s, "n1") == {"10.0.0.2": "ns/a"}


def test_diff_puts_new_moved_and_unattached_pods() -> None:
    plan = diff(current={"10.0.0.2": 5, "10.0.0.3": 6, "10.0.0.9": 9},
                desired={"10.0.0.2": 5, "10.0.0.3": 7, "10.0.0.4": 8},
                attached={5, 6, 9})
    assert dict(plan.put) == {"10.0.0.3": 7, "10.0.0.4": 8}
    assert plan.drop == {"10.0.0.9"}
    assert plan.detach == {6, 9}


def test_diff_reattaches_a_veth_that_lost_its_programs() -> None:
    plan = diff(current={"10.0.0.2": 5}, desired={"10.0.0.2": 5}, attached=set())
    assert dict(plan.put) == {"10.0.0.2": 5}
    assert not plan.drop and not plan.detach


def test_diff_of_equal_states_is_empty() -> None:
    assert diff({"10.0.0.2": 5}, {"10.0.0.2": 5}, {5}).empty


# -- Capture over fakes ---------------------------------------------------------


def make(net: FakeNodeNet, maps: CaptureMaps | None = None) -> tuple[Capture, CaptureMaps]:
    maps = maps or CaptureMaps.fake()
    cap = Capture("n1", ports=Ports(1, 2, 3), agent_mark=0x42, net=net, maps=maps)
    return cap, maps


def test_install_writes_config_routes_and_attaches_the_underlay() -> None:
    net = FakeNodeNet(underlay=2, addresses={"127.0.0.1", "172.30.0.11"})
    cap, maps = make(net)
    cap.install()
    assert maps.config.get() == CaptureSettings(0x42, DEFAULT_POLICY_ROUTE.mark, "0.0.0.0", 1, 2, 3)
    assert maps.node_ips.items() == {"127.0.0.1", "172.30.0.11"}
    assert net.routes == {DEFAULT_POLICY_ROUTE}
    assert net.filters == {(2, "ingress"): "zt_underlay_in"}
    assert net.sysctls == {EARLY_DEMUX: "0"}


def test_reconcile_before_install_says_so() -> None:
    cap, _ = make(FakeNodeNet())
    with pytest.raises(CaptureError, match="install"):
        cap.reconcile(snap())


def test_enroll_writes_the_map_before_attaching_and_unenroll_detaches_first() -> None:
    net = FakeNodeNet(veths={"10.0.0.2": 10, "10.0.0.3": 11})
    cap, maps = make(net)
    cap.install()
    order: list[str] = []
    real_put, real_remove = maps.pods.put, maps.pods.remove
    maps.pods.put = lambda ip, i: (order.append(f"map+{ip}"), real_put(ip, i))[1]  # type: ignore[method-assign]
    maps.pods.remove = lambda ip: (order.append(f"map-{ip}"), real_remove(ip))[1]  # type: ignore[method-assign]
    real_attach, real_detach = net.attach, net.detach
    net.attach = lambda i, h, fd: (order.append(f"attach {h.name}@{i}"), real_attach(i, h, fd))[1]  # type: ignore[method-assign]
    net.detach = lambda i, h: (order.append(f"detach {h.name}@{i}"), real_detach(i, h))[1]  # type: ignore[method-assign]

    r = cap.reconcile(snap(wl("a", "10.0.0.2"), wl("b", "10.0.0.3", enrolled=False)))
    assert r.enrolled == ("10.0.0.2",) and r.added == ("10.0.0.2",)
    assert order == ["map+10.0.0.2", "attach zt_pod_ingress@10", "attach zt_pod_egress@10"]
    assert net.sysctls["accept_local/10"] == "1"
    assert maps.pod_stats.get("10.0.0.2") is not None
    assert (11, "ingress") not in net.filters

    order.clear()
    r = cap.reconcile(snap(wl("a", "10.0.0.2", enrolled=False)))
    assert r.removed == ("10.0.0.2",) and r.enrolled == ()
    assert order == ["detach zt_pod_ingress@10", "detach zt_pod_egress@10", "map-10.0.0.2"]
    assert maps.pods.items() == {} and maps.pod_stats.items() == {}
    assert net.filters == {(2, "ingress"): "zt_underlay_in"}


def test_reconcile_is_idempotent_and_reports_pods_without_a_local_veth() -> None:
    net = FakeNodeNet(veths={"10.0.0.2": 10, "10.0.1.5": 2})  # 10.0.1.5 routes via the underlay
    cap, _ = make(net)
    cap.install()
    first = cap.reconcile(snap(wl("a", "10.0.0.2"), wl("b", "10.0.1.5"), wl("c", "10.0.0.7")))
    assert first.unresolved == ("10.0.0.7", "10.0.1.5")
    net.log.clear()
    second = cap.reconcile(snap(wl("a", "10.0.0.2"), wl("b", "10.0.1.5"), wl("c", "10.0.0.7")))
    assert second.added == () and second.removed == ()
    assert net.log == []


def test_restart_adopts_what_the_kernel_holds() -> None:
    net = FakeNodeNet(veths={"10.0.0.2": 10})
    maps = CaptureMaps.fake()
    first, _ = make(net, maps)
    first.install()
    first.reconcile(snap(wl("a", "10.0.0.2")))
    first.close()
    # a new agent process: same pinned maps, same filters
    second, _ = make(net, maps)
    second.install()
    assert second.enrolled() == {"10.0.0.2": 10}
    net.log.clear()
    second.reconcile(snap(wl("a", "10.0.0.2")))
    assert net.log == []  # nothing re-attached, nothing disturbed


def test_a_moved_pod_follows_its_new_veth() -> None:
    net = FakeNodeNet(veths={"10.0.0.2": 10})
    cap, maps = make(net)
    cap.install()
    cap.reconcile(snap(wl("a", "10.0.0.2")))
    net.veths["10.0.0.2"] = 12  # pod recreated with the same IP
    cap.reconcile(snap(wl("a", "10.0.0.2")))
    assert maps.pods.items() == {"10.0.0.2": 12}
    assert (10, "ingress") not in net.filters
    assert net.filters[(12, "egress")] == "zt_pod_egress"


def test_counters_name_pods_by_workload() -> None:
    net = FakeNodeNet(veths={"10.0.0.2": 10})
    cap, _ = make(net)
    cap.install()
    cap.reconcile(snap(wl("a", "10.0.0.2")))
    counters = cap.counters()
    assert counters["pods"]["10.0.0.2"]["uid"] == "ns/a"
    assert counters["pods"]["10.0.0.2"]["dropped"] == 0
    assert counters["reasons"]["drop_no_listener"] == 0


def test_uninstall_removes_filters_route_and_restores_early_demux() -> None:
    net = FakeNodeNet(veths={"10.0.0.2": 10, "10.0.0.3": 11})
    cap, _ = make(net)
    cap.install()
    cap.reconcile(snap(wl("a", "10.0.0.2"), wl("b", "10.0.0.3")))
    cap.uninstall()
    assert net.filters == {}
    assert net.routes == set()
    assert net.sysctls[EARLY_DEMUX] == "1"
    assert net.sysctls["accept_local/10"] == net.sysctls["accept_local/11"] == "0"


def test_node_dir_names_are_bpffs_safe() -> None:
    assert node_dir_name("ip-10-0-0-1.ec2.internal") == "ip-10-0-0-1_ec2_internal"
    with pytest.raises(CaptureError, match="NODE_NAME"):
        node_dir_name("")
