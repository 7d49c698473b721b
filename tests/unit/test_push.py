"""The controller's sans-IO push bookkeeping, driven without sockets."""

from __future__ import annotations

from ztunnel_py.controller.push import PushCore
from ztunnel_py.state.client import UpdateApplier, UpdateRejected, WireUpdate
from ztunnel_py.state.codec import CODEC_VERSION
from ztunnel_py.state.model import Endpoint, Service, ServicePort, Workload
from ztunnel_py.state.routing import DestinationRule
from ztunnel_py.state.snapshot import Snapshot


def wl(name: str, ip: str) -> Workload:
    return Workload(f"demo/{name}", name, "demo", "sa", "n1", (ip,))


def snap(*workloads: Workload, routing: tuple[object, ...] = ()) -> Snapshot:
    svc = Service("web", "demo", "web.demo.svc.cluster.local", ("10.96.0.1",),
                  (ServicePort(80, 8080),),
                  tuple(Endpoint(w.uid, w.ips[0]) for w in workloads))
    return Snapshot(workloads=workloads, services=(svc,), routing=routing)


def wire(update) -> WireUpdate:  # type: ignore[no-untyped-def]
    return WireUpdate(update.version, update.base_version, CODEC_VERSION, update.root_namespace,
                      update.upserts, update.removals)


def test_full_on_connect_then_shared_deltas_after_ack() -> None:
    core = PushCore(epoch="e")
    assert core.publish(snap(wl("a", "10.0.0.1"))) == []
    first = core.connect(1, "n1", "agent")
    second = core.connect(2, "n2", "agent")
    assert first is not None and first.full and first.version == "e-1"
    assert second is first  # computed once, shared
    assert {k for k, _key, _b in first.upserts} == {"workload", "service"}
    # a change while both are in flight is sent after their ACKs
    assert core.publish(snap(wl("a", "10.0.0.1"), wl("b", "10.0.0.2"))) == []
    d1, d2 = core.ack(1, "e-1"), core.ack(2, "e-1")
    assert d1 is not None and d1 is d2
    assert d1.base_version == "e-1" and d1.version == "e-2"
    assert sorted((k, key) for k, key, _b in d1.upserts) == [("service", "demo/web"),
                                                           ("workload", "demo/b")]
    assert core.ack(1, "e-2") is None
    assert [a.acked_version for a in core.agents()] == ["e-2", "e-1"]


def test_idle_agents_get_the_delta_at_publish_and_removals() -> None:
    core = PushCore(epoch="e")
    core.publish(snap(wl("a", "10.0.0.1"), wl("b", "10.0.0.2")))
    core.connect(1, "n1", "agent")
    core.ack(1, "e-1")
    sends = core.publish(snap(wl("a", "10.0.0.1")))
    ((stream, update),) = sends
    assert stream == 1 and update.removals == (("workload", "demo/b"),)


def test_unchanged_model_makes_no_version() -> None:
    core = PushCore(epoch="e")
    core.publish(snap(wl("a", "10.0.0.1")))
    core.connect(1, "n1", "agent")
    core.ack(1, "e-1")
    assert core.publish(snap(wl("a", "10.0.0.1"))) == []
    latest = core.latest
    assert latest is not None and latest.version == "e-1"


def test_agents_do_not_get_routing_but_waypoints_do() -> None:
    core = PushCore(epoch="e")
    core.publish(snap(wl("a", "10.0.0.1"), routing=(DestinationRule("dr", "demo", "web"),)))
    agent, waypoint = core.connect(1, "n1", "agent"), core.connect(2, "wp", "waypoint")
    assert agent is not None and waypoint is not None
    assert "destination_rule" not in {k for k, _, _ in agent.upserts}
    assert "destination_rule" in {k for k, _, _ in waypoint.upserts}


def test_nacked_delta_is_followed_by_a_full_snapshot_and_nacked_full_waits() -> None:
    core = PushCore(epoch="e")
    core.publish(snap(wl("a", "10.0.0.1")))
    core.connect(1, "n1", "agent")
    core.ack(1, "e-1")
    ((_, delta),) = core.publish(snap(wl("b", "10.0.0.2")))
    assert not delta.full
    resync = core.nack(1, "e-2", "delta applies to version 'x'")
    assert resync is not None and resync.full and resync.version == "e-2"
    assert core.nack(1, "e-2", "bad content") is None  # the same full again would fail
    (state,) = core.agents()
    assert state.last_nack == ("e-2", "bad content") and state.nacks == 2
    assert state.acked_version == ""
    ((_, full),) = core.publish(snap(wl("c", "10.0.0.3")))  # a new version is tried
    assert full.full and full.version == "e-3"


def test_reconnect_with_known_version_gets_delta_unknown_gets_full() -> None:
    core = PushCore(epoch="e")
    core.publish(snap(wl("a", "10.0.0.1")))
    core.publish(snap(wl("b", "10.0.0.2")))
    assert core.connect(1, "n1", "agent", last_version="e-2") is None  # already current
    again = core.connect(2, "n2", "agent", last_version="e-1")
    assert again is not None and again.base_version == "e-1"
    other_epoch = core.connect(3, "n3", "agent", last_version="old-7")
    assert other_epoch is not None and other_epoch.full


