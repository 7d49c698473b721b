"""L7 routing model: Istio VirtualService / DestinationRule / Gateway and Gateway API
Gateway / HTTPRoute, as frozen dataclasses.

Field names are Istio's (and the Gateway API's) in snake_case: ``perTryTimeout``
becomes ``per_try_timeout``, ``consecutive5xxErrors`` ``consecutive_5xx_errors``.
The translator maps the published camelCase field names onto these by that rule
(``wire_name``), so adding a field here is all it takes to accept it; a field
whose wire name does not follow the rule says so in ``metadata={"wire": ...}``.

Optional scalars are ``None`` when absent so that consumers (the waypoint) can
tell "unset" from a zero value. Durations keep Istio's text form ("1.5s",
"100ms"); ``parse_duration`` turns them into seconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NewType

from ztunnel_py.state.model import FrozenMap

Duration = NewType("Duration", str)  # "10s", "1.5s", "250ms", "1h2m"

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)(h|m|s|ms|us|µs|ns))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def is_duration(text: str) -> bool:
    return bool(_DURATION.match(text))


def parse_duration(text: str) -> float:
    """Seconds in an Istio/Go duration string; ``ValueError`` if it is not one."""
    if not is_duration(text):
        raise ValueError(f"{text!r} is not a duration (examples: 10s, 1.5s, 250ms, 1h)")
    return sum(float(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(text))


def wire(name: str) -> dict[str, str]:
    """Field metadata for a wire name that does not follow the camelCase rule."""
    return {"wire": name}


# -- shared pieces ----------------------------------------------------------------


@dataclass(frozen=True)
class StringMatch:
    """One of exact / prefix / regex (Istio ``StringMatch``)."""

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None


@dataclass(frozen=True)
class Percent:
    value: float = 0.0


@dataclass(frozen=True)
class PortSelector:
    number: int = 0


@dataclass(frozen=True)
class WorkloadSelector:
    match_labels: FrozenMap[str, str] = field(default_factory=FrozenMap)


# -- VirtualService (networking.istio.io) ---------------------------------------------


@dataclass(frozen=True)
class Destination:
    host: str = ""
    subset: str | None = None
    port: PortSelector | None = None


@dataclass(frozen=True)
class HeaderOperations:
    set: FrozenMap[str, str] = field(default_factory=FrozenMap)
    add: FrozenMap[str, str] = field(default_factory=FrozenMap)
    remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class Headers:
    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


@dataclass(frozen=True)
class HTTPRouteDestination:
    destination: Destination = field(default_factory=Destination)
    weight: int | None = None
    headers: Headers | None = None


@dataclass(frozen=True)
class RouteDestination:
    destination: Destination = field(default_factory=Destination)
    weight: int | None = None


@dataclass(frozen=True)
class HTTPMatchRequest:
    name: str | None = None
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: FrozenMap[str, StringMatch] = field(default_factory=FrozenMap)
    port: int | None = None
    source_labels: FrozenMap[str, str] = field(default_factory=FrozenMap)
    gateways: tuple[str, ...] = ()
    query_params: FrozenMap[str, StringMatch] = field(default_factory=FrozenMap)
    ignore_uri_case: bool | None = None
    without_headers: FrozenMap[str, StringMatch] = field(default_factory=FrozenMap)
    source_namespace: str | None = None
    stat_prefix: str | None = None


@dataclass(frozen=True)
class RegexRewrite:
    match: str = ""
    rewrite: str = ""


@dataclass(frozen=True)
class HTTPRewrite:
    uri: str | None = None
    authority: str | None = None
    uri_regex_rewrite: RegexRewrite | None = None


@dataclass(frozen=True)
class HTTPRedirect:
    uri: str | None = None
    authority: str | None = None
    port: int | None = None
    derive_port: str | None = None  # FROM_PROTOCOL_DEFAULT | FROM_REQUEST_PORT
    scheme: str | None = None
    redirect_code: int | None = None


@dataclass(frozen=True)
class HTTPBody:
    string: str | None = None
    bytes: str | None = None  # base64, as in Istio


@dataclass(frozen=True)
class HTTPDirectResponse:
    status: int = 0
    body: HTTPBody | None = None


@dataclass(frozen=True)
class HTTPRetry:
    attempts: int | None = None
    per_try_timeout: Duration | None = None
    retry_on: str | None = None
    retry_remote_localities: bool | None = None


@dataclass(frozen=True)
class FaultDelay:
    fixed_delay: Duration | None = None
    percentage: Percent | None = None
    percent: int | None = None  # deprecated in Istio, still accepted


@dataclass(frozen=True)
class FaultAbort:
    http_status: int | None = None
    grpc_status: str | None = None
    percentage: Percent | None = None


@dataclass(frozen=True)
class HTTPFaultInjection:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


@dataclass(frozen=True)
class HTTPMirrorPolicy:
    destination: Destination = field(default_factory=Destination)
    percentage: Percent | None = None


@dataclass(frozen=True)
class CorsPolicy:
    allow_origins: tuple[StringMatch, ...] = ()
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age: Duration | None = None
    allow_credentials: bool | None = None


@dataclass(frozen=True)
class HTTPRoute:
    """One entry of a VirtualService's ``http`` list."""

    name: str | None = None
    match: tuple[HTTPMatchRequest, ...] = ()
    route: tuple[HTTPRouteDestination, ...] = ()
    redirect: HTTPRedirect | None = None
    direct_response: HTTPDirectResponse | None = None
    rewrite: HTTPRewrite | None = None
    timeout: Duration | None = None
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    mirror: Destination | None = None
    mirrors: tuple[HTTPMirrorPolicy, ...] = ()
    mirror_percentage: Percent | None = None
    cors_policy: CorsPolicy | None = None
    headers: Headers | None = None


