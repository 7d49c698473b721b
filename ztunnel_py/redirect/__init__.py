"""eBPF traffic capture: programs from bpf/, compiled in a child, pinned per node.

The agent uses :class:`Capture` (install / reconcile / counters / uninstall)
and :mod:`ztunnel_py.redirect.sockets` for its listeners and upstream sockets.
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
