"""Issue 9's acceptance through real agents and a real waypoint process, in network namespaces.

    node1: client (demo), web-v2 (demo)
    node2: web-v1 (demo), waypoint demo/wp
    namespace demo uses waypoint wp (``istio.io/use-waypoint`` on the namespace)

    service  VIP          port -> pod port  endpoints       what answers there
    web      10.96.0.30   80 -> 8080        web-v1, web-v2  the demo's HTTP service
    flaky    10.96.0.31   80 -> 8081        web-v1          503 to every other request
    outlier  10.96.0.32   80 -> 8082        web-v1, web-v2  v1: 500 to everything; v2: 200
    slow     10.96.0.33   80 -> 8083        web-v1          200 after 1 s
    mirror   10.96.0.34   80 -> 8084        web-v1, web-v2  v1: 200; v2: 200 after 1 s
    echo     10.96.0.35   50051 (grpc)      web-v1          the demo.Echo gRPC service

The client's agent captures its connection (eBPF), sees the namespace's
waypoint and tunnels it there (HBONE); the waypoint applies the L7
configuration and tunnels each request to the chosen endpoint's agent. The
misbehaving backends (``tests.netns.waypoint_tools``) log every request they
answer, which is how a test counts what an endpoint received. Each test
applies its own routing objects (names unique to the test), waits until the
waypoint's ``/config_dump`` shows them, and removes them afterwards.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_root
from tests.netns.mesh_fixtures import Mesh, eventually, metric_sum, running_mesh, world_of
from tests.netns.waypoint_tools import http_command, tool
from ztunnel_py.demo import istio
from ztunnel_py.demo.configdir import ObjectRef
from ztunnel_py.demo.world import AMBIENT, DemoPod, DemoService, DemoWaypoint, ServicePortDef

NS = "demo"
WP = DemoWaypoint("wp", NS, "node2")
VIPS = {"web": "10.96.0.30", "flaky": "10.96.0.31", "outlier": "10.96.0.32",
        "slow": "10.96.0.33", "mirror": "10.96.0.34", "echo": "10.96.0.35"}
V1 = {"app": "web", "version": "v1"}
ALL = {"app": "web"}
FLAKY_PORT, BROKEN_PORT, SLOW_PORT, MIRROR_PORT, GRPC_PORT = 8081, 8082, 8083, 8084, 50051


def _http(name: str, selector: dict[str, str], target_port: int) -> DemoService:
    return DemoService(name, NS, VIPS[name], selector, (ServicePortDef("http", 80, target_port),))


WORLD = world_of(
    {NS: {**AMBIENT, "istio.io/use-waypoint": WP.name}},
    [
        DemoPod("client", NS, "node1", "client", "v1", "client"),
        DemoPod("web-v1", NS, "node2", "web", "v1", "web"),
        DemoPod("web-v2", NS, "node1", "web", "v2", "web"),
    ],
    [
        _http("web", ALL, 8080),
        _http("flaky", V1, FLAKY_PORT),
        _http("outlier", ALL, BROKEN_PORT),
        _http("slow", V1, SLOW_PORT),
        _http("mirror", ALL, MIRROR_PORT),
        DemoService("echo", NS, VIPS["echo"], V1, (ServicePortDef("grpc", GRPC_PORT, GRPC_PORT),)),
    ],
    [WP],
)

# What each web pod serves besides the demo service (waypoint_tools http --serve specs).
BACKENDS = {
    "web-v1": (f"{FLAKY_PORT}:fail-every=2:fail-status=503", f"{BROKEN_PORT}:status=500",
               f"{SLOW_PORT}:delay=1", f"{MIRROR_PORT}"),
    "web-v2": (f"{BROKEN_PORT}", f"{MIRROR_PORT}:delay=1"),
}


def url(service: str, path: str = "/") -> str:
    port = GRPC_PORT if service == "echo" else 80
    return f"http://{VIPS[service]}:{port}{path}"


@pytest.fixture(scope="module")
def mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Mesh]:
    require_root()
    with running_mesh(request.node.nodeid, WORLD, tmp_path_factory.mktemp("wp-mesh")) as m:
        for pod, specs in BACKENDS.items():
            version = WORLD.pod(pod).version
            m.start_tool(pod, http_command(pod, version, *specs), f"{pod}-backends",
                         [int(s.split(":")[0]) for s in specs])
        m.start_tool("web-v1", tool("grpc-server", str(GRPC_PORT)), "web-v1-grpc", [GRPC_PORT])
        yield m


# -- what the waypoint and the backends say ----------------------------------------------------


def waypoint_dump(mesh: Mesh) -> str:
    """The waypoint's ``/config_dump`` (routes per service, DestinationRules, policies,
    clusters with their ejected endpoints), as JSON text."""
    return json.dumps(mesh.config_dump(WP.pod))


def shows(dump: str, obj: dict[str, Any]) -> bool:
    """Whether the waypoint's dump names ``obj`` (a route source, a DestinationRule, a policy)."""
    key = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
    if obj["kind"] == "VirtualService":
        return f'"VirtualService {key}"' in dump
    return f'"{key}"' in dump