@dataclass(frozen=True)
class L4MatchAttributes:
    destination_subnets: tuple[str, ...] = ()
    port: int | None = None
    source_labels: FrozenMap[str, str] = field(default_factory=FrozenMap)
    gateways: tuple[str, ...] = ()
    source_namespace: str | None = None


@dataclass(frozen=True)
class TCPRoute:
    match: tuple[L4MatchAttributes, ...] = ()
    route: tuple[RouteDestination, ...] = ()


@dataclass(frozen=True)
class TLSMatchAttributes:
    sni_hosts: tuple[str, ...] = ()
    destination_subnets: tuple[str, ...] = ()
    port: int | None = None
    source_labels: FrozenMap[str, str] = field(default_factory=FrozenMap)
    gateways: tuple[str, ...] = ()
    source_namespace: str | None = None


@dataclass(frozen=True)
class TLSRoute:
    match: tuple[TLSMatchAttributes, ...] = ()
    route: tuple[RouteDestination, ...] = ()


@dataclass(frozen=True)
class VirtualService:
    name: str
    namespace: str
    hosts: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    http: tuple[HTTPRoute, ...] = ()
    tls: tuple[TLSRoute, ...] = ()
    tcp: tuple[TCPRoute, ...] = ()
    export_to: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# -- DestinationRule -------------------------------------------------------------------


@dataclass(frozen=True)
class HTTPCookie:
    name: str = ""
    path: str | None = None
    ttl: Duration | None = None


@dataclass(frozen=True)
class RingHash:
    minimum_ring_size: int | None = None


@dataclass(frozen=True)
class Maglev:
    table_size: int | None = None


@dataclass(frozen=True)
class ConsistentHashLB:
    http_header_name: str | None = None
    http_cookie: HTTPCookie | None = None
    use_source_ip: bool | None = None
    http_query_parameter_name: str | None = None
    ring_hash: RingHash | None = None
    maglev: Maglev | None = None
    minimum_ring_size: int | None = None


@dataclass(frozen=True)
class LoadBalancerSettings:
    simple: str | None = None  # UNSPECIFIED | RANDOM | PASSTHROUGH | ROUND_ROBIN | LEAST_REQUEST
    consistent_hash: ConsistentHashLB | None = None
    warmup_duration_secs: Duration | None = None


@dataclass(frozen=True)
class TcpKeepalive:
    probes: int | None = None
    time: Duration | None = None
    interval: Duration | None = None


@dataclass(frozen=True)
class TCPSettings:
    max_connections: int | None = None
    connect_timeout: Duration | None = None
    tcp_keepalive: TcpKeepalive | None = None
    max_connection_duration: Duration | None = None
    idle_timeout: Duration | None = None


@dataclass(frozen=True)
class HTTPSettings:
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout: Duration | None = None
    h2_upgrade_policy: str | None = None
    use_client_protocol: bool | None = None
    max_concurrent_streams: int | None = None


@dataclass(frozen=True)
class ConnectionPoolSettings:
    tcp: TCPSettings | None = None
    http: HTTPSettings | None = None


