"""The topology's pure planning: names, addresses, limits."""

from __future__ import annotations

import pytest

from ztunnel_py.topology import Layout, NodeSpec, PodSpec, SpecError, TopologySpec, plan, prefix_for
from ztunnel_py.topology.spec import IFNAMSIZ, with_pod, without_pod


def test_two_by_two_layout_names_and_addresses() -> None:
    lay = plan(TopologySpec.simple(2, 2, prefix="zt0abc12"))
    assert lay.underlay.netns == "zt0abc12-ul"
    n1, n2 = lay.nodes
    assert (n1.netns, n1.underlay_ip, n1.underlay_iface) == (
        "zt0abc12-node1",
        "172.30.0.11",
        "zt0abc12u1",
    )
    assert (n2.pod_cidr, n2.pod_gateway) == ("10.244.2.0/24", "10.244.2.1")
    pods = {p.name: p for p in lay.pods}
    assert pods["node2-pod2"].ip == "10.244.2.3"
    assert pods["node2-pod2"].node == "node2"
    assert pods["node2-pod2"].netns == "zt0abc12-node2-pod2"
    assert len({p.host_veth for p in lay.pods}) == 4
    assert all(len(p.host_veth) <= IFNAMSIZ for p in lay.pods)
    assert lay.node_of("node1-pod2") == n1
    assert [p.name for p in lay.pods_on("node1")] == ["node1-pod1", "node1-pod2"]
    assert lay.netns_names()[-1] == "zt0abc12-ul"


def test_labels_merge_app_and_version_and_layout_round_trips() -> None:
    spec = TopologySpec(
        (NodeSpec("n1", (PodSpec("web", "shop", "web-sa", {"tier": "front"}, "web", "v2"),)),),
        prefix="ztx1",
    )
    lay = plan(spec)
    web = lay.pod("web")
    assert dict(web.labels) == {"tier": "front", "app": "web", "version": "v2"}
    assert (web.app, web.version, web.namespace, web.service_account) == (
        "web",
        "v2",
        "shop",
        "web-sa",
    )
    assert Layout.from_dict(lay.to_dict()) == lay


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (TopologySpec((NodeSpec("n1"),), prefix="Bad!"), "prefix"),
        (TopologySpec((), prefix="ztok"), "at least one node"),
        (TopologySpec((NodeSpec("n1", (PodSpec("n1"),)),), prefix="ztok"), "used twice"),
        (TopologySpec((NodeSpec("Node_1"),), prefix="ztok"), "node name"),
    ],
)
def test_bad_specs_say_why(spec: TopologySpec, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        plan(spec)


def test_interface_names_never_exceed_ifnamsiz() -> None:
    # The 10001st pod's host veth would be "zt12345678p10000" (16 characters).
    nodes = tuple(
        NodeSpec(f"n{n}", tuple(PodSpec(f"n{n}-p{j}") for j in range(250))) for n in range(41)
    )
    many = TopologySpec(nodes, prefix="zt12345678")
    with pytest.raises(SpecError, match="longer than 15"):
        plan(many)


def test_prefix_for_is_stable_and_distinct() -> None:
    assert prefix_for("tests/a.py::t1") == prefix_for("tests/a.py::t1")
    assert prefix_for("tests/a.py::t1") != prefix_for("tests/a.py::t2")


def test_with_pod_takes_the_next_free_ip_and_veth_number() -> None:
    lay = plan(TopologySpec.simple(2, 2, prefix="zt0abc12"))
    gone = without_pod(lay, "node1-pod1")
    more = with_pod(gone, "node1", PodSpec("late", "shop"))
    late = more.pod("late")
    assert late.ip == "10.244.1.2"  # the address node1-pod1 gave back
    assert late.host_veth == "zt0abc12p4"  # never a name a just-deleted pod may still hold
    assert late.node == "node1" and late.namespace == "shop"
    with pytest.raises(SpecError, match="already used"):
        with_pod(more, "node2", PodSpec("late"))
    with pytest.raises(KeyError):
        with_pod(lay, "node9", PodSpec("x"))
