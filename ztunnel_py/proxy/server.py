"""The agent's data path: the three listeners, the pool, and graceful drain.

``Proxy`` owns outbound (:15001), inbound HBONE (:15008) and inbound
plaintext (:15006). ``start()`` binds them through the listener seam;
``drain(deadline)`` (SIGTERM) stops accepting, lets open connections finish
until the deadline and then closes what is left; ``stop()`` closes at once.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Sequence

from ztunnel_py import log
from ztunnel_py.config import (
    HBONE_PORT,
    INBOUND_PLAINTEXT_PORT,
    OUTBOUND_PORT,
    AgentConfig,
    HboneConfig,
)
from ztunnel_py.identity.manager import CertificateSource
from ztunnel_py.policy.types import Connection, Verdict
from ztunnel_py.proxy.inbound import Inbound
from ztunnel_py.proxy.inbound_plaintext import InboundPlaintext, Strict, never_strict
from ztunnel_py.proxy.outbound import Authorizer, Outbound, allow_all
from ztunnel_py.proxy.pool import ConnectionPool, ContextCache, DialMap
from ztunnel_py.proxy.relay import Relay
from ztunnel_py.proxy.sockets import (
    Address,
    ListenerFactory,
    OriginalDst,
    UpstreamFactory,
    marked_upstream,
    plain_listener,
    plain_upstream,
    sockname_original_dst,
)
from ztunnel_py.state.snapshot import StateStore

_log = log.get("proxy")

Recheck = Callable[[list[Connection]], list[tuple[Connection, Verdict]]]


class Proxy:
    def __init__(
        self,
        config: HboneConfig,
        store: StateStore,
        node: str,
        certificates: CertificateSource,
        *,
        trust_domain: str = "cluster.local",
        authorizer: Authorizer = allow_all,
        strict: Strict = never_strict,
        listener: ListenerFactory = plain_listener,
        upstream: UpstreamFactory = plain_upstream,
        original_dst: OriginalDst = sockname_original_dst,
        outbound: Sequence[Address] = (("0.0.0.0", OUTBOUND_PORT),),
        inbound: Sequence[Address] = (("0.0.0.0", HBONE_PORT),),
        inbound_plaintext: Sequence[Address] = (("0.0.0.0", INBOUND_PLAINTEXT_PORT),),
        hbone_port: int = HBONE_PORT,
        hbone_dial: DialMap | None = None,
    ) -> None:
        self.config = config
        self.node = node
        self._listener = listener
        self._binds = {
            "outbound": tuple(outbound),
            "inbound": tuple(inbound),
            "inbound_plaintext": tuple(inbound_plaintext),
        }
        contexts = ContextCache()
        self.pool = ConnectionPool(
            config, certificates, trust_domain, upstream=upstream, contexts=contexts,
            dial=hbone_dial,
        )
        self.outbound = Outbound(
            config, store, node, self.pool, authorizer=authorizer,
            original_dst=original_dst, upstream=upstream, hbone_port=hbone_port,
        )
        self.inbound = Inbound(
            config, store, node, certificates, trust_domain, authorizer=authorizer,
            dialled=original_dst, upstream=upstream, contexts=contexts,
        )
        self.plaintext = InboundPlaintext(
            config, store, node, authorizer=authorizer, strict=strict,
            original_dst=original_dst, upstream=upstream,
        )
        self._servers: list[asyncio.AbstractServer] = []
        self._accept_socks: list[socket.socket] = []
        self._accept_tasks: list[asyncio.Task[None]] = []
        self.addresses: dict[str, list[Address]] = {}

    @classmethod
    def from_config(
        cls,
        cfg: AgentConfig,
        store: StateStore,
        certificates: CertificateSource,
        *,
        socket_mark: int | None = None,
        **seams: object,
    ) -> Proxy:
        """Wiring for ``app.py``: listeners on ``cfg.bind_ip``; upstream sockets carry
        ``SO_MARK`` = ``socket_mark`` (default ``cfg.socket_mark``; 0 = unmarked).
        ``seams`` override any constructor argument (listener, upstream, original_dst,
        authorizer, strict, ...)."""
        if socket_mark is None:
            socket_mark = cfg.socket_mark
        kwargs: dict[str, object] = {
            "trust_domain": cfg.trust_domain,
            "outbound": ((cfg.bind_ip, OUTBOUND_PORT),),
            "inbound": ((cfg.bind_ip, HBONE_PORT),),
            "inbound_plaintext": ((cfg.bind_ip, INBOUND_PLAINTEXT_PORT),),
        }
        if socket_mark:
            kwargs["upstream"] = marked_upstream(socket_mark)
        kwargs.update(seams)
        return cls(cfg.hbone, store, cfg.node, certificates, **kwargs)  # type: ignore[arg-type]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.outbound.loop = loop
        factories = {
            "outbound": self.outbound.protocol,
            "inbound_plaintext": self.plaintext.protocol,
        }
        try:
            for name, binds in self._binds.items():
                bound: list[Address] = []
                for host, port in binds:
                    sock = self._listener(host, port)
                    bound.append(sock.getsockname()[:2])
                    if name == "inbound":
                        # accepted by hand: the certificate depends on the dialled address
                        self._accept_socks.append(sock)
                        self._accept_tasks.append(loop.create_task(self.inbound.serve(sock)))
                        continue
                    server = await loop.create_server(factories[name], sock=sock)
                    self._servers.append(server)
                self.addresses[name] = bound
        except BaseException:
            await self.stop()
            raise
        _log.info("proxy listening", node=self.node,
                  **{k: [f"{h}:{p}" for h, p in v] for k, v in self.addresses.items()})

    def revoke(self, recheck: Recheck) -> int:
        """Abort the open connections that ``recheck`` denies (a policy change); their count.

        ``recheck`` is ``lambda conns: policy.recheck(conns, new_snapshot)``: it
        returns the (connection, verdict) pairs the new policy denies.
        """
        guarded = [
            *self.outbound.relays.authorized(), *self.inbound.relays.authorized(),
            *self.plaintext.relays.authorized(),
        ]
        if not guarded:
            return 0
        relay_of = {id(conn): relay for relay, conn in guarded}
        denied = recheck([conn for _relay, conn in guarded])
        for conn, verdict in denied:
            relay = relay_of.get(id(conn))
            if relay is None or relay.finished:
                continue
            _log.info("open connection denied by a policy change; closing",
                      src=conn.src_ip, dst=f"{conn.dst_ip}:{conn.dst_port}",
                      reason=verdict.reason)
            if relay.result is not None:
                relay.result.revoke(verdict.reason)
            relay.abort()
        return len(denied)

    def _relays(self) -> list[Relay]:
        return [*self.outbound.relays, *self.inbound.relays, *self.plaintext.relays]

    @property
    def active(self) -> int:
        """Connections being set up or relayed."""
        return (
            len(self._relays()) + len(self.outbound.tasks) + len(self.inbound.tasks)
            + len(self.plaintext.tasks)
        )

    async def _stop_accepting(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()
        tasks, self._accept_tasks = self._accept_tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        socks, self._accept_socks = self._accept_socks, []
        for sock in socks:
            sock.close()

    async def drain(self, deadline_s: float) -> None:
        """Stop accepting; let connections finish for up to ``deadline_s``; then close."""
        await self._stop_accepting()
        end = time.monotonic() + deadline_s
        while self.active and time.monotonic() < end:  # noqa: ASYNC110 - polling several sets
            await asyncio.sleep(0.05)
        if self.active:
            _log.info("drain deadline reached; closing connections", remaining=self.active)
        await self.stop()

    async def stop(self) -> None:
        await self._stop_accepting()
        tasks = [*self.outbound.tasks, *self.inbound.tasks, *self.plaintext.tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for relay in self._relays():
            relay.abort()
        self.pool.close()
        await self.pool.wait_dials()
        for conn in list(self.inbound.connections):
            conn.close()
        # let the transports' close callbacks run
        for _ in range(3):
            await asyncio.sleep(0)