@dataclass(frozen=True)
class OutlierDetection:
    split_external_local_origin_errors: bool | None = None
    consecutive_local_origin_failures: int | None = None
    consecutive_gateway_errors: int | None = None
    consecutive_5xx_errors: int | None = None
    interval: Duration | None = None
    base_ejection_time: Duration | None = None
    max_ejection_percent: int | None = None
    min_health_percent: int | None = None


@dataclass(frozen=True)
class ClientTLSSettings:
    mode: str | None = None  # DISABLE | SIMPLE | MUTUAL | ISTIO_MUTUAL
    client_certificate: str | None = None
    private_key: str | None = None  # a file path, as in Istio; never key material
    ca_certificates: str | None = None
    credential_name: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    sni: str | None = None
    insecure_skip_verify: bool | None = None


@dataclass(frozen=True)
class PortTrafficPolicy:
    port: PortSelector | None = None
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None


@dataclass(frozen=True)
class TrafficPolicy:
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None
    port_level_settings: tuple[PortTrafficPolicy, ...] = ()


@dataclass(frozen=True)
class Subset:
    name: str = ""
    labels: FrozenMap[str, str] = field(default_factory=FrozenMap)
    traffic_policy: TrafficPolicy | None = None


@dataclass(frozen=True)
class DestinationRule:
    name: str
    namespace: str
    host: str = ""
    traffic_policy: TrafficPolicy | None = None
    subsets: tuple[Subset, ...] = ()
    export_to: tuple[str, ...] = ()
    workload_selector: WorkloadSelector | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def subset(self, name: str) -> Subset | None:
        return next((s for s in self.subsets if s.name == name), None)


# -- Gateway (networking.istio.io) -----------------------------------------------------


@dataclass(frozen=True)
class GatewayPort:
    number: int = 0
    protocol: str = ""
    name: str = ""
    target_port: int | None = None


@dataclass(frozen=True)
class ServerTLSSettings:
    https_redirect: bool | None = None
    mode: str | None = None  # PASSTHROUGH | SIMPLE | MUTUAL | AUTO_PASSTHROUGH | ISTIO_MUTUAL
    server_certificate: str | None = None
    private_key: str | None = None  # a file path, never key material
    ca_certificates: str | None = None
    credential_name: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    min_protocol_version: str | None = None
    max_protocol_version: str | None = None
    cipher_suites: tuple[str, ...] = ()


@dataclass(frozen=True)
class Server:
    port: GatewayPort = field(default_factory=GatewayPort)
    hosts: tuple[str, ...] = ()
    bind: str | None = None
    tls: ServerTLSSettings | None = None
    name: str | None = None
    default_endpoint: str | None = None


