"""The waypoint's request path: resolve, authorize, decide, forward, record.

``WaypointProxy.handle`` is what the HTTP/1.1 and HTTP/2 servers call for every
request. The decisions are the pure functions of ``engine``, ``authz`` and
``cluster``; this module does the I/O they ask for: the fault delay, the tries
(each within ``perTryTimeout``, the whole within the route ``timeout``, with
jittered backoff between them), connection-pool admission, outlier
bookkeeping, fire-and-forget mirrors, and one telemetry record per request.

HTTP/1.1 requests come in through ``handle_now``: the common exchange (a local
answer, or a first try over a kept-alive HTTP/1.1 connection) runs on callbacks,
without a task; whatever needs waiting (a dial, a pool slot, a delay, a timeout,
a retry, a mirror) continues on the general path, a coroutine, from the same
decision (``_Prior``: what was already picked or tried).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol

from waypoint import authz, engine
from waypoint.cluster import (
    Cluster,
    EndpointRef,
    Overflow,
    UnknownSubset,
    effective_policy,
    endpoints_for,
)
from waypoint.engine import NO_OUTCOME, Forward, Outcome, Respond, Target
from waypoint.http1 import H1Client, H1Server
from waypoint.request import (
    Body,
    BodyStream,
    Headers,
    Request,
    RequestBody,
    Response,
    UpstreamError,
    header,
    set_header,
)
from waypoint.routes import RouteTable, qualify
from waypoint.telemetry import (
    RandomIds,
    RequestRecord,
    WaypointMetrics,
    next_traceparent,
    request_id,
)
from waypoint.upstream import Upstreams, may_resend
from ztunnel_py import log
from ztunnel_py.state.model import AuthorizationPolicy, Service, Workload
from ztunnel_py.state.snapshot import Snapshot, StateStore


def _log() -> Any:
    """Resolved at each use, so that ``log.configure`` (run after imports) applies."""
    return log.get("waypoint")

MAX_MIRRORS_IN_FLIGHT = 1024
MIRROR_TIMEOUT_S: Final = 30.0
RESOLVED_CACHE_SIZE: Final = 4096
TEXT: Final = (("content-type", "text/plain"),)
# Envoy marks a 503 that circuit breaking produced (clients and tests look for it)
OVERLOADED: Final = (*TEXT, ("x-envoy-overloaded", "true"))


@dataclass(init=False)
class _Result:
    response: Response
    flags: list[str]
    endpoint: EndpointRef | None = None
    attempts: int = 0

    # written out, not made by @dataclass: compiled (``ztunnel_py.native``)
    def __init__(self, response: Response, flags: list[str], endpoint: EndpointRef | None = None,
                 attempts: int = 0) -> None:
        self.response = response
        self.flags = flags
        self.endpoint = endpoint
        self.attempts = attempts


@dataclass(init=False)
class _Prior:
    """What the callback path (``WaypointProxy.handle_now``) did before it handed a
    request to the general path: the endpoint picked for the next try, or a first
    try made (its answer or failure), so that nothing is picked or sent twice."""

    next_ep: EndpointRef | None = None
    attempts: int = 0
    ep: EndpointRef | None = None
    resp: Response | None = None
    error: UpstreamError | None = None
    outcome: Outcome = field(default_factory=Outcome)

    # written out, not made by @dataclass: compiled (``ztunnel_py.native``)
    def __init__(self, next_ep: EndpointRef | None = None, attempts: int = 0,
                 ep: EndpointRef | None = None, resp: Response | None = None,
                 error: UpstreamError | None = None, outcome: Outcome | None = None) -> None:
        self.next_ep = next_ep
        self.attempts = attempts
        self.ep = ep
        self.resp = resp
        self.error = error
        self.outcome = outcome if outcome is not None else NO_OUTCOME


@dataclass(init=False)
class _Resolved:
    """Where a (dialled address, port, authority) goes under one routing table: the pod
    dialled, else the service (and its port), its routes and authorization policies."""

    pod: Workload | None
    service: Service | None
    port: int
    plans: tuple[engine.RoutePlan, ...]  # the service's routes (none for a pod dialled)
    policies: tuple[AuthorizationPolicy, ...]

    # written out, not made by @dataclass: compiled (``ztunnel_py.native``)
    def __init__(self, pod: Workload | None, service: Service | None, port: int,
                 plans: tuple[engine.RoutePlan, ...],
                 policies: tuple[AuthorizationPolicy, ...]) -> None:
        self.pod = pod
        self.service = service
        self.port = port
        self.plans = plans
        self.policies = policies


class Answerer(Protocol):
    """The downstream side of ``handle_now`` (``waypoint.http1.H1Server``)."""

    closed: bool

    @property
    def current(self) -> object: ...

    def respond(self, resp: Response) -> None: ...

    def failed(self, item: object) -> None:
        """The handler failed on ``item``: 500, unless it was answered already."""

    def follow(self, answer: Coroutine[Any, Any, Response]) -> None:
        """Answer with what ``answer`` gives, run as the request's task."""


