"""The upstream socket: a connection to the backend that carries the client's address.

The socket is bound, with ``IP_TRANSPARENT``, to the client's address and port
from the PROXY header before it connects, so the backend's ``accept()`` sees
the client.  The backend's replies go to that foreign address; the policy
routes in the README deliver them back to this host, where the transparent
socket picks them up.
"""

from __future__ import annotations

import errno
import ipaddress
import math
import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from mmproxy.config import Endpoint, sockaddr
from mmproxy.header import IPAddress, host_port

# Linux option numbers; Python 3.11 lacks some names (IPV6_TRANSPARENT came later).
SOL_IP = getattr(socket, "SOL_IP", 0)
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = getattr(socket, "IPV6_TRANSPARENT", 75)
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
SO_MARK = getattr(socket, "SO_MARK", 36)
TCP_SYNCNT = getattr(socket, "TCP_SYNCNT", 7)
# Two SYN retries: a dead backend fails in ~7 s (1 + 2 + 4) instead of ~2 minutes.
SYN_RETRIES = 2
# An upstream TCP socket is made non-blocking (no ioctl) for its connect; finish() makes it
# blocking for splice.
_NONBLOCKING_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
# poll() events after which a connect may have failed (SO_ERROR says how); POLLOUT alone is
# an established connection.
_CONNECT_ENDED = select.POLLERR | select.POLLHUP


@dataclass(frozen=True, slots=True)
class Upstream:
    """A connected upstream socket and how it was bound (for the log line)."""

    sock: socket.socket
    bound: tuple[str, int] | None  # the address the backend sees; None: ask the socket
    fallback: bool  # True when the client's port was taken and an ephemeral one was used

    @property
    def source(self) -> tuple[str, int]:
        """The address the backend sees (a TCP connection asks its socket only when told to:
        nothing on a connection's way needs it)."""
        if self.bound is not None:
            return self.bound
        local = self.sock.getsockname()
        return (str(local[0]), int(local[1]))


def set_transparent(sock: socket.socket, family: int) -> None:
    """Let ``sock`` (of address ``family``) bind to or accept for an address this host does not own.

    Needs CAP_NET_ADMIN; raises PermissionError otherwise.  The caller says the family:
    ``sock.family`` builds an enum member from a shared table, which locks on free-threaded
    CPython, and this runs for every upstream connection.
    """
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)


def plain_address(host: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``) as the IPv4 address it holds.

    The backend then sees the client as IPv4 and the ``-4`` target is used,
    which is what a client that really came over IPv4 looks like.
    """
    if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
        return host.ipv4_mapped
    return host


def connect_spoofed(
    client: tuple[IPAddress, int],
    target: Endpoint,
    *,
    mark: int,
    timeout: float,
) -> Connecting:
    """Start connecting to ``target`` from the client's ``(address, port)``.

    Port 0 binds the address only (``IP_BIND_ADDRESS_NO_PORT`` leaves the port
    to connect time).  When the client's port is in use here (the client and
    mmproxy share a host, or the same client reconnects before TIME_WAIT is
    over) the connection is made from an ephemeral port of the same address
    instead, and ``Upstream.fallback`` says so.  Raises OSError (with the
    failing step in the message) when no connection can be started; the socket
    is closed then.  The connect completes in :meth:`Connecting.finish`.
    """
    host, port = client
    try:
        return _connect(host, port, target, mark, timeout, fallback=False)
    except OSError as error:
        if port == 0 or error.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
            raise
    return _connect(host, 0, target, mark, timeout, fallback=True)


def connect_plain(target: Endpoint, *, mark: int, timeout: float) -> Connecting:
    """Start connecting to ``target`` from this host's own address (LOCAL and UNKNOWN headers)."""
    sock = socket.socket(target.family, _NONBLOCKING_STREAM)
    try:
        _common_options(sock, mark)
        return _start(sock, target, timeout, fallback=False)
    except BaseException:
        sock.close()
        raise


