"""The L7 decision engine: pure functions from (request, routes, randomness) to a plan.

``decide`` picks the first matching route (Istio: first match wins), then
either answers itself (``Respond``: directResponse, redirect, fault abort, no
route) or returns a ``Forward`` plan: the weighted destination, the rewritten
request, response header operations, timeout, retry policy, fault delay and
the mirrors to copy the request to. Randomness (weights, fault and mirror
percentages, retry backoff jitter) comes from an injected ``random.Random`` so
that tests are deterministic. Nothing here does I/O.
"""

from __future__ import annotations

import base64
import random
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Final

from waypoint.request import Headers, Request, remove_header, set_header
from waypoint.routes import ServiceRoutes
from ztunnel_py.state import routing as r
from ztunnel_py.state.model import Service

# -- response flags (Envoy's short names, as Istio's metrics show them) -----------------
NO_ROUTE: Final = "NR"
FAULT_ABORT: Final = "FI"
FAULT_DELAY: Final = "DI"
OVERFLOW = "UO"
TIMEOUT = "UT"
CONNECT_FAILURE = "UF"
UPSTREAM_RESET = "UC"
NO_HEALTHY = "UH"
RETRY_LIMIT = "URX"

GRPC_CODES = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}


# -- matching ---------------------------------------------------------------------------


@lru_cache(maxsize=1024)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def string_matches(m: r.StringMatch, value: str | None, *, ignore_case: bool = False) -> bool:
    """Istio StringMatch: exact, prefix, or RE2-style full-match regex. A match with no
    field set only asks that the value be present."""
    if value is None:
        return False
    if m.exact is not None:
        return value.lower() == m.exact.lower() if ignore_case else value == m.exact
    if m.prefix is not None:
        if ignore_case:
            return value.lower().startswith(m.prefix.lower())
        return value.startswith(m.prefix)
    if m.regex is not None:
        return _regex(m.regex).fullmatch(value) is not None
    return True


