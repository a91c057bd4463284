"""Listening sockets and their acceptor threads.

``-listeners N`` opens N sockets on one address with ``SO_REUSEPORT`` so the
kernel spreads new connections across N accept queues, each drained by its
own thread.  The accept loop must survive everything: one peer's failure is
ignored, running out of descriptors or memory is logged (rate-limited) and
retried after a short pause, and only the daemon stopping ends it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import threading
import time
from collections.abc import Callable

from mmproxy import logs, upstream
from mmproxy.config import Config

BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
BACK_OFF = 0.1  # seconds to pause accept() after a resource error

# The errno taxonomy of accept(2).  One peer's trouble: try the next one at once.
PEER_ERRORS = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.EPERM,  # a firewall rule refused this one
        errno.EINTR,
        errno.EAGAIN,
        errno.ENETDOWN,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
    }
)
# Out of a resource: pausing lets connections finish and give it back.
RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# The socket was shut down or closed: the daemon is stopping.
STOPPED_ERRORS = frozenset({errno.EINVAL, errno.EBADF})

OnAccept = Callable[[socket.socket, tuple[str, int], int], None]


class Throttle:
    """Lets a repeated message through at most once per ``interval`` seconds, counting the rest."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self._next = 0.0
        self._suppressed = 0

    def ready(self) -> int | None:
        """The number suppressed since the last one let through, or None to stay quiet."""
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._suppressed += 1
                return None
            self._next = now + self._interval
            suppressed, self._suppressed = self._suppressed, 0
            return suppressed


def open_listeners(config: Config) -> list[socket.socket]:
    """Bind and listen on ``config.listen``, ``config.listeners`` times.

    With port 0 the first socket gets a port from the kernel and the others
    share it.  Raises OSError (every socket closed) when any bind fails.
    """
    sockets: list[socket.socket] = []
    address = config.listen.sockaddr
    try:
        for _ in range(config.listeners):
            sock = socket.socket(config.listen.family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if config.listeners > 1:
                # Only when asked: it would also let another process share the port.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if config.listen.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            if config.listen_transparent:
                upstream.set_transparent(sock)
            sock.bind(address)
            sock.listen(BACKLOG)
            address = sock.getsockname()  # the real port, for the sockets that follow
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Acceptor:
    """One thread accepting on one listening socket until :meth:`stop`."""

    def __init__(
        self, sock: socket.socket, number: int, on_accept: OnAccept, log: logging.Logger
    ) -> None:
        self.sock = sock
        self.number = number
        self._on_accept = on_accept
        self._log = log
        self._stopping = threading.Event()
        self._throttle = Throttle(10.0)
        self._thread = threading.Thread(
            target=self._loop, name=f"mmproxy-accept-{number}", daemon=True
        )

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return logs.go_address(host, port)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting: wake the thread (shutdown, not close), join it, close the socket."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join()
        self.sock.close()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, peer = self.sock.accept()
            except OSError as error:
                if self._stopping.is_set() or error.errno in STOPPED_ERRORS:
                    return
                if error.errno in PEER_ERRORS:
                    continue
                self._resource_error(error)
                continue
            try:
                self._on_accept(conn, (str(peer[0]), int(peer[1])), self.number)
            except Exception:  # noqa: BLE001 - admission must never kill the acceptor
                conn.close()
                self._log.exception("accepting a connection failed")

    def _resource_error(self, error: OSError) -> None:
        suppressed = self._throttle.ready()
        if suppressed is not None:
            self._log.warning(
                "accept failed; pausing before the next try",
                extra={
                    logs.LISTENER_NUM: self.number,
                    logs.ERROR: f"{errno.errorcode.get(error.errno or 0, '?')}: {error.strerror}",
                    "suppressed": suppressed,
                },
            )
        self._stopping.wait(BACK_OFF)
