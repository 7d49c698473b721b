"""Network-namespace tier: each test gets its own topology prefix and cleanup.

def test_x(topology):
    topo = topology(TopologySpec.simple(2, 2))   # prefix replaced by the test's own
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import require_root
from ztunnel_py.topology import Topology, TopologySpec, leftovers, prefix_for, sweep


@pytest.fixture
def netns_prefix(request: pytest.FixtureRequest) -> str:
    """A prefix derived from the test id: parallel tests never share one, and a
    re-run of a test after a crash finds (and sweeps) its own leftovers."""
    require_root()
    return prefix_for(request.node.nodeid)


@pytest.fixture
def topology(netns_prefix: str) -> Iterator[Callable[[TopologySpec], Topology]]:
    """Build topologies with the test's prefix; torn down at the end, pass or fail."""
    built: list[Topology] = []

    def build(spec: TopologySpec) -> Topology:
        suffix = "" if not built else str(len(built))
        topo = Topology.build(dataclasses.replace(spec, prefix=netns_prefix + suffix))
        built.append(topo)
        return topo

    yield build
    errors = []
    for topo in built:
        try:
            topo.teardown()
        except Exception as exc:
            errors.append(str(exc))
            sweep(topo.prefix)
        left = leftovers(topo.prefix)
        if left:
            errors.append(f"{topo.prefix}: left behind {left}")
    if errors:
        pytest.fail("topology teardown: " + "; ".join(errors))