def _failed(error: UpstreamError, flags: list[str], ep: EndpointRef | None,
            attempt: int) -> _Result:
    """The answer for a try that ended without an HTTP response."""
    flag = "UF" if error.kind == "connect-failure" else "UC"
    reason = "connection failure" if flag == "UF" else "connection termination"
    return _Result(
        _error_response(503, "upstream connect error or disconnect/reset before headers. "
                        f"reset reason: {reason}"), [*flags, flag], ep, attempt)


def _flags(*parts: str) -> str:
    if len(parts) == 1:
        return parts[0] or "-"
    out = [p for p in parts if p and p != "-"]
    return ",".join(dict.fromkeys(out)) or "-"


def speaks_http2(svc: Service, port: int) -> bool:
    """Istio's protocol selection: a port whose appProtocol or name says grpc / http2 / h2c
    gets HTTP/2 upstream even from an HTTP/1.1 client (otherwise the client's protocol)."""
    sp = svc.port(port)
    if sp is None:
        return False
    proto = (sp.app_protocol or sp.name).lower()
    return proto.split("-", 1)[0] in ("grpc", "http2", "h2c", "grpc-web") or \
        proto in ("kubernetes.io/h2c",)


_OUTCOMES: Final[dict[int, Outcome]] = {}


def _status_outcome(status: int) -> Outcome:
    """The (immutable) outcome of a plain HTTP answer, one per status code."""
    out = _OUTCOMES.get(status)
    if out is None:
        out = _OUTCOMES[status] = Outcome(status)
    return out


def _error_response(status: int, body: str) -> Response:
    return Response(status, TEXT, body.encode())


