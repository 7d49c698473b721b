"""The L7 half of ``demo up``: bookinfo behind its namespace's waypoint.

Namespace ``bookinfo`` is ambient and labelled ``istio.io/use-waypoint:
waypoint``, so every request to its Services goes through the waypoint
``bookinfo/waypoint``: from ``demo/client`` to productpage, from productpage to
reviews, from reviews to ratings. The steps apply the Istio objects of Istio's
own bookinfo tasks (written as Kubernetes YAML into the demo's config
directory, as ``kubectl apply`` would) and show what changed:

5. a canary: a DestinationRule with subsets v1/v2/v3 and a VirtualService
   sending reviews 80 % to v1 and 20 % to v3; 100 requests counted by version;
6. request routing: ``end-user: jason`` goes to v2, everyone else to v3;
7. a fault: a VirtualService on ratings aborts jason's calls with HTTP 500;
   jason's page says ratings are unavailable, the others' pages show stars;
   the waypoint's ``istio_requests_total`` counts the aborts with flag ``FI``.

Each step waits until the waypoint holds the new routes (its admin
``/config_dump``) before sending traffic, so the counts are the route's alone.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ztunnel_py.config import ADMIN_PORT, METRICS_PORT
from ztunnel_py.demo import istio
from ztunnel_py.demo.bookinfo import RATINGS_UNAVAILABLE, page_text
from ztunnel_py.demo.configdir import dump, ref_of, write_objects
from ztunnel_py.demo.scenario import short_metric
from ztunnel_py.demo.world import BOOKINFO_NS, BOOKINFO_WAYPOINT, World
from ztunnel_py.topology import Topology

Say = Callable[[str], None]

CLIENT = "client"  # demo/client, in the mesh since step 2
CANARY_REQUESTS = 100
CANARY_WEIGHTS = {"v1": 80, "v3": 20}
ROUTED_REQUESTS = 10
USER = "jason"
STEPS = 3
HTTP_LABELS_SHOWN = ("reporter", "source_workload", "destination_service_name",
                     "destination_workload", "response_code", "response_flags")
ROUTES_TIMEOUT = 15.0  # the controller's debounce, push and the waypoint's swap, on a busy host


def destination_rule(host: str, versions: tuple[str, ...]) -> dict[str, Any]:
    return istio.destination_rule(host, BOOKINFO_NS, host, versions=versions)


def virtual_service(host: str, http: list[dict[str, Any]]) -> dict[str, Any]:
    return istio.virtual_service(host, BOOKINFO_NS, [host], http)


_to = istio.route_to


def _for_user(user: str) -> list[dict[str, Any]]:
    return [{"headers": {"end-user": {"exact": user}}}]


def reviews_canary(weights: Mapping[str, int]) -> dict[str, Any]:
    return virtual_service("reviews", [
        {"route": [_to("reviews", v, w) for v, w in weights.items()]},
    ])


def reviews_by_user(user: str, theirs: str, others: str) -> dict[str, Any]:
    return virtual_service("reviews", [
        {"match": _for_user(user), "route": [_to("reviews", theirs)]},
        {"route": [_to("reviews", others)]},
    ])


def ratings_abort(user: str, status: int = 500) -> dict[str, Any]:
    return virtual_service("ratings", [
        {"match": _for_user(user),
         "fault": {"abort": {"percentage": {"value": 100.0}, "httpStatus": status}},
         "route": [_to("ratings")]},
        {"route": [_to("ratings")]},
    ])


@dataclass(frozen=True)
class Page:
    """One productpage answer as the client saw it."""

    status: int
    reviews: str  # x-reviews: the reviews pod/version that answered
    ratings: str  # x-ratings: "red 5 4", "none", "unavailable"

    @property
    def version(self) -> str:
        return self.reviews.rpartition("/")[2] if "/" in self.reviews else ""


@dataclass
class BookinfoOutcome:
    """What the bookinfo steps observed (the end-to-end test asserts on it)."""

    canary: Counter[str] = field(default_factory=Counter)  # reviews version -> requests
    user_pages: list[Page] = field(default_factory=list)  # step 6, as USER
    other_pages: list[Page] = field(default_factory=list)  # step 6, anonymous
    fault_user_page: list[str] = field(default_factory=list)  # step 7: USER's page, as text
    fault_user: Page | None = None
    fault_other: Page | None = None
    waypoint_metrics: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            sum(self.canary.values()) == CANARY_REQUESTS
            and set(self.canary) == set(CANARY_WEIGHTS)
            and bool(self.user_pages)
            and {p.version for p in self.user_pages} == {"v2"}
            and bool(self.other_pages)
            and {p.version for p in self.other_pages} == {"v3"}
            and self.fault_user is not None and self.fault_user.ratings == "unavailable"
            and self.fault_other is not None and self.fault_other.ratings.startswith("red")
            and any('response_flags="FI"' in m for m in self.waypoint_metrics)
        )


class Bookinfo:
    """Requests to bookinfo from a pod, and the waypoint's admin and metrics."""

    def __init__(self, topo: Topology, world: World, config_dir: Path) -> None:
        self.topo = topo
        self.config_dir = config_dir
        svc = world.service("productpage", BOOKINFO_NS)
        self.url = f"http://{svc.vip}:{svc.ports[0].port}/productpage"
        self.waypoint_pod = world.waypoint(BOOKINFO_WAYPOINT, BOOKINFO_NS).pod

    def pages(self, n: int, user: str = "") -> list[Page]:
        """``n`` GETs of the product page from the client, on one keep-alive connection."""
        argv = ["curl", "-sS", "--max-time", "20", "-o", "/dev/null",
                "-w", "%{http_code} %header{x-reviews} %header{x-ratings}\\n"]
        if user:
            argv += ["-H", f"end-user: {user}"]
        done = self.topo.run(CLIENT, [*argv, f"{self.url}?n=[1-{n}]"], timeout=30)
        pages = []
        for line in done.stdout.splitlines():
            code, _, rest = line.partition(" ")
            reviews, _, ratings = rest.partition(" ")
            pages.append(Page(int(code) if code.isdigit() else 0, reviews, ratings))
        return pages

    def page_text(self, user: str) -> list[str]:
        argv = ["curl", "-sS", "--max-time", "10", "-H", f"end-user: {user}", self.url]
        return page_text(self.topo.run(CLIENT, argv, timeout=20).stdout)

    def apply(self, *objs: dict[str, Any]) -> bool:
        """Write ``objs`` into the config dir (kubectl apply); True if any changed."""
        lines = write_objects(self.config_dir, [(ref_of(o, "demo"), o) for o in objs])
        return any(not line.endswith(" unchanged") for line in lines)

    def config_dump(self) -> dict[str, Any]:
        done = self.topo.run(self.waypoint_pod, [
            "curl", "-s", "--max-time", "2", f"http://127.0.0.1:{ADMIN_PORT}/config_dump",
        ], timeout=10)
        try:
            dumped: dict[str, Any] = json.loads(done.stdout)
        except ValueError:
            return {}
        return dumped

    def apply_and_wait(self, vs: dict[str, Any], dr: dict[str, Any] | None = None
                       ) -> float | None:
        """Apply ``dr`` and ``vs``; seconds until the waypoint serves them, None if it never did.

        Served: a configuration newer than the one before the write, in which the host's
        routes come from ``vs`` (as many as it has) and it has a DestinationRule if
        ``dr`` is given.
        """
        host = f"{vs['spec']['hosts'][0]}.{BOOKINFO_NS}.svc.cluster.local"
        want_source = f"VirtualService {BOOKINFO_NS}/{vs['metadata']['name']}"
        before = self.config_dump().get("version")
        started = time.monotonic()
        changed = self.apply(*[o for o in (dr, vs) if o is not None])
        while time.monotonic() - started < ROUTES_TIMEOUT:
            dumped = self.config_dump()
            svc = dumped.get("services", {}).get(host, {})
            if ((dumped.get("version") != before or not changed)
                    and svc.get("routes") == want_source
                    and svc.get("http_routes") == len(vs["spec"]["http"])
                    and (dr is None or svc.get("destination_rule"))):
                return time.monotonic() - started
            time.sleep(0.1)
        return None

    def metrics(self) -> list[str]:
        done = self.topo.run(self.waypoint_pod, [
            "curl", "-s", "--max-time", "3", f"http://127.0.0.1:{METRICS_PORT}/metrics",
        ], timeout=10)
        return [line for line in done.stdout.splitlines()
                if line.startswith("istio_requests_total{") and 'reporter="waypoint"' in line]