@dataclass(frozen=True)
class Gateway:
    """``networking.istio.io`` Gateway (ingress/egress gateways)."""

    name: str
    namespace: str
    selector: FrozenMap[str, str] = field(default_factory=FrozenMap)
    servers: tuple[Server, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# -- Gateway API (gateway.networking.k8s.io) --------------------------------------------

WAYPOINT_GATEWAY_CLASS = "istio-waypoint"


@dataclass(frozen=True)
class GatewayTLSConfig:
    mode: str | None = None  # Terminate | Passthrough
    certificate_refs: tuple[SecretObjectReference, ...] = ()
    options: FrozenMap[str, str] = field(default_factory=FrozenMap)


@dataclass(frozen=True)
class SecretObjectReference:
    name: str = ""
    group: str | None = None
    kind: str | None = None
    namespace: str | None = None


@dataclass(frozen=True)
class RouteNamespaces:
    from_: str | None = field(default=None, metadata=wire("from"))  # All | Same | Selector
    selector: WorkloadSelector | None = None


@dataclass(frozen=True)
class RouteGroupKind:
    kind: str = ""
    group: str | None = None


@dataclass(frozen=True)
class AllowedRoutes:
    namespaces: RouteNamespaces | None = None
    kinds: tuple[RouteGroupKind, ...] = ()


@dataclass(frozen=True)
class Listener:
    name: str = ""
    port: int = 0
    protocol: str = ""  # HTTP | HTTPS | TLS | TCP | UDP | HBONE
    hostname: str | None = None
    tls: GatewayTLSConfig | None = None
    allowed_routes: AllowedRoutes | None = None


@dataclass(frozen=True)
class GatewayAddress:
    value: str = ""
    type: str | None = None


@dataclass(frozen=True)
class KubernetesGateway:
    """``gateway.networking.k8s.io`` Gateway; class ``istio-waypoint`` makes a waypoint."""

    name: str
    namespace: str
    gateway_class_name: str = ""
    listeners: tuple[Listener, ...] = ()
    addresses: tuple[GatewayAddress, ...] = ()
    labels: FrozenMap[str, str] = field(default_factory=FrozenMap)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def is_waypoint(self) -> bool:
        return self.gateway_class_name == WAYPOINT_GATEWAY_CLASS


@dataclass(frozen=True)
class ParentReference:
    name: str = ""
    group: str | None = None
    kind: str | None = None
    namespace: str | None = None
    section_name: str | None = None
    port: int | None = None


@dataclass(frozen=True)
class HTTPPathMatch:
    type: str | None = None  # Exact | PathPrefix | RegularExpression
    value: str | None = None


@dataclass(frozen=True)
class HTTPHeaderMatch:
    name: str = ""
    value: str = ""
    type: str | None = None  # Exact | RegularExpression


@dataclass(frozen=True)
class HTTPRouteMatch:
    path: HTTPPathMatch | None = None
    headers: tuple[HTTPHeaderMatch, ...] = ()
    query_params: tuple[HTTPHeaderMatch, ...] = ()
    method: str | None = None


@dataclass(frozen=True)
class HTTPHeader:
    name: str = ""
    value: str = ""


@dataclass(frozen=True)
class HTTPHeaderFilter:
    set: tuple[HTTPHeader, ...] = ()
    add: tuple[HTTPHeader, ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class HTTPPathModifier:
    type: str = ""  # ReplaceFullPath | ReplacePrefixMatch
    replace_full_path: str | None = None
    replace_prefix_match: str | None = None


@dataclass(frozen=True)
class HTTPRequestRedirectFilter:
    scheme: str | None = None
    hostname: str | None = None
    path: HTTPPathModifier | None = None
    port: int | None = None
    status_code: int | None = None


@dataclass(frozen=True)
class HTTPURLRewriteFilter:
    hostname: str | None = None
    path: HTTPPathModifier | None = None


@dataclass(frozen=True)
class Fraction:
    numerator: int = 0
    denominator: int | None = None


@dataclass(frozen=True)
class BackendObjectReference:
    name: str = ""
    group: str | None = None
    kind: str | None = None
    namespace: str | None = None
    port: int | None = None


@dataclass(frozen=True)
class HTTPRequestMirrorFilter:
    backend_ref: BackendObjectReference = field(default_factory=BackendObjectReference)
    percent: int | None = None
    fraction: Fraction | None = None


@dataclass(frozen=True)
class LocalObjectReference:
    group: str = ""
    kind: str = ""
    name: str = ""


@dataclass(frozen=True)
class HTTPRouteFilter:
    type: str = ""  # RequestHeaderModifier | ResponseHeaderModifier | RequestMirror | ...
    request_header_modifier: HTTPHeaderFilter | None = None
    response_header_modifier: HTTPHeaderFilter | None = None
    request_mirror: HTTPRequestMirrorFilter | None = None
    request_redirect: HTTPRequestRedirectFilter | None = None
    url_rewrite: HTTPURLRewriteFilter | None = None
    extension_ref: LocalObjectReference | None = None


@dataclass(frozen=True)
class HTTPBackendRef:
    name: str = ""
    group: str | None = None
    kind: str | None = None
    namespace: str | None = None
    port: int | None = None
    weight: int | None = None
    filters: tuple[HTTPRouteFilter, ...] = ()


@dataclass(frozen=True)
class HTTPRouteTimeouts:
    request: Duration | None = None
    backend_request: Duration | None = None


@dataclass(frozen=True)
class HTTPRouteRetry:
    codes: tuple[int, ...] = ()
    attempts: int | None = None
    backoff: Duration | None = None


@dataclass(frozen=True)
class HTTPRouteRule:
    name: str | None = None
    matches: tuple[HTTPRouteMatch, ...] = ()
    filters: tuple[HTTPRouteFilter, ...] = ()
    backend_refs: tuple[HTTPBackendRef, ...] = ()
    timeouts: HTTPRouteTimeouts | None = None
    retry: HTTPRouteRetry | None = None


@dataclass(frozen=True)
class KubernetesHTTPRoute:
    """``gateway.networking.k8s.io`` HTTPRoute."""

    name: str
    namespace: str
    parent_refs: tuple[ParentReference, ...] = ()
    hostnames: tuple[str, ...] = ()
    rules: tuple[HTTPRouteRule, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


RoutingObject = VirtualService | DestinationRule | Gateway | KubernetesGateway | KubernetesHTTPRoute
