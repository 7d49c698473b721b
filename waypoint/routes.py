"""The waypoint's view of the routing configuration, built once per snapshot.

``RouteTable.build(snapshot, namespace, name)`` collects, for every service the
waypoint serves, its HTTP routes and DestinationRule. VirtualService ``http``
entries are used as they are; Gateway API HTTPRoutes whose ``parentRefs`` name a
Service are translated into the same form (``from_http_route``), so the engine
has one route type. A VirtualService for a host wins over HTTPRoutes for it,
as in Istio. Host names are made fully qualified relative to the namespace of
the object that wrote them (``reviews`` in ``bookinfo`` becomes
``reviews.bookinfo.svc.cluster.local``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from ztunnel_py.state import routing as r
from ztunnel_py.state.model import AuthorizationPolicy, FrozenMap, Service
from ztunnel_py.state.snapshot import Snapshot

CLUSTER_DOMAIN = "svc.cluster.local"


def qualify(host: str, namespace: str) -> str:
    """``reviews`` -> ``reviews.<ns>.svc.cluster.local``; ``reviews.ns`` ->
    ``reviews.ns.svc.cluster.local``; anything longer is kept."""
    host = host.lower().rstrip(".")
    if host.startswith("*") or "." not in host:
        return host if host.startswith("*") else f"{host}.{namespace}.{CLUSTER_DOMAIN}"
    if host.count(".") == 1:
        return f"{host}.{CLUSTER_DOMAIN}"
    return host


def host_matches(pattern: str, host: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return pattern == host


# -- Gateway API HTTPRoute -> VirtualService form --------------------------------------


def _string_match(kind: str | None, value: str, regex_kinds: tuple[str, ...]) -> r.StringMatch:
    if kind in regex_kinds:
        return r.StringMatch(regex=value)
    return r.StringMatch(exact=value)


def _path_match(p: r.HTTPPathMatch | None) -> r.StringMatch:
    value = (p.value if p else None) or "/"
    kind = (p.type if p else None) or "PathPrefix"
    if kind == "Exact":
        return r.StringMatch(exact=value)
    if kind == "RegularExpression":
        return r.StringMatch(regex=value)
    trimmed = value.rstrip("/")
    if not trimmed:
        return r.StringMatch(prefix="/")
    # PathPrefix matches whole path elements: /foo matches /foo and /foo/bar, not /foobar.
    return r.StringMatch(regex=re.escape(trimmed) + "(/.*)?")


def _header_ops(f: r.HTTPHeaderFilter | None) -> r.HeaderOperations | None:
    if f is None:
        return None
    return r.HeaderOperations(
        set=FrozenMap({h.name.lower(): h.value for h in f.set}),
        add=FrozenMap({h.name.lower(): h.value for h in f.add}),
        remove=tuple(n.lower() for n in f.remove),
    )


def _backend_host(name: str, namespace: str | None, route_ns: str) -> str:
    return f"{name}.{namespace or route_ns}.{CLUSTER_DOMAIN}"


def _destination(name: str, ns: str | None, port: int | None, route_ns: str) -> r.Destination:
    return r.Destination(
        host=_backend_host(name, ns, route_ns),
        port=r.PortSelector(port) if port else None,
    )


@dataclass
class _Filters:
    request: r.HeaderOperations | None = None
    response: r.HeaderOperations | None = None
    mirrors: list[r.HTTPMirrorPolicy] = field(default_factory=list)
    redirect: r.HTTPRedirect | None = None
    rewrite: r.HTTPRewrite | None = None


def _filters(filters: tuple[r.HTTPRouteFilter, ...], route_ns: str, prefix: str | None) -> _Filters:
    out = _Filters()
    for f in filters:
        if f.type == "RequestHeaderModifier":
            out.request = _header_ops(f.request_header_modifier)
        elif f.type == "ResponseHeaderModifier":
            out.response = _header_ops(f.response_header_modifier)
        elif f.type == "RequestMirror" and f.request_mirror is not None:
            m = f.request_mirror
            pct = 100.0
            if m.percent is not None:
                pct = float(m.percent)
            elif m.fraction is not None:
                pct = 100.0 * m.fraction.numerator / (m.fraction.denominator or 100)
            ref = m.backend_ref
            out.mirrors.append(
                r.HTTPMirrorPolicy(
                    _destination(ref.name, ref.namespace, ref.port, route_ns), r.Percent(pct)
                )
            )
        elif f.type == "RequestRedirect" and f.request_redirect is not None:
            rd = f.request_redirect
            uri = None
            if rd.path is not None:
                uri = rd.path.replace_full_path or rd.path.replace_prefix_match
            out.redirect = r.HTTPRedirect(
                uri=uri, authority=rd.hostname, port=rd.port, scheme=rd.scheme,
                redirect_code=rd.status_code or 302,
            )
        elif f.type == "URLRewrite" and f.url_rewrite is not None:
            rw = f.url_rewrite
            regex: r.RegexRewrite | None = None
            if rw.path is not None and rw.path.type == "ReplaceFullPath":
                regex = r.RegexRewrite(match="^.*$", rewrite=rw.path.replace_full_path or "/")
            elif rw.path is not None and rw.path.type == "ReplacePrefixMatch" and prefix:
                regex = r.RegexRewrite(
                    match="^" + re.escape(prefix.rstrip("/")),
                    rewrite=(rw.path.replace_prefix_match or "/").rstrip("/") or "",
                )
            out.rewrite = r.HTTPRewrite(authority=rw.hostname, uri_regex_rewrite=regex)
    return out


def _match(m: r.HTTPRouteMatch) -> r.HTTPMatchRequest:
    return r.HTTPMatchRequest(
        uri=_path_match(m.path),
        method=r.StringMatch(exact=m.method) if m.method else None,
        headers=FrozenMap(
            {h.name.lower(): _string_match(h.type, h.value, ("RegularExpression",))
             for h in m.headers}
        ),
        query_params=FrozenMap(
            {q.name: _string_match(q.type, q.value, ("RegularExpression",))
             for q in m.query_params}
        ),
    )


def _precedence(m: r.HTTPRouteMatch) -> tuple[int, int, int, int, int]:
    """Gateway API match precedence (higher first): exact path, longest prefix, method,
    most headers, most query params."""
    kind = (m.path.type if m.path else None) or "PathPrefix"
    value = (m.path.value if m.path else None) or "/"
    return (
        1 if kind == "Exact" else 0,
        len(value) if kind != "RegularExpression" else 0,
        1 if m.method else 0,
        len(m.headers),
        len(m.query_params),
    )


def from_http_route(route: r.KubernetesHTTPRoute) -> tuple[r.HTTPRoute, ...]:
    """One VirtualService-form route per (rule, match), in Gateway API precedence order."""
    ns = route.namespace
    entries: list[tuple[tuple[int, int, int, int, int], int, r.HTTPRoute]] = []
    for ri, rule in enumerate(route.rules):
        matches = rule.matches or (r.HTTPRouteMatch(),)
        for m in matches:
            prefix = None
            if m.path is None or (m.path.type or "PathPrefix") == "PathPrefix":
                prefix = (m.path.value if m.path else None) or "/"
            f = _filters(rule.filters, ns, prefix)
            dests = []
            for b in rule.backend_refs:
                bf = _filters(b.filters, ns, prefix)
                hdrs = (
                    r.Headers(request=bf.request, response=bf.response)
                    if bf.request or bf.response else None
                )
                dests.append(
                    r.HTTPRouteDestination(
                        destination=_destination(b.name, b.namespace, b.port, ns),
                        weight=1 if b.weight is None else b.weight,
                        headers=hdrs,
                    )
                )
            retries = None
            per_try = rule.timeouts.backend_request if rule.timeouts is not None else None
            if rule.retry is not None or per_try:
                codes = ",".join(str(c) for c in (rule.retry.codes if rule.retry else ()))
                attempts = rule.retry.attempts if rule.retry is not None else None
                retries = r.HTTPRetry(
                    # backendRequest alone keeps Istio's default number of retries
                    attempts=2 if attempts is None else attempts,
                    per_try_timeout=per_try,
                    retry_on=codes or "connect-failure,refused-stream,gateway-error",
                )
            timeout = rule.timeouts.request if rule.timeouts is not None else None
            direct = None
            if not rule.backend_refs and f.redirect is None:
                direct = r.HTTPDirectResponse(status=500)
            entries.append(
                (
                    _precedence(m),
                    len(entries),
                    r.HTTPRoute(
                        name=rule.name or f"{route.key}.{ri}",
                        match=(_match(m),),
                        route=tuple(dests),
                        redirect=f.redirect,
                        direct_response=direct,
                        rewrite=f.rewrite,
                        timeout=timeout,
                        retries=retries,
                        mirrors=tuple(f.mirrors),
                        headers=r.Headers(request=f.request, response=f.response)
                        if f.request or f.response else None,
                    ),
                )
            )
    entries.sort(key=lambda e: (tuple(-x for x in e[0]), e[1]))
    return tuple(e[2] for e in entries)


def _qualify_route(route: r.HTTPRoute, namespace: str) -> r.HTTPRoute:
    """Destination and mirror hosts made fully qualified relative to the VirtualService."""

    def dest(d: r.Destination) -> r.Destination:
        return r.Destination(host=qualify(d.host, namespace), subset=d.subset, port=d.port)

    return replace(
        route,
        route=tuple(replace(d, destination=dest(d.destination)) for d in route.route),
        mirror=dest(route.mirror) if route.mirror is not None else None,
        mirrors=tuple(replace(m, destination=dest(m.destination)) for m in route.mirrors),
    )


# -- the table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceRoutes:
    service: Service
    routes: tuple[r.HTTPRoute, ...]  # empty: the default route to the service itself
    source: str = ""  # "VirtualService ns/name" / "HTTPRoute ns/name"; "" for the default
    # Only for the service port numbers listed (HTTPRoute parentRefs with a port); () = all.
    ports: tuple[int, ...] = ()


@dataclass(frozen=True)
class RouteTable:
    namespace: str
    name: str
    snapshot: Snapshot
    by_host: FrozenMap[str, ServiceRoutes]
    destination_rules: FrozenMap[str, r.DestinationRule]
    policies: tuple[AuthorizationPolicy, ...]
    problems: tuple[str, ...] = ()

    @staticmethod
    def build(snapshot: Snapshot, namespace: str, name: str) -> RouteTable:
        services = {s.hostname: s for s in snapshot.services}
        vs_routes: dict[str, ServiceRoutes] = {}
        hr_routes: dict[str, list[tuple[str, r.KubernetesHTTPRoute, int | None]]] = {}
        drs: dict[str, r.DestinationRule] = {}
        problems: list[str] = []
        for obj in sorted(
            (o for o in snapshot.routing if hasattr(o, "key")), key=lambda o: str(o.key)
        ):
            if isinstance(obj, r.VirtualService):
                if obj.gateways and "mesh" not in obj.gateways:
                    continue
                routes = tuple(_qualify_route(h, obj.namespace) for h in obj.http)
                for pattern in (qualify(h, obj.namespace) for h in obj.hosts):
                    for host in services:
                        if host_matches(pattern, host) and host not in vs_routes:
                            vs_routes[host] = ServiceRoutes(
                                services[host], routes, f"VirtualService {obj.key}"
                            )
            elif isinstance(obj, r.KubernetesHTTPRoute):
                for ref in obj.parent_refs:
                    if (ref.kind or "Gateway") != "Service" or ref.group not in (None, "", "core"):
                        continue
                    host = f"{ref.name}.{ref.namespace or obj.namespace}.{CLUSTER_DOMAIN}"
                    hr_routes.setdefault(host, []).append((obj.key, obj, ref.port))
            elif isinstance(obj, r.DestinationRule):
                host = qualify(obj.host, obj.namespace)
                for h in services:
                    if host_matches(host, h):
                        drs.setdefault(h, obj)
        by_host: dict[str, ServiceRoutes] = {}
        for host, svc in services.items():
            if host in vs_routes:
                by_host[host] = vs_routes[host]
                if host in hr_routes:
                    problems.append(
                        f"{host}: HTTPRoute {hr_routes[host][0][0]} ignored, "
                        f"{vs_routes[host].source} applies"
                    )
            elif host in hr_routes:
                entries = hr_routes[host]
                routes = tuple(rt for _, obj, _ in entries for rt in from_http_route(obj))
                ports = tuple(p for _, _, p in entries if p)
                by_host[host] = ServiceRoutes(svc, routes, f"HTTPRoute {entries[0][0]}",
                                              ports if len(ports) == len(entries) else ())
            else:
                by_host[host] = ServiceRoutes(svc, ())
        policies = tuple(
            p for p in snapshot.authorization_policies if _targets_waypoint(p, namespace, name)
        )
        return RouteTable(
            namespace, name, snapshot, FrozenMap[str, ServiceRoutes](by_host),
            FrozenMap[str, r.DestinationRule](drs), policies,
            tuple(problems),
        )

    def service_at(self, ip: str, port: int) -> Service | None:
        return self.snapshot.service_for(ip, port)

    def routes_for(self, service: Service, port: int) -> ServiceRoutes:
        found: ServiceRoutes | None = self.by_host.get(service.hostname)
        if found is None or (found.ports and port not in found.ports):
            return ServiceRoutes(service, ())
        return found

    def destination_rule(self, host: str) -> r.DestinationRule | None:
        dr: r.DestinationRule | None = self.destination_rules.get(host)
        return dr

    def service(self, host: str) -> Service | None:
        sr = self.by_host.get(host)
        return sr.service if sr is not None else None

    def policies_for(self, service: Service | None) -> tuple[AuthorizationPolicy, ...]:
        """Policies attached to this waypoint (Gateway targetRef) or to the service."""
        out = []
        for p in self.policies:
            for ref in p.target_refs:
                ns = ref.namespace or p.namespace
                if ref.kind == "Gateway" and ref.name == self.name and ns == self.namespace:
                    out.append(p)
                    break
                if (
                    service is not None and ref.kind == "Service"
                    and ref.name == service.name and ns == service.namespace
                ):
                    out.append(p)
                    break
        return tuple(out)


def _targets_waypoint(p: AuthorizationPolicy, namespace: str, name: str) -> bool:
    if not p.target_refs:
        return False
    for ref in p.target_refs:
        ns = ref.namespace or p.namespace
        if ref.kind == "Gateway" and ref.name == name and ns == namespace:
            return True
        if ref.kind == "Service":
            return True
    return False
