"""Nodes and pods made of network namespaces, for the tests and the demo.

One underlay bridge in its own netns joins N node namespaces; each pod is a
namespace with a veth to its node. Every name carries a per-run prefix;
:func:`sweep` removes what a crashed run left behind. Facts about the result
(:class:`Node`, :class:`Pod`, :class:`Underlay`) are plain frozen dataclasses.
"""

from ztunnel_py.topology.builder import TeardownError, Topology
from ztunnel_py.topology.host import CommandError, ProcessRecord, TopologyError, cgroup2_root
from ztunnel_py.topology.spec import (
    Layout,
    Node,
    NodeSpec,
    Pod,
    PodSpec,
    SpecError,
    TopologySpec,
    Underlay,
    new_prefix,
    plan,
    prefix_for,
)
from ztunnel_py.topology.sweep import leftovers, sweep

__all__ = [
    "CommandError",
    "Layout",
    "Node",
    "NodeSpec",
    "Pod",
    "PodSpec",
    "ProcessRecord",
    "SpecError",
    "TeardownError",
    "Topology",
    "TopologyError",
    "TopologySpec",
    "Underlay",
    "cgroup2_root",
    "leftovers",
    "new_prefix",
    "plan",
    "prefix_for",
    "sweep",
]
