"""``Proxy.from_config``: what app.py gets from the one configuration object."""

from __future__ import annotations

import socket

from tests.conftest import require_root
from ztunnel_py.config import HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, AgentConfig
from ztunnel_py.identity.testing import InMemoryCA
from ztunnel_py.proxy.server import Proxy
from ztunnel_py.proxy.testing import CaCertificates
from ztunnel_py.state.snapshot import StateStore


def test_from_config_binds_the_istio_ports_and_marks_upstream_sockets() -> None:
    require_root()  # SO_MARK needs CAP_NET_ADMIN
    cfg = AgentConfig(node="node-1", bind_ip="127.0.0.1", socket_mark=0x539,
                      trust_domain="example.org")
    proxy = Proxy.from_config(cfg, StateStore(), CaCertificates(InMemoryCA("example.org")))
    assert proxy._binds == {
        "outbound": (("127.0.0.1", OUTBOUND_PORT),),
        "inbound": (("127.0.0.1", HBONE_PORT),),
        "inbound_plaintext": (("127.0.0.1", INBOUND_PLAINTEXT_PORT),),
    }
    assert proxy.inbound.trust_domain == "example.org"
    for factory in (proxy.outbound.upstream, proxy.inbound.upstream, proxy.plaintext.upstream):
        sock = factory(socket.AF_INET)
        try:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0x539
        finally:
            sock.close()
    unmarked = Proxy.from_config(AgentConfig(node="n"), StateStore(),
                                 CaCertificates(InMemoryCA()))
    sock = unmarked.outbound.upstream(socket.AF_INET)
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0
    finally:
        sock.close()