def _query_params(query: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in query.split("&"):
        if not part:
            continue
        k, _, v = part.partition("=")
        out.setdefault(k, v)
    return out


def request_matches(m: r.HTTPMatchRequest, req: Request) -> bool:
    """All conditions set in one HTTPMatchRequest hold for ``req``."""
    if m.uri is not None and not string_matches(
        m.uri, req.path_only, ignore_case=bool(m.ignore_uri_case)
    ):
        return False
    if m.method is not None and not string_matches(m.method, req.method):
        return False
    if m.authority is not None and not string_matches(m.authority, req.authority):
        return False
    if m.scheme is not None and not string_matches(m.scheme, req.scheme):
        return False
    if m.port is not None and m.port != req.port:
        return False
    for name, hm in m.headers.items():
        if not string_matches(hm, req.header(name.lower())):
            return False
    for name, hm in m.without_headers.items():
        if string_matches(hm, req.header(name.lower())):
            return False
    if m.query_params:
        params = _query_params(req.query)
        for name, qm in m.query_params.items():
            if not string_matches(qm, params.get(name)):
                return False
    if m.source_labels:
        labels = req.source.labels
        if any(labels.get(k) != v for k, v in m.source_labels.items()):
            return False
    return not (m.source_namespace is not None and m.source_namespace != req.source.namespace)


def first_match(
    plans: tuple[RoutePlan, ...], req: Request
) -> tuple[RoutePlan, r.HTTPMatchRequest | None] | None:
    """The first route whose matches hit (a route without matches hits everything), with
    the HTTPMatchRequest that hit; Istio: first match wins."""
    for plan in plans:
        if not plan.matches:
            return plan, None
        for m in plan.matches:
            if request_matches(m, req):
                return plan, m
    return None


# -- plans --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where a request (or its mirror) goes: a service host, a subset and a port.

    The proxy keys its per-target memos by it several times per request: the hash is
    computed once, and ``decide`` hands out one object per (host, port, subset) so that
    those lookups mostly end at an identity check."""

    host: str
    port: int
    subset: str | None = None
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.host, self.port, self.subset)))

    def __hash__(self) -> int:
        return self._hash


_TARGETS: Final[dict[tuple[str, int, str | None], Target]] = {}
TARGETS_REMEMBERED: Final = 4096


def target(host: str, port: int, subset: str | None = None) -> Target:
    """The one ``Target`` for these fields (remembered; bounded)."""
    key = (host, port, subset)
    t = _TARGETS.get(key)
    if t is None:
        if len(_TARGETS) >= TARGETS_REMEMBERED:
            _TARGETS.clear()
        t = _TARGETS[key] = Target(host, port, subset)
    return t


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int  # retries after the first try
    per_try_timeout_s: float | None
    retry_on: frozenset[str]
    status_codes: frozenset[int]
    backoff_base_s: float = 0.025
    backoff_max_s: float = 0.25

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Envoy's fully jittered exponential backoff before retry number ``retry`` (1-based)."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * (2 ** (retry - 1)))
        return rng.uniform(0, ceiling)


@dataclass(frozen=True)
class Outcome:
    """What one try produced, for the retry decision."""

    status: int | None = None  # None: no HTTP response
    grpc_status: str | None = None
    error: str | None = None  # "connect-failure" | "reset" | "refused-stream" | "timeout"


NO_OUTCOME: Final = Outcome()  # (frozen: one shared, not one made per request)


GRPC_RETRY_ON: Final = {
    "cancelled": "1", "deadline-exceeded": "4", "internal": "13",
    "resource-exhausted": "8", "unavailable": "14",
}


def should_retry(policy: RetryPolicy, outcome: Outcome) -> bool:
    on = policy.retry_on
    if outcome.error is not None:
        if outcome.error == "connect-failure":
            return bool(on & {"connect-failure", "5xx", "gateway-error", "reset"})
        if outcome.error == "reset":
            return bool(on & {"reset", "5xx"})
        if outcome.error == "refused-stream":
            return bool(on & {"refused-stream", "5xx", "reset"})
        if outcome.error == "timeout":
            return bool(on & {"5xx", "gateway-error"}) and policy.per_try_timeout_s is not None
        return False
    status = outcome.status or 0
    if status >= 500 and "5xx" in on:
        return True
    if status in (502, 503, 504) and "gateway-error" in on:
        return True
    if status == 409 and "retriable-4xx" in on:
        return True
    if status in policy.status_codes:
        return True
    if outcome.grpc_status is not None:
        for name, code in GRPC_RETRY_ON.items():
            if name in on and outcome.grpc_status == code:
                return True
    return False


# Istio's default for routes that do not say (pilot/pkg/networking/core/route/retry).
DEFAULT_RETRY: Final = RetryPolicy(
    attempts=2,
    per_try_timeout_s=None,
    retry_on=frozenset(
        {"connect-failure", "refused-stream", "unavailable", "cancelled",
         "retriable-status-codes"}
    ),
    status_codes=frozenset({503}),
)


def retry_policy(retries: r.HTTPRetry | None) -> RetryPolicy | None:
    if retries is None:
        return DEFAULT_RETRY
    if not retries.attempts:
        return None
    words: set[str] = set()
    codes: set[int] = set()
    for part in (retries.retry_on or "connect-failure,refused-stream,unavailable,cancelled,"
                 "retriable-status-codes").split(","):
        p = part.strip().lower()
        if p.isdigit():
            codes.add(int(p))
        elif p:
            words.add(p)
    if "retriable-status-codes" in words and not codes:
        codes.add(503)
    per_try = r.parse_duration(retries.per_try_timeout) if retries.per_try_timeout else None
    return RetryPolicy(retries.attempts, per_try, frozenset(words), frozenset(codes))


@dataclass(init=False)
class RoutePlan:
    """What ``decide`` needs of one route, worked out once per route object: its timeout
    and retry policy (parsing ``retryOn`` and durations cost microseconds per request),
    and whether it only forwards (no fault, redirect, direct response, rewrite, header
    operations or mirrors: the common route), in which case ``decide`` picks among its
    destinations' weights without reading the route's dataclasses again."""

    route: r.HTTPRoute
    matches: tuple[r.HTTPMatchRequest, ...]
    name: str
    timeout_s: float | None
    retry: RetryPolicy | None
    forward_only: bool
    weights: tuple[int, ...]
    total: int
    _port: int
    _targets: tuple[Target, ...]

    def __init__(self, route: r.HTTPRoute) -> None:
        self.route = route
        self.matches = route.match
        self.name = route.name or ""
        self.timeout_s = (r.parse_duration(route.timeout) if route.timeout else None) or None
        self.retry = retry_policy(route.retries)
        self.forward_only = (
            route.fault is None and route.redirect is None and route.direct_response is None
            and route.rewrite is None and route.headers is None and route.mirror is None
            and not route.mirrors and all(d.headers is None for d in route.route))
        self.weights = tuple(d.weight or 0 for d in route.route)
        self.total = sum(self.weights)
        self._port = -1
        self._targets = ()

    def pick(self, rng: random.Random) -> int:
        """``choose_destination``'s pick, as an index (the same draws from ``rng``);
        -1 for a route without destinations."""
        weights = self.weights
        n = len(weights)
        if n <= 1 or self.total <= 0:
            return n - 1 if n <= 1 else 0
        pick = int(rng.random() * self.total)
        for i in range(n):
            w = weights[i]
            if pick < w:
                return i
            pick -= w
        return n - 1  # pragma: no cover - arithmetic guarantees a pick

    def target(self, i: int, service: Service, req_port: int) -> Target:
        """The ``i``-th destination's target for a request to ``req_port`` (remembered for
        the last port asked: a service's requests mostly come to one)."""
        if req_port != self._port:
            self._targets = tuple(_target(d.destination, service, req_port)
                                  for d in self.route.route)
            self._port = req_port
        return self._targets[i]


# route -> its plan, by identity: the route is kept in the plan so that its id cannot
# be reused while the entry lives (bounded: cleared when full).
_PLANS: Final[dict[int, RoutePlan]] = {}
ROUTES_REMEMBERED: Final = 4096


def route_plan(route: r.HTTPRoute) -> RoutePlan:
    plan = _PLANS.get(id(route))
    if plan is not None and plan.route is route:
        return plan
    plan = RoutePlan(route)
    if len(_PLANS) >= ROUTES_REMEMBERED:
        _PLANS.clear()
    _PLANS[id(route)] = plan
    return plan


@dataclass(frozen=True)
class Respond:
    """The waypoint answers the request itself."""

    status: int
    body: bytes = b""
    headers: Headers = ()
    flags: str = "-"
    grpc_status: str | None = None  # gRPC requests: answered as trailers-only
    delay_s: float = 0.0
    route: str = ""
    reason: str = ""


@dataclass(init=False)
class Forward:
    target: Target
    request: Request  # rewritten: path, authority, headers
    response_ops: tuple[r.HeaderOperations, ...] = ()
    timeout_s: float | None = None
    retry: RetryPolicy | None = DEFAULT_RETRY
    delay_s: float = 0.0
    mirrors: tuple[Target, ...] = ()
    route: str = ""
    flags: str = "-"

    # written out, not made by @dataclass: compiled (``ztunnel_py.native``)
    def __init__(self, target: Target, request: Request,
                 response_ops: tuple[r.HeaderOperations, ...] = (), timeout_s: float | None = None,
                 retry: RetryPolicy | None = DEFAULT_RETRY, delay_s: float = 0.0,
                 mirrors: tuple[Target, ...] = (), route: str = "", flags: str = "-") -> None:
        self.target = target
        self.request = request
        self.response_ops = response_ops
        self.timeout_s = timeout_s
        self.retry = retry
        self.delay_s = delay_s
        self.mirrors = mirrors
        self.route = route
        self.flags = flags


Decision = Respond | Forward

# -- header operations and rewrites -----------------------------------------------------


def apply_header_ops(headers: Headers, ops: r.HeaderOperations | None) -> Headers:
    if ops is None:
        return headers
    out = headers
    for name, value in ops.set.items():
        out = set_header(out, name.lower(), value)
    for name, value in ops.add.items():
        out = (*out, (name.lower(), value))
    for name in ops.remove:
        out = remove_header(out, name.lower())
    return out


def _rewrite(req: Request, rw: r.HTTPRewrite | None, m: r.HTTPMatchRequest | None) -> Request:
    if rw is None:
        return req
    path, query = req.path_only, req.query
    if rw.uri is not None:
        uri = m.uri if m is not None else None
        if uri is not None and uri.prefix is not None:
            n = len(uri.prefix)
            path = rw.uri + path[n:]
        elif uri is not None and (uri.exact is not None or uri.regex is not None):
            path = rw.uri
        else:  # Envoy's prefix_rewrite against the implicit "/" prefix
            path = rw.uri + path[1:]
        path = path or "/"
    elif rw.uri_regex_rewrite is not None:
        rx = rw.uri_regex_rewrite
        # Envoy substitution groups are \1; Python's re.sub takes the same.
        path = _regex(rx.match).sub(rx.rewrite, path) or "/"
    authority = rw.authority if rw.authority is not None else req.authority
    return replace(req, path=path + (f"?{query}" if query else ""), authority=authority)


def _redirect(req: Request, rd: r.HTTPRedirect, route: str) -> Respond:
    scheme = rd.scheme or req.scheme
    host = rd.authority or req.host
    port: int | None = rd.port
    if port is None and rd.derive_port == "FROM_REQUEST_PORT":
        port = req.port
    default = {"http": 80, "https": 443}.get(scheme)
    if rd.authority is None and port is None and rd.scheme is None:
        authority = req.authority  # Envoy keeps the original Host, port included
    else:
        authority = host if port is None or port == default else f"{host}:{port}"
    path = rd.uri if rd.uri is not None else req.path_only
    query = f"?{req.query}" if req.query and rd.uri is None else ""
    location = f"{scheme}://{authority}{path}{query}"
    return Respond(rd.redirect_code or 301, b"", (("location", location),), route=route,
                   reason="redirect")


def _direct(dr: r.HTTPDirectResponse, route: str) -> Respond:
    body = b""
    if dr.body is not None:
        if dr.body.string is not None:
            body = dr.body.string.encode()
        elif dr.body.bytes is not None:
            body = base64.b64decode(dr.body.bytes)
    return Respond(dr.status, body, (("content-type", "text/plain"),) if body else (),
                   route=route, reason="direct response")


def _pct(p: r.Percent | None, default: float = 100.0) -> float:
    return default if p is None else p.value


def _hit(percent: float, rng: random.Random) -> bool:
    if percent >= 100:
        return True
    if percent <= 0:
        return False
    return rng.random() * 100 < percent


def choose_destination(
    dests: tuple[r.HTTPRouteDestination, ...], rng: random.Random
) -> r.HTTPRouteDestination | None:
    """Weighted choice; a lone destination without a weight takes everything."""
    if not dests:
        return None
    if len(dests) == 1:
        return dests[0]
    total = 0
    for d in dests:
        total += d.weight or 0
    if total <= 0:
        return dests[0]
    pick = int(rng.random() * total)  # randrange costs a microsecond more
    for d in dests:
        w = d.weight or 0
        if pick < w:
            return d
        pick -= w
    return dests[-1]  # pragma: no cover - arithmetic guarantees a pick


def _target(d: r.Destination, service: Service, req_port: int) -> Target:
    port = d.port.number if d.port is not None else 0
    if not port:
        # Same port as the request when the destination is the service itself, else the
        # destination service's only port (resolved by the caller if ambiguous).
        port = req_port
    return target(d.host, port, d.subset)


def _grpc_abort(code: str) -> str:
    c = code.strip().upper()
    if c.isdigit():
        return c
    return str(GRPC_CODES.get(c, 2))


def plans_for(service_routes: ServiceRoutes) -> tuple[RoutePlan, ...]:
    """The plans of a service's routes, in order (the proxy keeps them per routing table)."""
    return tuple(route_plan(route) for route in service_routes.routes)


def decide(req: Request, service_routes: ServiceRoutes, rng: random.Random) -> Decision:
    return decide_planned(req, service_routes.service, plans_for(service_routes), rng)


def decide_planned(req: Request, service: Service, plans: tuple[RoutePlan, ...],
                   rng: random.Random) -> Decision:
    """``decide`` from the routes' plans (``plans_for``)."""
    if not plans:
        return Forward(target(service.hostname, req.port), req, route="default")
    found = first_match(plans, req)
    if found is None:
        return Respond(404, b"", flags=NO_ROUTE, reason="no route matched")
    plan, matched = found
    route = plan.route
    name = plan.name
    if plan.forward_only:
        i = plan.pick(rng)
        if i < 0:
            return Respond(404, b"", flags=NO_ROUTE, route=name,
                           reason="route has no destination")
        return Forward(plan.target(i, service, req.port), req, (), plan.timeout_s, plan.retry,
                       0.0, (), name, "-")
    fault = route.fault
    delay_s = 0.0
    flags = "-"
    if fault is not None and fault.delay is not None and fault.delay.fixed_delay:
        pct = _pct(fault.delay.percentage, float(fault.delay.percent or 100))
        if _hit(pct, rng):
            delay_s = r.parse_duration(fault.delay.fixed_delay)
            flags = FAULT_DELAY
    if fault is not None and fault.abort is not None and _hit(_pct(fault.abort.percentage), rng):
        ab = fault.abort
        if ab.grpc_status is not None and req.grpc:
            return Respond(200, flags=FAULT_ABORT, grpc_status=_grpc_abort(ab.grpc_status),
                           delay_s=delay_s, route=name, reason="fault abort")
        status = ab.http_status or 503
        return Respond(status, b"fault filter abort", (("content-type", "text/plain"),),
                       flags=FAULT_ABORT, delay_s=delay_s, route=name, reason="fault abort")
    if route.redirect is not None:
        return _redirect(req, route.redirect, name)
    if route.direct_response is not None:
        return _direct(route.direct_response, name)
    dest = choose_destination(route.route, rng)
    if dest is None:
        return Respond(404, b"", flags=NO_ROUTE, route=name, reason="route has no destination")
    out = _rewrite(req, route.rewrite, matched)
    headers = out.headers
    response_ops: list[r.HeaderOperations] = []
    if dest.headers is not None:
        headers = apply_header_ops(headers, dest.headers.request)
        if dest.headers.response is not None:
            response_ops.append(dest.headers.response)
    if route.headers is not None:
        headers = apply_header_ops(headers, route.headers.request)
        if route.headers.response is not None:
            response_ops.append(route.headers.response)
    out = out.with_headers(headers)
    mirrors: list[Target] = []
    if route.mirror is not None and _hit(_pct(route.mirror_percentage), rng):
        mirrors.append(_target(route.mirror, service, req.port))
    for m in route.mirrors:
        if _hit(_pct(m.percentage), rng):
            mirrors.append(_target(m.destination, service, req.port))
    return Forward(_target(dest.destination, service, req.port), out, tuple(response_ops),
                   plan.timeout_s, plan.retry, delay_s, tuple(mirrors), name, flags)


def shadow_authority(authority: str) -> str:
    """Envoy's mirror host: ``reviews:9080`` -> ``reviews-shadow:9080``."""
    if authority.startswith("["):
        return authority
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit():
        return f"{host}-shadow:{port}"
    return f"{authority}-shadow"