def test_stale_ack_is_ignored_and_disconnect_forgets() -> None:
    core = PushCore(epoch="e")
    core.publish(snap(wl("a", "10.0.0.1")))
    core.connect(1, "n1", "agent")
    assert core.ack(1, "e-99") is None
    assert core.agents()[0].acked_version == ""
    core.disconnect(1)
    assert core.agents() == []
    assert core.ack(1, "e-1") is None


def test_versions_round_trip_through_the_agent_applier() -> None:
    core = PushCore(epoch="e")
    applier = UpdateApplier()
    core.publish(snap(wl("a", "10.0.0.1")))
    first = core.connect(1, "n1", "agent")
    assert first is not None
    s1 = applier.apply(wire(first))
    assert [w.name for w in s1.workloads] == ["a"] and s1.version == "e-1"
    core.ack(1, "e-1")
    ((_, delta),) = core.publish(snap(wl("b", "10.0.0.2")))
    s2 = applier.apply(wire(delta))
    assert [w.name for w in s2.workloads] == ["b"]
    assert s2.service_for("10.96.0.1", 80) is not None
    assert s2.by_ip["10.0.0.2"].name == "b"


def test_applier_refuses_bad_updates_and_keeps_what_it_holds() -> None:
    core = PushCore(epoch="e")
    applier = UpdateApplier()
    core.publish(snap(wl("a", "10.0.0.1")))
    first = core.connect(1, "n1", "agent")
    assert first is not None
    applier.apply(wire(first))
    good = wire(first)
    cases = {
        "base": WireUpdate("e-9", "e-8", CODEC_VERSION, "", (), ()),
        "codec": WireUpdate("e-9", "", CODEC_VERSION + 1, "", (), ()),
        "decode": WireUpdate("e-9", "e-1", CODEC_VERSION, "", (("workload", "x", b"{"),), ()),
        "dangling": WireUpdate("e-9", "e-1", CODEC_VERSION, "", (),
                               (("workload", "demo/a"),)),
        "duplicate": WireUpdate("e-9", "", CODEC_VERSION, "", good.upserts + good.upserts[:1],
                                ()),
    }
    messages = {}
    for name, update in cases.items():
        try:
            applier.apply(update)
        except UpdateRejected as exc:
            messages[name] = str(exc)
        assert applier.version == "e-1"
    assert "holds 'e-1'" in messages["base"]
    assert "codec version" in messages["codec"]
    assert "not JSON" in messages["decode"]
    assert "names workload 'demo/a'" in messages["dangling"]
    assert "twice" in messages["duplicate"]
    assert len(messages) == len(cases)


def test_delta_snapshots_equal_snapshots_built_from_scratch() -> None:
    import random

    rng = random.Random(7)
    core = PushCore(epoch="e")
    applier = UpdateApplier()
    pods = {i: wl(f"p{i}", f"10.0.0.{i}") for i in range(20)}

    def model() -> Snapshot:
        services = tuple(
            Service(f"s{j}", "demo", f"s{j}.demo.svc.cluster.local", (f"10.96.0.{j}",),
                    (ServicePort(80 + j, 8080),),
                    tuple(Endpoint(w.uid, w.ips[0]) for i, w in sorted(pods.items())
                          if i % 3 == j % 3))
            for j in range(6 if len(pods) % 2 else 5)
        )
        return Snapshot(workloads=tuple(pods.values()), services=services)

    core.publish(model())
    update = core.connect(1, "n1", "agent")
    for _step in range(30):
        assert update is not None
        got = applier.apply(wire(update))
        scratch = Snapshot(workloads=got.workloads, services=got.services,
                           version=got.version)
        for index in ("by_uid", "by_ip", "by_vip_port", "by_vip", "by_service_key"):
            assert getattr(got, index) == getattr(scratch, index), index
        assert {w.uid for w in got.workloads} == {w.uid for w in pods.values()}
        core.ack(1, got.version)
        # move, add or remove a pod
        i = rng.randrange(25)
        if i in pods and rng.random() < 0.4:
            del pods[i]
        else:
            pods[i] = wl(f"p{i}", f"10.0.{rng.randrange(1, 3)}.{i}")
        sends = core.publish(model())
        update = sends[0][1] if sends else None
        if update is None:
            update = core.update(got.version, got.version, "agent")


def test_applier_pauses_collection_only_while_it_works() -> None:
    import gc

    import pytest

    core = PushCore(epoch="e")
    core.publish(snap(wl("a", "10.0.0.1")))
    first = core.connect(1, "n1", "agent")
    assert first is not None
    bad = WireUpdate("e-9", "", CODEC_VERSION, "", (("workload", "x", b"{"),), ())
    assert gc.isenabled()
    for applier in (UpdateApplier(), UpdateApplier(settle=True)):
        applier.apply(wire(first))
        assert gc.isenabled()
        with pytest.raises(UpdateRejected, match="not JSON"):
            applier.apply(bad)
        assert gc.isenabled() and applier.version == "e-1"
    gc.disable()
    try:
        UpdateApplier().apply(wire(first))
        assert not gc.isenabled()  # someone else's choice is kept
    finally:
        gc.enable()
        gc.unfreeze()  # settle=True parked this test process's heap