class Routing:
    """Objects a test applies; each is in force at the waypoint when ``apply`` returns,
    and gone from it when the test is over."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.applied: list[tuple[ObjectRef, dict[str, Any]]] = []

    def apply(self, *objs: dict[str, Any]) -> None:
        for obj in objs:
            self.applied.append((self.mesh.apply(obj), obj))
        eventually(lambda: all(shows(waypoint_dump(self.mesh), o) for o in objs), 15,
                   f"the waypoint shows {[o['metadata']['name'] for o in objs]}", period=0.2)

    def remove(self, *objs: dict[str, Any]) -> None:
        for ref, obj in list(self.applied):
            if obj in objs:
                self.mesh.delete(ref)
                self.applied.remove((ref, obj))
        eventually(lambda: not any(shows(waypoint_dump(self.mesh), o) for o in objs), 15,
                   f"the waypoint forgot {[o['metadata']['name'] for o in objs]}", period=0.2)

    def clear(self) -> None:
        self.remove(*(obj for _, obj in self.applied))


@pytest.fixture
def routing(mesh: Mesh) -> Iterator[Routing]:
    r = Routing(mesh)
    yield r
    r.clear()


def waypoint_requests(mesh: Mesh, **labels: str) -> float:
    """``istio_requests_total`` as the waypoint reports it, over the series with ``labels``."""
    return metric_sum(mesh.launcher.metrics(WP.pod), "istio_requests_total",
                      reporter="waypoint", **labels)


class BackendLog:
    """The requests a pod's ``waypoint_tools http`` answered on one port (its JSON lines)."""

    def __init__(self, mesh: Mesh, pod: str, port: int) -> None:
        self.path: Path = mesh.logs_dir / f"{pod}-backends.log"
        self.port = port
        self.since = self.path.stat().st_size

    def requests(self) -> list[dict[str, Any]]:
        with self.path.open("rb") as f:
            f.seek(self.since)
            lines = f.read().splitlines()
        out = []
        for raw in lines:
            try:
                line = json.loads(raw)
            except ValueError:
                continue  # a partial last line
            if isinstance(line, dict) and line.get("port") == self.port:
                out.append(line)
        return out


# -- objects -------------------------------------------------------------------------------------


def subsets(host: str, name: str) -> dict[str, Any]:
    return istio.destination_rule(name, NS, host, versions=("v1", "v2"))


def destination_rule(host: str, name: str, traffic_policy: dict[str, Any]) -> dict[str, Any]:
    return istio.destination_rule(name, NS, host, traffic_policy=traffic_policy)


def virtual_service(host: str, name: str, http: list[dict[str, Any]]) -> dict[str, Any]:
    return istio.virtual_service(name, NS, [host], http)


to = istio.route_to


# -- routing: splits and matches -----------------------------------------------------------------