class Connecting:
    """A TCP connect under way, started without blocking.

    To a backend on this host the handshake is over by the time ``connect()`` returns
    (:meth:`done` says so without waiting); :meth:`finish` waits for the rest, up to the
    connect timeout, and gives the blocking socket splice needs.  Until then the socket is
    this object's: :meth:`finish` closes it when the connect failed.
    """

    __slots__ = ("deadline", "events", "fallback", "sock", "target")

    def __init__(
        self, sock: socket.socket, target: Endpoint, fallback: bool, deadline: float
    ) -> None:
        self.sock = sock
        self.target = target
        self.fallback = fallback
        self.deadline = deadline
        self.events = 0  # what poll() last said of the socket (0: not ready yet)

    def done(self) -> bool:
        """The connect has completed (or failed): :meth:`finish` will not wait."""
        poller = select.poll()
        poller.register(self.sock, select.POLLOUT)
        ready = poller.poll(0)
        if ready:
            self.events = ready[0][1]
        return bool(ready)

    def finish(self) -> Upstream:
        """Wait for the connect until the deadline; raises OSError (TimeoutError) if it failed.

        After :meth:`done` said yes it does not poll again, and asks ``SO_ERROR`` only when
        poll() saw an error or a hang-up (a failed connect always shows one).
        """
        sock = self.sock
        try:
            if not self.events:
                poller = select.poll()
                poller.register(sock, select.POLLOUT)
                while not (
                    ready := poller.poll(
                        max(0, math.ceil((self.deadline - time.monotonic()) * 1000))
                    )
                ):
                    if time.monotonic() >= self.deadline:
                        raise TimeoutError(
                            errno.ETIMEDOUT, f"connect {_show(self.target)}: timed out"
                        )
                self.events = ready[0][1]
            if self.events & _CONNECT_ENDED:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise _failed("connect", self.target, OSError(code, os.strerror(code)))
            sock.setblocking(True)
        except BaseException:
            sock.close()
            raise
        return Upstream(sock, None, fallback=self.fallback)


def open_datagram(client: tuple[IPAddress, int] | None, target: Endpoint, *, mark: int) -> Upstream:
    """A UDP socket connected to ``target``, bound to the client's ``(address, port)``.

    ``client`` None (LOCAL and addressless headers) leaves the source to the
    kernel.  A client port already bound here falls back to an ephemeral port
    of the same address, as :func:`connect_spoofed` does.  UDP's connect only
    sets the default destination, so nothing here waits on the network.
    """
    if client is None:
        return _datagram(None, 0, target, mark, fallback=False)
    host, port = client
    try:
        return _datagram(host, port, target, mark, fallback=False)
    except OSError as error:
        if port == 0 or error.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
            raise
    return _datagram(host, 0, target, mark, fallback=True)


def _datagram(
    host: IPAddress | None, port: int, target: Endpoint, mark: int, *, fallback: bool
) -> Upstream:
    sock = socket.socket(target.family, socket.SOCK_DGRAM)
    try:
        if mark:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        if host is not None:
            set_transparent(sock, target.family)
            bind_to = sockaddr(host, port)
            _step("bind", bind_to, sock.bind, bind_to)
        _step("connect", target, sock.connect, target.sockaddr)
        local = sock.getsockname()
        return Upstream(sock, (str(local[0]), int(local[1])), fallback=fallback)
    except BaseException:
        sock.close()
        raise


def _connect(
    host: IPAddress,
    port: int,
    target: Endpoint,
    mark: int,
    timeout: float,
    *,
    fallback: bool,
) -> Connecting:
    sock = socket.socket(target.family, _NONBLOCKING_STREAM)
    try:
        _common_options(sock, mark)
        set_transparent(sock, target.family)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if port == 0:
            sock.setsockopt(SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        bind_to = sockaddr(host, port)
        _step("bind", bind_to, sock.bind, bind_to)
        return _start(sock, target, timeout, fallback=fallback)
    except BaseException:
        sock.close()
        raise


def _start(sock: socket.socket, target: Endpoint, timeout: float, *, fallback: bool) -> Connecting:
    """Send the SYN without waiting for the answer; errors known at once raise OSError."""
    deadline = time.monotonic() + timeout
    code = sock.connect_ex(target.sockaddr)
    if code not in (0, errno.EINPROGRESS):
        raise _failed("connect", target, OSError(code, os.strerror(code)))
    return Connecting(sock, target, fallback, deadline)


def _common_options(sock: socket.socket, mark: int) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_SYNCNT, SYN_RETRIES)
    if mark:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)


def _step(what: str, where: object, call: Callable[..., object], *args: object) -> None:
    """Run one socket call; an OSError keeps its errno and says which step failed, and where."""
    try:
        call(*args)
    except OSError as error:
        raise _failed(what, where, error) from None


def _failed(what: str, where: object, error: OSError) -> OSError:
    """``error`` (its errno and type kept) saying which step failed, and where."""
    reason = error.strerror or str(error)
    return type(error)(error.errno, f"{what} {_show(where)}: {reason}")


def _show(where: object) -> str:
    if isinstance(where, tuple):
        return host_port(where[0], where[1])
    return str(where)
