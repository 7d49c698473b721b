"""Inbound plaintext (:15006): traffic to an enrolled pod that did not come through HBONE.

Allowed with no peer identity (the authorizer sees ``src_identity=None``),
unless the destination requires mutual TLS: ``strict(workload, port,
snapshot)`` (PeerAuthentication STRICT, enforced by the policy issue) makes
the agent reset the connection. Only enrolled workloads of this node are ever
connected to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ztunnel_py import log
from ztunnel_py.config import HboneConfig
from ztunnel_py.hbone.core import format_authority
from ztunnel_py.policy.types import Connection
from ztunnel_py.proxy.guard import RelaySet
from ztunnel_py.proxy.inbound import guess_service, local_workload
from ztunnel_py.proxy.outbound import Authorizer, allow_all, peer_of
from ztunnel_py.proxy.relay import Relay, TcpLeg, dialled_leg
from ztunnel_py.proxy.sockets import (
    OriginalDst,
    UpstreamError,
    UpstreamFactory,
    connect,
    plain_upstream,
    sockname_original_dst,
    transport_addresses,
)
from ztunnel_py.state.model import Workload
from ztunnel_py.state.snapshot import Snapshot, StateStore
from ztunnel_py.telemetry.connection import ConnectionResult, Peer

_log = log.get("inbound_plaintext")

Strict = Callable[[Workload, int, Snapshot], bool]


def never_strict(workload: Workload, port: int, snapshot: Snapshot) -> bool:
    return False


class InboundPlaintext:
    def __init__(
        self,
        config: HboneConfig,
        store: StateStore,
        node: str,
        *,
        authorizer: Authorizer = allow_all,
        strict: Strict = never_strict,
        original_dst: OriginalDst = sockname_original_dst,
        upstream: UpstreamFactory = plain_upstream,
    ) -> None:
        self.config = config
        self.store = store
        self.node = node
        self.authorizer = authorizer
        self.strict = strict
        self.original_dst = original_dst
        self.upstream = upstream
        self.tasks: set[asyncio.Task[None]] = set()
        self.relays = RelaySet()

    def protocol(self) -> TcpLeg:
        # not started paused: the client's first bytes wait in the leg (up to EARLY_LIMIT)
        return TcpLeg(on_made=self._accepted)

    def _accepted(self, leg: TcpLeg) -> None:
        assert leg.transport is not None
        try:
            local, peer = transport_addresses(leg.transport)
            dst = self.original_dst(local, peer)
        except OSError:
            leg.reset()
            return
        task = asyncio.get_running_loop().create_task(self._serve(leg, peer, dst))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, leg: TcpLeg, src: tuple[str, int], dst: tuple[str, int]) -> None:
        snapshot = self.store.current
        result = ConnectionResult("inbound", security="none")
        src_w = snapshot.by_ip.get(src[0])
        result.src = peer_of(src_w, format_authority(*src))
        result.src.principal = ""  # nothing proves who a plaintext peer is
        w = local_workload(snapshot, dst[0], self.node)
        if w is None:
            result.dst = Peer(address=format_authority(*dst))
            leg.reset()
            result.close(f"{dst[0]} is not a mesh workload on node {self.node!r}", "NR")
            return
        result.dst = peer_of(w, format_authority(*dst), guess_service(snapshot, w, dst[1]))
        if self.strict(w, dst[1], snapshot):
            _log.info("plaintext connection to a STRICT mTLS workload reset",
                      src=format_authority(*src), dst=format_authority(*dst))
            leg.reset()
            result.close("mTLS required (PeerAuthentication STRICT)", "DENY")
            return
        authorized = Connection(src[0], dst[0], dst[1], w, None, src[1])
        verdict = self.authorizer(authorized, snapshot)
        if not verdict.allowed:
            leg.reset()
            result.close(f"denied: {verdict.reason}", "DENY")
            return
        try:
            sock = await connect(self.upstream, dst, self.config.connect_timeout_s)
            upstream = await dialled_leg(sock)
        except (UpstreamError, OSError) as exc:
            leg.reset()
            result.close(str(exc), "UF")
            return
        if leg.done:
            upstream.reset()
            result.close("downstream closed during setup", "DC")
            return
        relay = Relay(leg, upstream, result, on_finished=self.relays.discard,
                      linger_s=self.config.linger_s)
        if not relay.finished:
            self.relays.add(relay, authorized)