def served_by(mesh: Mesh, headers: dict[str, str] | None = None) -> str:
    extra = [a for k, v in (headers or {}).items() for a in ("-H", f"{k}: {v}")]
    res = mesh.curl("client", mesh.vip_url("web"), extra=extra)
    assert res.status == 200, res
    return res.header("x-served-by") or ""


def test_weighted_split_90_10_over_2000_requests(mesh: Mesh, routing: Routing) -> None:
    routing.apply(subsets("web", "web-split"), virtual_service("web", "web-split", [
        {"route": [to("web", "v1", 90), to("web", "v2", 10)]}]))
    # One curl, one keep-alive connection through client agent -> waypoint: the split is
    # made per request at the waypoint.
    t0 = time.monotonic()
    lines = mesh.curl_each("client", [url("web", "/split/[1-2000]")],
                           "%{http_code} %header{x-served-by}", timeout=240)
    elapsed = time.monotonic() - t0
    counts = Counter(lines)
    print(f"figure: 2000 requests through the waypoint in {elapsed:.1f}s: {dict(counts)}")
    assert sum(counts.values()) == 2000
    assert set(counts) == {"200 web-v1/v1", "200 web-v2/v2"}, counts
    assert abs(counts["200 web-v1/v1"] / 2000 - 0.90) <= 0.03, counts


def test_header_match_through_the_waypoint(mesh: Mesh, routing: Routing) -> None:
    routing.apply(subsets("web", "web-jason"), virtual_service("web", "web-jason", [
        {"match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [to("web", "v2")]},
        {"route": [to("web", "v1")]},
    ]))
    assert {served_by(mesh, {"end-user": "jason"}) for _ in range(5)} == {"web-v2/v2"}
    assert {served_by(mesh, {"end-user": "bob"}) for _ in range(5)} == {"web-v1/v1"}
    assert {served_by(mesh) for _ in range(5)} == {"web-v1/v1"}


# -- faults ---------------------------------------------------------------------------------------


def test_fault_delay_with_route_timeout_gives_504_and_abort_is_counted_fi(
        mesh: Mesh, routing: Routing) -> None:
    routing.apply(virtual_service("web", "web-faults", [
        {"match": [{"headers": {"end-user": {"exact": "jason"}}}],
         "fault": {"delay": {"percentage": {"value": 100.0}, "fixedDelay": "7s"}},
         "timeout": "3s", "route": [to("web")]},
        {"match": [{"uri": {"prefix": "/abort"}}],
         "fault": {"abort": {"percentage": {"value": 100.0}, "httpStatus": 500}},
         "route": [to("web")]},
        {"route": [to("web")]},
    ]))
    fi_before = waypoint_requests(mesh, response_code="500", response_flags="FI")
    ut_before = waypoint_requests(mesh, response_code="504", response_flags="DI,UT")

    t0 = time.monotonic()
    slow = mesh.curl("client", url("web"), max_time=10, extra=["-H", "end-user: jason"])
    elapsed = time.monotonic() - t0
    print(f"figure: delayed request answered {slow.status} after {elapsed:.2f}s")
    assert slow.status == 504, slow
    assert slow.stdout.endswith("upstream request timeout"), slow.stdout
    assert 2.8 <= elapsed < 6.0, elapsed
    assert mesh.curl("client", url("web"), extra=["-H", "end-user: bob"]).status == 200

    aborted = mesh.curl_each("client", [url("web", "/abort/[1-5]")], "%{http_code}")
    assert aborted == ["500"] * 5
    eventually(lambda: waypoint_requests(mesh, response_code="500", response_flags="FI")
               == fi_before + 5, 5, "5 aborts counted with response_flags FI")
    assert waypoint_requests(mesh, response_code="504", response_flags="DI,UT") == ut_before + 1


# -- retries --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("attempts", "want_failures"), [(3, False), (0, True)],
                         ids=["attempts-3", "attempts-0"])
