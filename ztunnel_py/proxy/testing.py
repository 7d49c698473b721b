"""Fakes beside the real data path: certificates from an in-memory CA, an
original-destination table, and a loopback mesh of agents for tests and benchmarks.

Loopback layout (no root needed): every "pod" gets its own 127.x.y.z address;
a node's agent listens for HBONE on ``<pod ip>:15008`` for each of its pods
(what the capture does for real), and its outbound listener on an ephemeral
port of the node's own address. Clients bind their pod's address as source
and tell the ``DstTable`` where they "meant" to connect before connecting.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from ztunnel_py.config import HBONE_PORT, HboneConfig
from ztunnel_py.identity.certs import WorkloadCertificate
from ztunnel_py.identity.testing import InMemoryCA
from ztunnel_py.proxy.inbound_plaintext import Strict, never_strict
from ztunnel_py.proxy.outbound import Authorizer, allow_all
from ztunnel_py.proxy.server import Proxy
from ztunnel_py.proxy.sockets import Address, UpstreamFactory, plain_listener, plain_upstream
from ztunnel_py.state.model import Workload
from ztunnel_py.state.snapshot import Snapshot, StateStore


class CaCertificates:
    """A ``CertificateSource`` that issues straight from an ``InMemoryCA`` (cached)."""

    def __init__(self, ca: InMemoryCA, ttl_s: float = 3600) -> None:
        self.ca = ca
        self.ttl_s = ttl_s
        self._cache: dict[str, WorkloadCertificate] = {}
        self.fetches = 0

    async def fetch(self, identity: str) -> WorkloadCertificate:
        self.fetches += 1
        cert = self._cache.get(identity)
        if cert is None:
            cert = self._cache[identity] = self.ca.issue(identity, self.ttl_s)
        return cert


class DstTable:
    """The original-destination seam for loopback: by client (ip, port), or by listener port."""

    def __init__(self) -> None:
        self.by_peer: dict[Address, Address] = {}
        self.by_listen_port: dict[int, Address] = {}

    def __call__(self, local: Address, peer: Address) -> Address:
        fixed = self.by_listen_port.get(local[1])
        if fixed is not None:
            return fixed
        dst = self.by_peer.pop(peer, None)
        return dst if dst is not None else local


def loopback_prefix() -> str:
    """A random 127.a.b. prefix so that parallel runs do not collide on :15008."""
    return f"127.{random.randint(64, 250)}.{random.randint(1, 250)}."  # noqa: S311


@dataclass
class Agent:
    node: str
    address: str  # the node's own address (outbound listener)
    proxy: Proxy

    @property
    def outbound(self) -> Address:
        return self.proxy.addresses["outbound"][0]

    @property
    def plaintext(self) -> Address:
        return self.proxy.addresses["inbound_plaintext"][0]


@dataclass
class LoopbackMesh:
    """Agents for ``nodes`` with ``workloads`` (whose ips must be loopback addresses)."""

    workloads: Sequence[Workload]
    nodes: Sequence[str]
    prefix: str
    config: HboneConfig = field(default_factory=HboneConfig)
    trust_domain: str = "cluster.local"
    authorizer: Authorizer = allow_all
    strict: Strict = never_strict
    upstream: UpstreamFactory = plain_upstream
    ca: InMemoryCA = field(default_factory=InMemoryCA)
    dst: DstTable = field(default_factory=DstTable)
    agents: dict[str, Agent] = field(default_factory=dict)
    store: StateStore = field(default_factory=StateStore)

    async def start(self) -> None:
        self.store.swap(Snapshot(version="1", workloads=tuple(self.workloads)))
        certs = CaCertificates(self.ca)
        for i, node in enumerate(self.nodes, start=1):
            addr = f"{self.prefix}{i}"
            pods = [w.ips[0] for w in self.workloads if w.node == node and w.enrolled]
            proxy = Proxy(
                self.config, self.store, node, certs,
                trust_domain=self.trust_domain, authorizer=self.authorizer, strict=self.strict,
                listener=plain_listener, upstream=self.upstream, original_dst=self.dst,
                outbound=((addr, 0),),
                inbound=tuple((ip, HBONE_PORT) for ip in pods),
                inbound_plaintext=((addr, 0),),
            )
            self.agents[node] = Agent(node, addr, proxy)
            try:
                await proxy.start()
            except BaseException:
                await self.stop()
                raise

    async def stop(self) -> None:
        for agent in self.agents.values():
            await agent.proxy.stop()

    async def connect(
        self, src_ip: str, dst: Address, *, via: str | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A client in pod ``src_ip`` connecting to ``dst``, captured by its node's agent."""
        sock = await self.client_socket(src_ip, dst, via=via)
        return await asyncio.open_connection(sock=sock)

    async def client_socket(
        self, src_ip: str, dst: Address, *, via: str | None = None
    ) -> socket.socket:
        """A connected non-blocking socket, as above (the caller owns it)."""
        w = next(w for w in self.workloads if src_ip in w.ips)
        agent = self.agents[via or w.node]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((src_ip, 0))
            self.dst.by_peer[(src_ip, sock.getsockname()[1])] = dst
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, agent.outbound)
        except BaseException:
            sock.close()
            raise
        return sock
