"""eBPF traffic capture: programs from bpf/, compiled in a child, pinned per node.

Wiring in the agent (running in the node's network namespace)::

    from ztunnel_py.redirect import AGENT_MARK, Capture, uninstall
    from ztunnel_py.redirect.sockets import marked_socket, transparent_listener

    capture = Capture(cfg.node, listen_ip=cfg.bind_ip)   # pins: /sys/fs/bpf/ztunnel-py/<node>/
    capture.install()                      # compiles in a child only if the pins are missing/stale
    capture.reconcile(store.current)       # and on every StateStore.swap (sync netlink, ~ms/pod)
    outbound = transparent_listener(cfg.bind_ip, 15001)    # also 15006 and 15008
    upstream = marked_socket(socket.AF_INET, AGENT_MARK)   # every socket the agent dials
    capture.counters()                     # {"reasons": {...}, "pods": {ip: {...}}} for metrics
    capture.close()                        # on exit: stays attached, fails closed while down

``ztunnel-py agent --uninstall`` is ``uninstall(node)``.
"""

from ztunnel_py.redirect.capture import (
    AGENT_MARK,
    DEFAULT_PIN_ROOT,
    Capture,
    CaptureError,
    Ports,
    ReconcileResult,
    uninstall,
)

__all__ = [
    "AGENT_MARK",
    "DEFAULT_PIN_ROOT",
    "Capture",
    "CaptureError",
    "Ports",
    "ReconcileResult",
    "uninstall",
]