def test_retries_over_a_backend_failing_every_other_request(
        mesh: Mesh, routing: Routing, attempts: int, want_failures: bool) -> None:
    routing.apply(virtual_service("flaky", f"flaky-retries-{attempts}", [
        {"retries": {"attempts": attempts}, "route": [to("flaky")]}]))
    seen = BackendLog(mesh, "web-v1", FLAKY_PORT)
    statuses = Counter(mesh.curl_each("client", [url("flaky", "/r/[1-20]")], "%{http_code}"))
    got = [r["status"] for r in seen.requests()]
    if want_failures:
        assert statuses == {"503": 10, "200": 10}, statuses
        assert len(got) == 20
    else:
        assert statuses == {"200": 20}, statuses
        # Every failure was tried again: the backend answered 503 and 200 in turn.
        assert Counter(got)[200] == 20 and Counter(got)[503] >= 19, Counter(got)


# -- connection pool ------------------------------------------------------------------------------


def test_connection_pool_overflow_gives_503_uo(mesh: Mesh, routing: Routing) -> None:
    routing.apply(destination_rule("slow", "slow-pool", {"connectionPool": {
        "tcp": {"maxConnections": 1},
        "http": {"http1MaxPendingRequests": 1, "maxRequestsPerConnection": 1}}}))
    uo_before = waypoint_requests(mesh, response_code="503", response_flags="UO")
    seen = BackendLog(mesh, "web-v1", SLOW_PORT)
    # 20 clients at once: 20 connections from the client pod, each one request.
    lines = mesh.curl_each("client", [url("slow", "/p/[1-20]")], "%{http_code} %{size_download}",
                           extra=["-Z", "--parallel-max", "20", "--parallel-immediate"])
    statuses = Counter(line.split()[0] for line in lines)
    print(f"figure: 20 concurrent clients, 1 connection + 1 pending: {dict(statuses)}")
    assert statuses["503"] > 0 and statuses["200"] >= 2, statuses
    assert statuses["200"] + statuses["503"] == 20, statuses
    assert len(seen.requests()) == statuses["200"]  # overflow never reached the backend
    eventually(lambda: waypoint_requests(mesh, response_code="503", response_flags="UO")
               == uo_before + statuses["503"], 5, "the overflows counted with flag UO")


# -- outlier detection ----------------------------------------------------------------------------


def test_outlier_detection_ejects_an_endpoint_answering_500(
        mesh: Mesh, routing: Routing) -> None:
    base_ejection = 3.0
    routing.apply(
        destination_rule("outlier", "outlier-eject", {
            "loadBalancer": {"simple": "ROUND_ROBIN"},
            "outlierDetection": {"consecutive5xxErrors": 3, "interval": "1s",
                                 "baseEjectionTime": f"{base_ejection:.0f}s",
                                 "maxEjectionPercent": 50}}),
        virtual_service("outlier", "outlier-noretry", [
            {"retries": {"attempts": 0}, "route": [to("outlier")]}]),
    )
    bad = BackendLog(mesh, "web-v1", BROKEN_PORT)
    good = BackendLog(mesh, "web-v2", BROKEN_PORT)
    statuses = Counter(mesh.curl_each("client", [url("outlier", "/o/[1-20]")], "%{http_code}"))
    assert statuses == {"500": 3, "200": 17}, statuses
    failed = bad.requests()
    assert len(failed) == 3  # ejected after the third consecutive 500
    ejected_at = failed[-1]["t"]  # CLOCK_MONOTONIC, the same clock as ours
    assert '"ejected": ["' in waypoint_dump(mesh)

    # Traffic goes on, all to web-v2, until baseEjectionTime has passed.
    def back() -> bool:
        mesh.curl_each("client", [url("outlier", "/later/[1-2]")], "%{http_code}")
        return len(bad.requests()) > 3

    eventually(back, base_ejection + 8, "the ejected endpoint back in rotation", period=0.2)
    returned_at = bad.requests()[3]["t"]
    print(f"figure: web-v1 ejected for {returned_at - ejected_at:.2f}s "
          f"(baseEjectionTime {base_ejection:.0f}s)")
    assert returned_at - ejected_at >= base_ejection - 0.1
    assert len(good.requests()) >= 17 + 2