def _yaml(obj: dict[str, Any], say: Say) -> None:
    for line in dump(obj).rstrip().splitlines():
        say(f"    {line}")


def _applied(b: Bookinfo, say: Say, vs: dict[str, Any], dr: dict[str, Any] | None = None
             ) -> bool:
    if dr is not None:
        subsets = " ".join(s["name"] for s in dr["spec"]["subsets"])
        say(f"  applied DestinationRule {BOOKINFO_NS}/{dr['metadata']['name']} (subsets "
            f"{subsets} by label version) and:")
    else:
        say("  applied:")
    _yaml(vs, say)
    took = b.apply_and_wait(vs, dr)
    if took is None:
        say(f"  FAILED: the waypoint did not serve these routes within {ROUTES_TIMEOUT:.0f}s "
            f"(its /config_dump on 127.0.0.1:{ADMIN_PORT} in pod {b.waypoint_pod}; its log "
            f"and the controller's are in the demo's logs/)")
        return False
    say(f"  the waypoint serves the new routes {took:.1f}s later")
    return True


def _stars(ratings: str) -> str:
    color, *stars = ratings.split()
    if not stars or not all(s.isdigit() for s in stars):
        return {"none": "no stars", "unavailable": "ratings unavailable"}.get(ratings, ratings)
    return " ".join("\u2605" * int(s) + "\u2606" * (5 - int(s)) for s in stars) + f" ({color})"


