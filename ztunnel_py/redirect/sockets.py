"""The sockets eBPF capture works with.

``transparent_listener``: the agent's :15001/:15006/:15008 listeners. The
programs hand them connections whose destination is not a local address
(``bpf_sk_assign``), so the listener is ``IP_TRANSPARENT``; the original
destination is ``getsockname()`` of the accepted socket.

``marked_socket``: the agent's upstream sockets, with ``SO_MARK`` set so that
no capture program ever steers them back to the agent.
"""

from __future__ import annotations

import socket

IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
SO_MARK = getattr(socket, "SO_MARK", 36)


class SocketError(OSError):
    """A capture socket could not be made; the message says the likely cause."""


def transparent_listener(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A bound, listening, non-blocking IPv4 TCP socket with IP_TRANSPARENT (and
    TCP_NODELAY, which accepted sockets inherit)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except PermissionError as exc:
        sock.close()
        raise SocketError(exc.errno, f"IP_TRANSPARENT on {host}:{port} needs CAP_NET_ADMIN "
                          "(run the agent as root or grant the capability)") from None
    except OSError as exc:
        sock.close()
        raise SocketError(exc.errno, f"transparent listener {host}:{port}: {exc.strerror} "
                          "(is another agent listening on this node?)") from None
    return sock


def marked_socket(family: int = socket.AF_INET, mark: int = 0x539) -> socket.socket:
    """A non-blocking TCP socket whose packets carry ``mark`` (never captured)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise SocketError(exc.errno, f"SO_MARK={mark:#x}: {exc.strerror} "
                          "(needs CAP_NET_ADMIN)") from None
    return sock