# -- mirroring ------------------------------------------------------------------------------------


def test_mirroring_100_percent_to_a_slow_v2(mesh: Mesh, routing: Routing) -> None:
    routing.apply(subsets("mirror", "mirror-subsets"), virtual_service("mirror", "mirror-v2", [
        {"route": [to("mirror", "v1", 100)], "mirror": {"host": "mirror", "subset": "v2"},
         "mirrorPercentage": {"value": 100.0}}]))
    v1 = BackendLog(mesh, "web-v1", MIRROR_PORT)
    v2 = BackendLog(mesh, "web-v2", MIRROR_PORT)
    n = 10
    t0 = time.monotonic()
    served = mesh.curl_each("client", [url("mirror", f"/m/[1-{n}]")], "%header{x-served-by}")
    elapsed = time.monotonic() - t0
    print(f"figure: {n} mirrored requests (v2 answers after 1 s) took {elapsed:.2f}s")
    assert served == ["web-v1/v1"] * n
    assert elapsed < 0.5 * n, elapsed  # v2 takes 1 s a request: the clients never waited
    eventually(lambda: len(v2.requests()) >= n, 15, f"{n} copies at v2")
    copies = v2.requests()
    assert sorted(r["path"] for r in copies) == sorted(r["path"] for r in v1.requests())
    assert {r["host"] for r in copies} == {f"{VIPS['mirror']}-shadow"}
    assert {r["host"] for r in v1.requests()} == {VIPS["mirror"]}


# -- L7 authorization -----------------------------------------------------------------------------


def test_l7_policy_on_the_waypoint_denies_delete_admin(mesh: Mesh, routing: Routing) -> None:
    denied_before = waypoint_requests(mesh, response_code="403")
    routing.apply({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "no-admin-delete", "namespace": NS},
        "spec": {
            "targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io",
                            "name": WP.name}],
            "action": "DENY",
            "rules": [{"to": [{"operation": {"methods": ["DELETE"], "paths": ["/admin*"]}}]}],
        },
    })
    denied = mesh.curl("client", url("web", "/admin/users"), extra=["-X", "DELETE"])
    assert denied.status == 403, denied
    assert denied.stdout.endswith("RBAC: access denied"), denied.stdout
    assert mesh.curl("client", url("web", "/admin/users")).status == 200
    assert mesh.curl("client", url("web", "/users"), extra=["-X", "DELETE"]).status == 200
    assert waypoint_requests(mesh, response_code="403") == denied_before + 1


# -- gRPC -----------------------------------------------------------------------------------------


def test_grpc_unary_and_streaming_through_the_waypoint(mesh: Mesh) -> None:
    svc = f"echo.{NS}.svc.cluster.local"
    ok_before = waypoint_requests(mesh, request_protocol="grpc", grpc_response_status="0",
                                  destination_service=svc)
    bad_before = waypoint_requests(mesh, request_protocol="grpc", grpc_response_status="3",
                                   destination_service=svc)
    done = mesh.run_tool("client", tool("grpc-client", f"{VIPS['echo']}:{GRPC_PORT}"))
    assert done.returncode == 0, done.stderr
    calls = json.loads(done.stdout)
    assert calls == {"unary": "echo:hi", "stream": ["item-0", "item-1", "item-2", "item-3"],
                     "fail": ["INVALID_ARGUMENT", "asked to fail"]}
    eventually(lambda: waypoint_requests(mesh, request_protocol="grpc", grpc_response_status="0",
                                         destination_service=svc) == ok_before + 2,
               5, "two gRPC calls counted with grpc_response_status 0")
    assert waypoint_requests(mesh, request_protocol="grpc", grpc_response_status="3",
                             destination_service=svc) == bad_before + 1
