"""Socket seams: where the data path gets its listening and upstream sockets.

The eBPF capture (``ztunnel_py.redirect.sockets``) supplies IP_TRANSPARENT
listeners (``getsockname()`` of an accepted socket is then the original
destination) and marked upstream sockets (so the agent's own traffic is never
captured). The defaults here are plain sockets, for tests and ``capture=none``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable

ListenerFactory = Callable[[str, int], socket.socket]
UpstreamFactory = Callable[[int], socket.socket]  # address family -> unconnected socket
OriginalDst = Callable[[socket.socket], tuple[str, int]]


class UpstreamError(OSError):
    """Connecting to an upstream failed; the message says where and the likely cause."""


def plain_listener(host: str, port: int, backlog: int = 4096) -> socket.socket:
    """A bound, listening, non-blocking TCP socket (SO_REUSEADDR, TCP_NODELAY: accepted
    sockets inherit it, so relayed bytes never wait for Nagle)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def plain_upstream(family: int) -> socket.socket:
    """An unconnected TCP socket, non-blocking from birth (no syscall to make it so).
    TCP_NODELAY comes with the transport: uvloop and asyncio set it on every TCP
    transport, and every upstream socket becomes one before any byte is relayed."""
    return socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)


def marked_upstream(mark: int) -> UpstreamFactory:
    """Upstream sockets carrying ``SO_MARK`` (needs CAP_NET_ADMIN)."""

    def factory(family: int) -> socket.socket:
        sock = plain_upstream(family)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        except OSError:
            sock.close()
            raise
        return sock

    return factory


def sockname_original_dst(sock: socket.socket) -> tuple[str, int]:
    """With ``bpf_sk_assign`` to a transparent listener, the local address is the original one."""
    host, port = sock.getsockname()[:2]
    return str(host), int(port)


def accepted_original_dst(seam: OriginalDst, transport: asyncio.BaseTransport) -> tuple[str, int]:
    """``seam``'s original destination for an accepted connection's transport. For the
    default seam (the local address) the transport's own record is the answer: uvloop
    and asyncio read it when they accept, while the transport's socket object costs a
    getsockname() to make and its getsockname() two more."""
    if seam is sockname_original_dst:
        host, port = transport.get_extra_info("sockname")[:2]
        return str(host), int(port)
    by_addresses = getattr(seam, "from_addresses", None)
    if by_addresses is not None:  # a seam that needs only the addresses: no socket object
        host, port = by_addresses(transport.get_extra_info("sockname")[:2],
                                  lambda: transport.get_extra_info("peername")[:2])
        return str(host), int(port)
    return seam(transport.get_extra_info("socket"))


def family_of(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


async def _connect(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    family: int,
    address: tuple[str, int],
    timeout: float,  # noqa: ASYNC109
) -> None:
    """A non-blocking connect to a literal IP address, TimeoutError after ``timeout``.

    ``loop.sock_connect`` on uvloop resolves even a literal address with a
    ``getaddrinfo`` on libuv's thread pool (a thread hand-off and two wake-ups per
    upstream connection); the data path only ever connects to IP literals, so the
    connect is done here as asyncio's own loop does it: ``connect`` (EINPROGRESS),
    wait for writability, read ``SO_ERROR``. The timeout is a timer on that wait, not
    ``asyncio.timeout`` (a context manager, the current task and a timer) or
    ``wait_for`` (a task more). Anything that is not an IP literal goes to
    ``sock_connect`` under ``asyncio.timeout``."""
    try:
        socket.inet_pton(family, address[0])
    except OSError:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, address)
        return
    err = sock.connect_ex(address)
    if err == 0:
        return
    if err not in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
        raise OSError(err, os.strerror(err))
    # To a workload on this node (the inbound path's only kind of upstream) the kernel
    # has usually finished the handshake inside that very syscall (the SYN-ACK comes back
    # over the veth before connect returns): ask once more before paying for a wait
    err = sock.connect_ex(address)
    if err in (0, errno.EISCONN):
        return
    if err not in (errno.EALREADY, errno.EINPROGRESS):
        raise OSError(err, os.strerror(err))
    fd = sock.fileno()
    writable: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not writable.done():
            writable.set_result(None)

    loop.add_writer(fd, ready)
    timer = loop.call_later(timeout, _expire, writable)
    try:
        await writable
    finally:
        timer.cancel()
        loop.remove_writer(fd)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


async def connect(
    factory: UpstreamFactory,
    address: tuple[str, int],
    timeout: float,  # noqa: ASYNC109
    *,
    loop: asyncio.AbstractEventLoop | None = None,
) -> socket.socket:
    """A connected non-blocking socket from ``factory``; closed on failure. ``loop``: the
    running loop, when the caller has it at hand (saves a getpid() on Python 3.11)."""
    loop = loop or asyncio.get_running_loop()
    family = family_of(address[0])
    sock = factory(family)
    try:
        await _connect(loop, sock, family, address, timeout)
    except TimeoutError:
        sock.close()
        raise UpstreamError(
            f"connecting to {address[0]}:{address[1]} timed out after {timeout}s "
            "(is a NetworkPolicy or firewall dropping it?)"
        ) from None
    except OSError as exc:
        sock.close()
        raise UpstreamError(
            f"connecting to {address[0]}:{address[1]} failed: {exc.strerror or exc}"
        ) from None
    except BaseException:
        sock.close()
        raise
    return sock