class WaypointProxy:
    """Serves one waypoint (``namespace/name``) from the snapshots in ``store``."""

    def __init__(
        self,
        store: StateStore,
        namespace: str,
        name: str,
        upstreams: Upstreams,
        *,
        metrics: WaypointMetrics | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        own_workloads: frozenset[str] = frozenset(),
        security: str = "mutual_tls",
    ) -> None:
        self.store = store
        self.namespace = namespace
        self.name = name
        self.upstreams = upstreams
        self.metrics = metrics or WaypointMetrics()
        self.rng = rng or random.Random()  # noqa: S311 - load balancing, not secrets
        self.ids = RandomIds()  # trace, span and request ids
        self.clock = clock
        self.own_workloads = own_workloads
        self.security = security
        self.table = RouteTable.build(store.current, namespace, name)
        self.clusters: dict[tuple[str, str | None, int, bool], Cluster] = {}
        self.mirror_tasks: set[asyncio.Task[None]] = set()
        # Per routing table: a target's service and endpoints.
        self._targets: dict[
            Target, tuple[Service | None, tuple[EndpointRef, ...]] | UnknownSubset] = {}
        self._http2: dict[Target, bool] = {}
        self._clusters_h1: dict[Target, Cluster] = {}  # per routing table, policy set
        self._clusters_h2: dict[Target, Cluster] = {}
        # Per routing table: (dst, port, authority) -> where it goes (``_Resolved``), and
        # the authorization policies per service host.
        self._resolved: dict[tuple[str, int, str], _Resolved] = {}
        self._authz: dict[str, tuple[AuthorizationPolicy, ...]] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.spawned = 0  # tasks started for requests (the general path), ever
        store.subscribe(self._swapped)

    def _swapped(self, _old: Snapshot, new: Snapshot) -> None:
        self.table = RouteTable.build(new, self.namespace, self.name)
        self._targets.clear()
        self._http2.clear()
        self._clusters_h1.clear()
        self._clusters_h2.clear()
        self._resolved.clear()
        self._authz.clear()
        for p in self.table.problems:
            _log().warning("routing problem", problem=p)

    def spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            coro)  # type: ignore[arg-type]
        self.tasks.add(task)
        self.spawned += 1
        task.add_done_callback(self.tasks.discard)
        return task

    # -- resolving the destination --

    def _addressed_workload(self, req: Request) -> Workload | None:
        """The pod the client dialled, when it dialled a pod rather than a service."""
        if not req.dst or self.table.service_at(req.dst, req.port) is not None:
            return None
        w = self.table.snapshot.by_ip.get(req.dst)
        return w if w is not None and not w.is_waypoint else None

    def resolve(self, req: Request) -> tuple[Service | None, Request]:
        """The service a request is for: by the address dialled (a VIP), else by Host."""
        table = self.table
        svc = table.service_at(req.dst, req.port) if req.dst else None
        if svc is not None:
            return svc, req
        host, _, port_text = req.authority.rpartition(":")
        if not host or not port_text.isdigit():
            host, port_text = req.authority, ""
        host = host.lower()
        svc = table.snapshot.by_vip.get(host) or table.service(qualify(host, self.namespace))
        if svc is None:
            return None, req
        port = int(port_text) if port_text else 0
        if svc.port(port) is None:
            port = svc.ports[0].port if svc.ports else req.port
        return svc, req.with_port(port)

    def cluster(self, target: Target, http2: bool) -> Cluster:
        """The target's cluster (kept across routing tables: its connection-pool and
        outlier state), with the current table's policy (set once per table)."""
        memo = self._clusters_h2 if http2 else self._clusters_h1
        c = memo.get(target)  # (keyed by the target itself: its hash is kept)
        if c is not None:
            return c
        key = (target.host, target.subset, target.port, http2)
        c = self.clusters.get(key)
        if c is None:
            c = self.clusters[key] = Cluster(
                f"outbound|{target.port}|{target.subset or ''}|{target.host}",
                rng=self.rng, clock=self.clock,
            )
        c.policy = effective_policy(  # once per target, protocol and routing table
            self.table.destination_rule(target.host), target.subset, target.port)
        memo[target] = c
        return c

    def _endpoints(self, target: Target) -> tuple[Service | None, tuple[EndpointRef, ...]]:
        """The target's service and endpoints (memoised per routing table);
        ``UnknownSubset`` if the subset is not declared."""
        hit = self._targets.get(target)
        if hit is None and target.host in self.table.snapshot.by_ip:  # a pod, by address
            w = self.table.snapshot.by_ip[target.host]
            hit = self._targets[target] = (None, () if w.is_waypoint or w.uid in
                                           self.own_workloads else
                                           (EndpointRef(target.host, target.port, w),))
        if hit is None:
            svc = self.table.service(target.host)
            try:
                eps = () if svc is None else endpoints_for(
                    target, svc, self.table.destination_rule(target.host),
                    self.table.snapshot, exclude=self.own_workloads)
                hit = (svc, eps)
            except UnknownSubset as exc:
                hit = exc
            self._targets[target] = hit
        if isinstance(hit, UnknownSubset):
            raise hit
        return hit

    # -- the request path --

    async def handle(self, req: Request, body: Body) -> Response:
        started = self.clock()
        rec = self._record(req, body)
        req, planned = self._prepare(req, rec)
        return await self._complete(req, body, rec, started, planned)

    def _record(self, req: Request, body: Body) -> RequestRecord:
        return RequestRecord(
            method=req.method, path=req.path, authority=req.authority,
            protocol="grpc" if req.grpc else "http", source=req.source,
            request_bytes=len(body) if isinstance(body, bytes) else 0, security=self.security,
        )

    async def _complete(self, req: Request, body: Body, rec: RequestRecord, started: float,
                        planned: _Result | Forward, prior: _Prior | None = None) -> Response:
        """The request from its decision on (the general path: a coroutine)."""
        try:
            result = planned if isinstance(planned, _Result) else \
                await self._forward(planned, body, rec, prior)
        except asyncio.CancelledError:
            rec.status, rec.flags = 499, "DC"
            rec.duration_ms = (self.clock() - started) * 1000.0
            self.metrics.record(rec)
            raise
        return self._finish(req, body, rec, started, result)

    def _finish(self, req: Request, body: Body, rec: RequestRecord, started: float,
                result: _Result) -> Response:
        """Telemetry for a request's result (for a streamed response, when it ends)."""
        resp = result.response
        rec.status = resp.status
        if req.grpc:
            rec.grpc_status = resp.grpc_status or ""
        rec.flags = _flags(*result.flags)
        rec.response_bytes = len(resp.body)
        rec.attempts = result.attempts
        if result.endpoint is not None:
            rec.upstream = result.endpoint.key
            rec.destination = result.endpoint.workload
        if resp.stream is None:
            if isinstance(body, RequestBody):
                rec.request_bytes = body.size
            rec.duration_ms = (self.clock() - started) * 1000.0
            self.metrics.record(rec)
            return resp

        def streamed(out: BodyStream) -> None:  # one record when the stream is over
            if isinstance(body, RequestBody):
                rec.request_bytes = body.size
            rec.response_bytes = out.size
            rec.grpc_status = header(out.trailers, "grpc-status") or rec.grpc_status
            if out.error is not None and "UC" not in rec.flags:
                rec.flags = _flags(rec.flags, "UC")
            rec.duration_ms = (self.clock() - started) * 1000.0
            self.metrics.record(rec)

        resp.stream.on_done.append(streamed)
        return resp

    # -- the callback path: plain HTTP/1.1 exchanges without a task --

    def handle_now(self, req: Request, body: bytes, server: Answerer) -> None:
        """Serve an HTTP/1.1 request, answering through ``server.respond``: on callbacks
        (no task, no coroutines) when the answer is local or the decision is a plain
        forward to an HTTP/1.1 endpoint with a kept-alive connection free (the common
        case), else by handing the rest to the general path (``server.follow``), from
        where this left off: nothing is decided, picked or sent twice."""
        started = self.clock()
        rec = self._record(req, body)
        req, planned = self._prepare(req, rec)
        if isinstance(planned, _Result):
            server.respond(self._finish(req, body, rec, started, planned))
        else:
            self._forward_now(req, planned, body, rec, started, server)

    def _forward_now(self, req: Request, d: Forward, body: bytes, rec: RequestRecord,
                     started: float, server: Answerer) -> None:
        """The first try on callbacks, if the decision allows it (no fault delay, route or
        per-try timeout, mirror, gRPC, HTTP/2 endpoint); retries go to the general path."""
        retry = d.retry
        svc: Service | None = None
        eps: tuple[EndpointRef, ...] = ()
        if not (d.mirrors or d.delay_s or d.timeout_s or req.grpc or (
                retry is not None and retry.per_try_timeout_s)):
            try:
                svc, eps = self._endpoints(d.target)
            except UnknownSubset:
                svc = None
        if svc is None or self._speaks_http2(d.target, svc):
            server.follow(self._complete(req, body, rec, started, d))
            return
        cluster = self.cluster(d.target, False)
        limits = cluster.limits(False)
        picked = cluster.pick(eps, d.request)
        client = self.upstreams.idle_h1(picked) if picked is not None else None
        if picked is None or client is None or not cluster.gate.try_acquire(limits):
            if picked is not None and client is not None:
                self.upstreams.idle_again(client, picked)
            server.follow(self._complete(req, body, rec, started, d, _Prior(next_ep=picked)))
            return
        ep = picked  # (for the closure: narrowed)
        cluster.begin(ep)
        item = server.current

        def answered(c: H1Client) -> None:
            try:  # (called from the upstream's parser: it must not see an exception)
                cluster.end(ep)
                cluster.gate.release()
                resp: Response | None = None
                failure: UpstreamError | None = None
                try:
                    resp = c.result()
                except UpstreamError as error:
                    self.upstreams.done_h1(c, ep, False, 0)
                    if may_resend(c, d.request):  # (as ``Upstreams.exchange`` does)
                        server.follow(self._complete(req, body, rec, started, d,
                                                     _Prior(next_ep=ep)))
                        return
                    cluster.record(ep, None, eps)
                    failure = error
                    outcome, result = Outcome(error=error.kind), _failed(error, [], ep, 1)
                else:
                    self.upstreams.done_h1(c, ep, True, limits.max_requests_per_connection)
                    cluster.record(ep, resp.status, eps)
                    outcome, result = _status_outcome(resp.status), _Result(resp, [], ep, 1)
                if retry is not None and retry.attempts and engine.should_retry(retry, outcome):
                    prior = _Prior(attempts=1, ep=ep, resp=resp, error=failure, outcome=outcome)
                    server.follow(self._complete(req, body, rec, started, d, prior))
                    return
                result = self._routed(result, d)
                if server.closed:  # the client left before its answer: Envoy's DC
                    result.response.status, result.flags = 499, ["DC"]
                server.respond(self._finish(req, body, rec, started, result))
            except Exception:
                server.failed(item)

        try:
            client.begin(d.request, body, answered)
        except UpstreamError:  # the request cannot be written: the general path says why
            cluster.end(ep)
            cluster.gate.release()
            self.upstreams.idle_again(client, ep)
            server.follow(self._complete(req, body, rec, started, d, _Prior(next_ep=ep)))

    def _resolve_cached(self, req: Request) -> _Resolved:
        """``_addressed_workload`` and ``resolve``, with the service's routes and policies,
        remembered per routing table."""
        key = (req.dst, req.port, req.authority)
        hit = self._resolved.get(key)
        if hit is None:
            pod = self._addressed_workload(req)
            svc, resolved = (None, req) if pod is not None else self.resolve(req)
            if len(self._resolved) >= RESOLVED_CACHE_SIZE:
                self._resolved.clear()
            hit = self._resolved[key] = _Resolved(
                pod, svc, resolved.port,
                engine.plans_for(self.table.routes_for(svc, resolved.port))
                if svc is not None else (),
                self._policies_for(svc))
        return hit

    def _policies_for(self, svc: Service | None) -> tuple[AuthorizationPolicy, ...]:
        host = svc.hostname if svc is not None else ""
        found = self._authz.get(host)
        if found is None:
            found = self._authz[host] = self.table.policies_for(svc)
        return found

    def _prepare(self, req: Request, rec: RequestRecord) -> tuple[Request, _Result | Forward]:
        resolved = self._resolve_cached(req)
        svc = resolved.service
        port = req.port  # the service port, for a service (the copy with it made below)
        if resolved.pod is None:
            if svc is None:
                return req, _Result(_error_response(404, f"no service for {req.authority!r}"),
                                    ["NR"])
            port = resolved.port
            rec.destination_service = svc.hostname
        policies = resolved.policies
        if policies:
            req = req.with_port(port)
            verdict = authz.evaluate(policies, req)
            if not verdict.allowed:
                _log().debug("request denied", reason=verdict.reason, path=req.path)
                return req, _Result(Response(403, TEXT, authz.DENIED_BODY), ["-"])
        incoming_tp: str | None = None
        has_request_id = False
        for k, v in req.headers:
            if k == "traceparent":
                incoming_tp = v
            elif k == "x-request-id":
                has_request_id = True
        ids = self.ids.next()
        tp = next_traceparent(incoming_tp, ids)
        rec.traceparent = tp
        headers: Headers
        if incoming_tp is not None:
            headers = set_header(req.headers, "traceparent", tp)
            if not has_request_id:
                headers = (*headers, ("x-request-id", request_id(ids)))
        elif has_request_id:
            headers = (*req.headers, ("traceparent", tp))
        else:  # (the common case: one tuple)
            headers = (*req.headers, ("traceparent", tp), ("x-request-id", request_id(ids)))
        req = req.with_headers(headers, port)
        if svc is None:  # a pod addressed directly: no service routes apply
            rec.route = "workload"
            return req, Forward(engine.target(req.dst, req.port), req, route="workload")
        decision = engine.decide_planned(req, svc, resolved.plans, self.rng)
        rec.route = decision.route
        if isinstance(decision, Respond):
            return req, _Result(self._respond(decision, req), [decision.flags])
        return req, decision

    async def _forward(self, d: Forward, body: Body, rec: RequestRecord,
                       prior: _Prior | None = None) -> _Result:
        if d.mirrors:
            rec.mirrored_to = tuple(t.host for t in d.mirrors)
            for t in d.mirrors:
                self._mirror(t, d.request, body)
        try:
            if d.timeout_s:  # (asyncio.timeout: no task per request, unlike wait_for)
                async with asyncio.timeout(d.timeout_s):
                    result = await self._tries(d, body, prior)
            else:
                result = await self._tries(d, body, prior)
        except TimeoutError:
            return _Result(_error_response(504, "upstream request timeout"), [d.flags, "UT"])
        return self._routed(result, d)

    def _routed(self, result: _Result, d: Forward) -> _Result:
        """The tries' result under the route: its flags first, its response header ops."""
        result.flags.insert(0, d.flags)
        result.response = self._response_ops(result.response, d)
        return result

    def _respond(self, d: Respond, req: Request) -> Response:
        if d.grpc_status is not None:
            return Response(200, (("content-type", "application/grpc"),
                                  ("grpc-status", d.grpc_status),
                                  ("grpc-message", "fault filter abort")))
        return Response(d.status, d.headers, d.body)

    def _response_ops(self, resp: Response, d: Forward) -> Response:
        headers = resp.headers
        for ops in d.response_ops:
            headers = engine.apply_header_ops(headers, ops)
        resp.headers = headers
        return resp

    def _speaks_http2(self, target: Target, svc: Service) -> bool:
        memo = self._http2.get(target)
        if memo is None:
            memo = self._http2[target] = speaks_http2(svc, target.port)
        return memo

    async def _tries(self, d: Forward, body: Body, prior: _Prior | None = None) -> _Result:
        """The tries of a forward (``prior``: what the callback path already did)."""
        if d.delay_s:
            await asyncio.sleep(d.delay_s)
        try:
            svc, eps = self._endpoints(d.target)
        except UnknownSubset as unknown:  # (one name per exception type: mypyc types it)
            return _Result(_error_response(503, str(unknown)), ["NC"])
        if svc is None and not eps and d.target.host not in self.table.snapshot.by_ip:
            return _Result(_error_response(503, f"no service {d.target.host}"), ["NC"])
        req = d.request
        http2 = req.http2
        if not http2 and svc is not None:
            http2 = self._speaks_http2(d.target, svc)
        if http2 != req.http2:
            req = replace(req, http2=True)
        cluster = self.cluster(d.target, http2)
        limits = cluster.limits(http2)
        retry = d.retry
        tries = 1 + (retry.attempts if retry is not None else 0)
        resp: Response | None = None
        error: UpstreamError | None = None
        timed_out = False
        outcome = NO_OUTCOME
        ep: EndpointRef | None = None
        next_ep: EndpointRef | None = None
        attempt = 0
        if prior is not None:
            attempt, next_ep = prior.attempts, prior.next_ep
            ep, resp, error, outcome = prior.ep, prior.resp, prior.error, prior.outcome
        while attempt < tries:
            attempt += 1
            if attempt > 1:
                assert retry is not None
                if not cluster.gate.retry_allowed(limits):
                    break
                if isinstance(body, RequestBody) and not body.replayable:
                    break  # too large to send again (Envoy: no retry past its buffer)
                cluster.gate.retries += 1
            try:
                if attempt > 1 and retry is not None:
                    await asyncio.sleep(retry.backoff(attempt - 1, self.rng))
                ep, next_ep = next_ep or cluster.pick(eps, req), None
                if ep is None:
                    return _Result(_error_response(503, "no healthy upstream"), ["UH"],
                                   attempts=attempt)
                try:
                    if not cluster.gate.try_acquire(limits):
                        await cluster.gate.acquire(limits)
                except Overflow:
                    return _Result(
                        Response(503, OVERLOADED, b"upstream connect error or disconnect/"
                                 b"reset before headers. reset reason: overflow"),
                        ["UO"], ep, attempt)
                cluster.begin(ep)
                resp, error, timed_out = None, None, False
                try:
                    call = self.upstreams.exchange(
                        ep, req, body, connect_timeout_s=limits.connect_timeout_s,
                        max_requests_per_connection=limits.max_requests_per_connection,
                        stream=http2)
                    per_try = retry.per_try_timeout_s if retry is not None else None
                    if per_try:
                        async with asyncio.timeout(per_try):
                            resp = await call
                    else:
                        resp = await call
                    outcome = Outcome(resp.status, resp.grpc_status) if req.grpc else \
                        _status_outcome(resp.status)
                    cluster.record(ep, resp.status, eps)
                except UpstreamError as exc:
                    error = exc
                    outcome = Outcome(error=exc.kind)
                    cluster.record(ep, None, eps)
                except TimeoutError:
                    timed_out = True
                    outcome = Outcome(error="timeout")
                    cluster.record(ep, 504, eps)
                finally:
                    cluster.end(ep)
                    cluster.gate.release()
            finally:
                if attempt > 1:
                    cluster.gate.retries -= 1
            if retry is None or not engine.should_retry(retry, outcome):
                break
            if resp is not None and resp.stream is not None and attempt < tries:
                resp.stream.cancel()  # retrying: this answer is dropped
        flags: list[str] = []
        retried_out = attempt > 1 and retry is not None and engine.should_retry(retry, outcome)
        if retried_out:
            flags.append("URX")
        if resp is not None:
            return _Result(resp, flags, ep, attempt)
        if timed_out:
            return _Result(_error_response(504, "upstream request timeout"), [*flags, "UT"], ep,
                           attempt)
        assert error is not None
        return _failed(error, flags, ep, attempt)

    # -- mirroring --

    def _mirror(self, target: Target, req: Request, body: Body) -> None:
        if len(self.mirror_tasks) >= MAX_MIRRORS_IN_FLIGHT:
            return
        task = asyncio.get_running_loop().create_task(self._mirror_one(target, req, body))
        self.mirror_tasks.add(task)
        task.add_done_callback(self.mirror_tasks.discard)

    async def _mirror_one(self, target: Target, req: Request, body: Body) -> None:
        if isinstance(body, RequestBody):  # mirror the whole request once it is in
            try:
                body = await asyncio.wait_for(body.wait_complete(), MIRROR_TIMEOUT_S)
            except (UpstreamError, TimeoutError):
                return
        try:
            _, eps = self._endpoints(target)
        except UnknownSubset as unknown:
            _log().info("mirror skipped", error=str(unknown))
            return
        cluster = self.cluster(target, req.http2)
        ep = cluster.pick(eps, req)
        if ep is None:
            return
        shadow = replace(req, authority=engine.shadow_authority(req.authority))
        try:
            await asyncio.wait_for(self.upstreams.exchange(ep, shadow, body), MIRROR_TIMEOUT_S)
        except (UpstreamError, TimeoutError) as exc:
            _log().debug("mirror failed", endpoint=ep.key, error=str(exc))

    # -- WebSocket and other upgrades --

    async def upgrade(self, req: Request, server: H1Server) -> None:
        started = self.clock()
        rec = RequestRecord(method=req.method, path=req.path, authority=req.authority,
                            source=req.source, security=self.security)
        req, planned = self._prepare(req, rec)
        if isinstance(planned, _Result):
            server.respond(planned.response)
            rec.status, rec.flags = planned.response.status, _flags(*planned.flags)
            self.metrics.record(rec)
            return
        d = planned
        try:
            svc, eps = self._endpoints(d.target)
        except UnknownSubset:
            svc, eps = None, ()
        cluster = self.cluster(d.target, False)
        ep = cluster.pick(eps, req) if eps else None
        if ep is None:
            server.respond(_error_response(503, "no healthy upstream"))
            return
        try:
            client = await self.upstreams.raw(ep)
            head, trailing = await asyncio.wait_for(client.upgrade(d.request),
                                                    d.timeout_s or 30.0)
        except (UpstreamError, TimeoutError) as exc:
            server.respond(_error_response(503, f"upstream connect error: {exc}"))
            return
        rec.upstream, rec.destination = ep.key, ep.workload
        rec.status = head.status
        rec.destination_service = svc.hostname if svc else ""
        if head.status != 101:
            client.close()
            server.respond(head)
        else:
            early = server.switch(head)
            server.raw = client.pipe.write
            client.raw = server.pipe.write

            def close_both() -> None:
                client.close()
                server.pipe.close()

            server.raw_eof = close_both
            client.raw_eof = close_both
            if early:
                client.pipe.write(early)
            if trailing:
                server.pipe.write(trailing)
        rec.duration_ms = (self.clock() - started) * 1000.0
        self.metrics.record(rec)

    def describe(self) -> dict[str, object]:
        """The admin view (``/config_dump``): routes per service, clusters, problems."""
        table = self.table
        now = self.clock()
        return {
            "waypoint": f"{self.namespace}/{self.name}",
            "version": table.snapshot.version,
            "services": {
                host: {"routes": sr.source or "default", "http_routes": len(sr.routes),
                       "destination_rule": dr.key if dr is not None else ""}
                for host, sr in sorted(table.by_host.items())
                for dr in (table.destination_rule(host),)
            },
            "policies": sorted(p.key for p in table.policies),
            "clusters": {
                c.name: {
                    "in_flight": sum(c.in_flight.values()),
                    "overflows": c.gate.overflows,
                    "ejected": sorted(k for k, h in c.health.items() if now < h.ejected_until),
                }
                for c in self.clusters.values()
            },
            "problems": list(table.problems),
            "mirrors_in_flight": len(self.mirror_tasks),
        }

    async def close(self) -> None:
        for t in list(self.mirror_tasks) + list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.mirror_tasks, *self.tasks, return_exceptions=True)
        self.upstreams.close()