def _tally(pages: list[Page]) -> str:
    counts = Counter((p.reviews or f"HTTP {p.status}", p.ratings) for p in pages)
    return ", ".join(f"{reviews} x{n} [{_stars(ratings)}]"
                     for (reviews, ratings), n in sorted(counts.items()))


def tell(topo: Topology, world: World, config_dir: Path, step: Say, say: Say
         ) -> BookinfoOutcome:
    """Steps 5-7; ``step`` prints a step's numbered title."""
    out = BookinfoOutcome()
    b = Bookinfo(topo, world, config_dir)
    where = world.waypoint(BOOKINFO_WAYPOINT, BOOKINFO_NS)
    weights = " / ".join(f"{w}% {v}" for v, w in CANARY_WEIGHTS.items())

    step(f"bookinfo behind waypoint {BOOKINFO_NS}/{BOOKINFO_WAYPOINT}: a canary, reviews "
         f"{weights}")
    say(f"  namespace {BOOKINFO_NS} is labelled istio.io/use-waypoint={BOOKINFO_WAYPOINT}: the "
        f"agents send its services' traffic to the waypoint pod on {where.node} (L7)")
    dr = destination_rule("reviews", ("v1", "v2", "v3"))
    if not _applied(b, say, reviews_canary(CANARY_WEIGHTS), dr):
        return out
    pages = b.pages(CANARY_REQUESTS)
    out.canary = Counter(p.version or f"HTTP {p.status}" for p in pages)
    say(f"  {CANARY_REQUESTS} requests from {CLIENT} to productpage ({b.url}); "
        "reviews answered by:")
    for version, n in sorted(out.canary.items()):
        say(f"    reviews {version}: {n:>3}  (route weight {CANARY_WEIGHTS.get(version, 0)}%)")

    step(f"request routing: end-user {USER} -> reviews v2, everyone else -> v3 "
         "(the canary is promoted)")
    if not _applied(b, say, reviews_by_user(USER, "v2", "v3")):
        return out
    out.user_pages = b.pages(ROUTED_REQUESTS, USER)
    out.other_pages = b.pages(ROUTED_REQUESTS)
    say(f"  as {USER}:  {_tally(out.user_pages)}")
    say(f"  anonymous: {_tally(out.other_pages)}")

    step(f"a fault: ratings aborts {USER}'s calls with HTTP 500 (VirtualService fault.abort)")
    if not _applied(b, say, ratings_abort(USER)):
        return out
    out.fault_user_page = b.page_text(USER)
    user_pages, other_pages = b.pages(3, USER), b.pages(3)
    out.fault_user = user_pages[0] if user_pages and len(set(user_pages)) == 1 else None
    out.fault_other = other_pages[0] if other_pages and len(set(other_pages)) == 1 else None
    say(f"  what {USER} sees on /productpage (reviews v2 calls ratings, which fails):")
    for line in out.fault_user_page:
        say(f"    | {line}")
    say(f"  as {USER}, 3 more: {_tally(user_pages)}")
    say(f"  anonymous, 3:     {_tally(other_pages)}  (the fault is {USER}'s alone)")
    if RATINGS_UNAVAILABLE not in " ".join(out.fault_user_page):
        say(f"  FAILED: {USER}'s page does not say {RATINGS_UNAVAILABLE!r}")
    out.waypoint_metrics = b.metrics()
    say(f"  the waypoint's istio_requests_total, from {where.pod}:{METRICS_PORT}/metrics:")
    for line in sorted(out.waypoint_metrics, key=lambda m: short_metric(m, ("source_workload",
                                                                         "destination_service_name"))):
        say(f"    {short_metric(line, HTTP_LABELS_SHOWN)}")
    return out
