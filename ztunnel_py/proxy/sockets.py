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
Address = tuple[str, int]
# An accepted connection's (local, peer) addresses -> where the client meant to connect.
# Addresses, not the socket: uvloop keeps both from the accept, so no seam costs a syscall.
OriginalDst = Callable[[Address, Address], Address]


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


def sockname_original_dst(local: Address, peer: Address) -> Address:
    """With ``bpf_sk_assign`` to a transparent listener, the local address is the original one."""
    return local


def transport_addresses(transport: asyncio.BaseTransport) -> tuple[Address, Address]:
    """An accepted transport's (local, peer) addresses, from its own record (uvloop and
    asyncio read them when they accept: no syscall here). OSError when the connection
    was gone before they could be read."""
    local = transport.get_extra_info("sockname")
    peer = transport.get_extra_info("peername")
    if local is None or peer is None:
        raise OSError(errno.ENOTCONN, "the connection is gone: no address to read")
    return (str(local[0]), int(local[1])), (str(peer[0]), int(peer[1]))


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
