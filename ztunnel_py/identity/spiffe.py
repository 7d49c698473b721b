"""SPIFFE ids of the mesh: ``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ztunnel_py.identity.errors import IdentityError

# A trust domain is a DNS-like name; namespaces and service accounts are DNS-1123 labels
# or subdomains. We stay strict: anything else is refused rather than guessed at.
_TRUST_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,251}[a-z0-9])?$")
_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


@dataclass(frozen=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


def parse(uri: str) -> SpiffeId:
    """Parse a mesh SPIFFE id; raise :class:`IdentityError` saying what is wrong."""
    prefix = "spiffe://"
    if not uri.startswith(prefix):
        raise IdentityError(f"{uri!r} is not a SPIFFE id (expected spiffe://<td>/ns/<ns>/sa/<sa>)")
    trust_domain, sep, path = uri[len(prefix):].partition("/")
    parts = path.split("/")
    if not sep or len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
        raise IdentityError(
            f"{uri!r} is not a workload SPIFFE id: expected spiffe://<td>/ns/<ns>/sa/<sa>"
        )
    if not _TRUST_DOMAIN.match(trust_domain):
        raise IdentityError(f"{uri!r}: trust domain {trust_domain!r} is not a valid DNS-like name")
    ns, sa = parts[1], parts[3]
    for what, value in (("namespace", ns), ("service account", sa)):
        if not _NAME.match(value):
            raise IdentityError(f"{uri!r}: {what} {value!r} is not a valid Kubernetes name")
    return SpiffeId(trust_domain, ns, sa)


def check_trust_domain(uri: str, trust_domain: str) -> SpiffeId:
    """Parse ``uri`` and require it to belong to ``trust_domain``."""
    sid = parse(uri)
    if sid.trust_domain != trust_domain:
        raise IdentityError(
            f"{uri!r} belongs to trust domain {sid.trust_domain!r}, not {trust_domain!r}: "
            "the peer is from another mesh, or TRUST_DOMAIN differs between components"
        )
    return sid
