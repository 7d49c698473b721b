"""Value matchers of Istio's AuthorizationPolicy, as the node agent evaluates them.

Strings (principals, namespaces) follow Istio's rules: ``*`` matches any
non-empty value, ``abc*`` is a prefix match, ``*abc`` a suffix match, anything
else is exact. Principals are written without the ``spiffe://`` scheme
(``cluster.local/ns/default/sa/sleep``) and a peer without a SPIFFE identity
matches no principal, as in Istio's ztunnel (``rbac.rs``). IP blocks are CIDRs
or single addresses; ports are decimal numbers.

Parsing a value that Istio would not accept returns ``None`` so that the
compiler can say which value was wrong.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Kind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    PRESENCE = "presence"


@dataclass(frozen=True)
class StringMatch:
    kind: Kind
    value: str = ""

    @staticmethod
    def parse(pattern: str) -> StringMatch:
        if pattern == "*":
            return StringMatch(Kind.PRESENCE)
        if pattern.startswith("*"):
            return StringMatch(Kind.SUFFIX, pattern[1:])
        if pattern.endswith("*"):
            return StringMatch(Kind.PREFIX, pattern[:-1])
        return StringMatch(Kind.EXACT, pattern)

    def matches(self, value: str) -> bool:
        if self.kind is Kind.PRESENCE:
            return value != ""
        if self.kind is Kind.PREFIX:
            return value.startswith(self.value)
        if self.kind is Kind.SUFFIX:
            return value.endswith(self.value)
        return value == self.value


SPIFFE_SCHEME = "spiffe://"


def principal_of(identity: str | None) -> str:
    """The principal Istio matches against: the SPIFFE id without its scheme, or ""."""
    if not identity or not identity.startswith(SPIFFE_SCHEME):
        return ""
    return identity[len(SPIFFE_SCHEME):]


def parse_ip_block(block: str) -> IPNetwork | None:
    """``10.0.0.0/8`` or ``10.1.2.3`` (a /32 or /128); None if it is neither."""
    try:
        return ipaddress.ip_network(block.strip(), strict=False)
    except ValueError:
        return None


def parse_port(port: str) -> int | None:
    text = port.strip()
    if not text.isdigit():
        return None
    number = int(text)
    return number if 0 < number <= 65535 else None


def parse_ip(ip: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(ip)
    except ValueError:
        return None


def addr_in(address: IPAddress | None, networks: tuple[IPNetwork, ...]) -> bool:
    if address is None:
        return False
    return any(address.version == net.version and address in net for net in networks)


def ip_in(ip: str, networks: tuple[IPNetwork, ...]) -> bool:
    return addr_in(parse_ip(ip), networks)
