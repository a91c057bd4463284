"""Listening sockets and what accepts on them.

``-listeners N`` opens N sockets on one address with ``SO_REUSEPORT`` so the
kernel spreads new connections across N accept queues, each drained by its
own thread (:class:`Acceptor`), or, with the GIL, by the parking lot's one thread
(:class:`ParkedAcceptor`).  The accept loop must survive everything: one peer's failure is
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
from collections.abc import Callable, Sequence
from typing import Protocol

from mmproxy import logs, upstream
from mmproxy.config import Config
from mmproxy.header import host_port

BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
BACK_OFF = 0.1  # seconds to pause accept() after a resource error
UDP_RECEIVE_BUFFER = 8 * 1024 * 1024  # bytes queued per UDP listener (the kernel doubles it)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

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

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._next = 0.0
        self._suppressed = 0

    def ready(self) -> int | None:
        """The number suppressed since the last one let through, or None to stay quiet."""
        now = self._clock()
        with self._lock:
            if now < self._next:
                self._suppressed += 1
                return None
            self._next = now + self._interval
            suppressed, self._suppressed = self._suppressed, 0
            return suppressed


def open_listeners(config: Config, kind: int = socket.SOCK_STREAM) -> list[socket.socket]:
    """Bind (and for TCP listen on) ``config.listen``, ``config.listeners`` times.

    ``kind`` is SOCK_STREAM or SOCK_DGRAM.  With port 0 the first socket gets
    a port from the kernel and the others share it.  Raises OSError (every
    socket closed) when any bind fails.
    """
    sockets: list[socket.socket] = []
    address = config.listen.sockaddr
    try:
        for _ in range(config.listeners):
            sock = socket.socket(config.listen.family, kind)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if config.listeners > 1:
                # Only when asked: it would also let another process share the port.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if config.listen.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            if config.listen_transparent:
                upstream.set_transparent(sock, config.listen.family)
            if kind == socket.SOCK_DGRAM:
                _grow_receive_buffer(sock)
            sock.bind(address)
            if kind == socket.SOCK_STREAM:
                # Accepted sockets inherit it: no setsockopt per connection.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.listen(BACKLOG)
            address = sock.getsockname()  # the real port, for the sockets that follow
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def listener_fields(config: Config, sockets: list[socket.socket]) -> dict[str, object]:
    """What go-mmproxy puts on every per-connection record: ``protocol`` and ``listenAdr``.

    Every listener shares one address (SO_REUSEPORT); with port 0 it is the port the
    kernel chose for the first.
    """
    return {logs.PROTOCOL: config.protocol, logs.LISTEN_ADR: logs.local_address(sockets[0])}


def _grow_receive_buffer(sock: socket.socket) -> None:
    """A UDP listener queues bursts in its receive buffer: make it large.

    SO_RCVBUFFORCE (CAP_NET_ADMIN, which the daemon has) passes the
    net.core.rmem_max ceiling; without it SO_RCVBUF gets what the ceiling allows.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, UDP_RECEIVE_BUFFER)
    except OSError:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)


class ListenerThread:
    """One thread serving one listening socket until :meth:`stop` (accepting or reading).

    Subclasses write :meth:`_loop`, which ends when :attr:`stopping` is set; ``stop``
    wakes it with ``shutdown`` (never ``close``: the thread may be inside a system call
    on the descriptor) and waits for it.
    """

    SHUTDOWN = socket.SHUT_RDWR  # what stop() shuts down
    THREAD_NAME = "mmproxy-listener"

    def __init__(self, sock: socket.socket, number: int, log: logging.Logger) -> None:
        self.sock = sock
        self.number = number
        self.log = log
        self.stopping = threading.Event()
        self._throttle = Throttle(10.0)
        self._thread = threading.Thread(
            target=self._loop, name=f"{self.THREAD_NAME}-{number}", daemon=True
        )

    @property
    def address(self) -> str:
        return _address(self.sock)

    def start(self, protocol: str) -> None:
        """Start serving and log ``listening`` (the address, with the real port for port 0)."""
        self._thread.start()
        _log_listening(self.log, self.sock, self.number, protocol)

    def alive(self) -> bool:
        """Serving: the thread runs and was not told to stop."""
        return self._thread.is_alive() and not self.stopping.is_set()

    def stop(self) -> None:
        self.stopping.set()
        with contextlib.suppress(OSError):  # ENOTCONN on an unconnected UDP socket, yet it wakes
            self.sock.shutdown(self.SHUTDOWN)
        self._thread.join()

    def _loop(self) -> None:
        raise NotImplementedError

    def _pause_after(self, error: OSError, message: str) -> None:
        """Log a resource error (at most every 10 s, counting the rest), then pause."""
        _log_pause(self.log, self._throttle, self.number, error, message)
        self.stopping.wait(BACK_OFF)


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return host_port(host, port)


def _log_listening(log: logging.Logger, sock: socket.socket, number: int, protocol: str) -> None:
    """``listening``, with the address (the real port for port 0)."""
    log.info(
        "listening",
        extra={logs.LISTEN_ADR: _address(sock), logs.LISTENER_NUM: number, logs.PROTOCOL: protocol},
    )


def _log_pause(
    log: logging.Logger, throttle: Throttle, number: int, error: OSError, message: str
) -> None:
    """A resource error, at most every 10 s (counting the rest), before a pause."""
    suppressed = throttle.ready()
    if suppressed is not None:
        log.warning(
            message,
            extra={
                logs.LISTENER_NUM: number,
                logs.ERROR: f"{errno.errorcode.get(error.errno or 0, '?')}: {error.strerror}",
                "suppressed": suppressed,
                "pauseSeconds": BACK_OFF,  # then it tries again (go-mmproxy's listener ends)
            },
        )


class Acceptor(ListenerThread):
    """Accepts connections on one listening TCP socket and hands each to ``on_accept``.

    ``room`` (optional) is called before each ``accept()`` and blocks while the daemon is at
    its connection cap: the kernel's backlog holds new connections meanwhile (backpressure).
    It returns False when the daemon is stopping, which ends the loop.
    """

    THREAD_NAME = "mmproxy-accept"

    def __init__(
        self,
        sock: socket.socket,
        number: int,
        on_accept: OnAccept,
        log: logging.Logger,
        room: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__(sock, number, log)
        self._on_accept = on_accept
        self._room = room

    def stop(self) -> None:
        """Stop accepting, then close the listening socket (nothing else uses it)."""
        super().stop()
        self.sock.close()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            if self._room is not None and not self._room():
                return
            try:
                conn, peer = self.sock.accept()
            except OSError as error:
                if self.stopping.is_set() or error.errno in STOPPED_ERRORS:
                    return
                if error.errno not in PEER_ERRORS:
                    self._pause_after(error, logs.MSG_ACCEPT_FAILED)
                continue
            try:
                self._on_accept(conn, (str(peer[0]), int(peer[1])), self.number)
            except Exception:
                conn.close()
                self.log.exception("accepting a connection failed")


class Lot(Protocol):
    """What :class:`ParkedAcceptor` needs of :class:`~mmproxy.parking.ParkingLot`."""

    def park_sockets(
        self,
        sockets: Sequence[socket.socket],
        resume: Callable[[], None],
        failed: Callable[[BaseException], None],
        *,
        timeout: float,
        abandon: Callable[[], None],
        move: Callable[[memoryview], Callable[[], None] | None] | None = None,
    ) -> None: ...

    def withdraw(self, sock: socket.socket) -> bool: ...

    def alive(self) -> bool: ...


# Connections accepted per readiness before the lot looks at its other sockets.
ACCEPT_BATCH = 16


class ParkedAcceptor:
    """Accepts on one listening TCP socket from the parking lot's thread: no thread of its own.

    With the GIL only one thread runs Python at a time, and an acceptor thread beside the lot's
    spent its time handing the GIL back and forth with it (bench/README.md, issue 13).  So
    where the lot has one thread, it watches the listening sockets too: one thread accepts a
    connection, starts it (:meth:`~mmproxy.connection.Connection.start` never blocks) and
    moves its messages.  The socket is non-blocking; ``accept4`` still gives blocking ones.

    ``room(wake)`` says whether a connection may be added now; when it may not, the acceptor
    leaves the lot (the kernel's backlog holds new connections) and ``wake`` is called once a
    slot frees.  A resource error pauses it for :data:`BACK_OFF`, as :class:`Acceptor` pauses.
    """

    def __init__(
        self,
        sock: socket.socket,
        number: int,
        on_accept: OnAccept,
        log: logging.Logger,
        lot: Lot,
        room: Callable[[Callable[[], None]], bool],
    ) -> None:
        self.sock = sock
        self.number = number
        self.log = log
        self._on_accept = on_accept
        self._lot = lot
        self._room = room
        self._throttle = Throttle(10.0)
        self._lock = threading.Lock()
        self._parked = False  # in the lot, or being moved there
        self._woken = False  # room came back while it was leaving the lot
        self._stopping = False
        self._started = False

    def start(self, protocol: str) -> None:
        self.sock.setblocking(False)
        self._started = True
        self._park()
        _log_listening(self.log, self.sock, self.number, protocol)

    def alive(self) -> bool:
        with self._lock:
            return self._started and not self._stopping and self._lot.alive()

    def stop(self) -> None:
        """Stop accepting and close the listening socket (nothing else uses it).

        Taken back from the lot if it waits there; if the lot's thread is accepting on it now,
        that accept loop sees ``_stopping`` and closes it on its way out.
        """
        with self._lock:
            self._stopping = True
            parked = self._parked
        if not parked or self._lot.withdraw(self.sock):
            self._close()

    def _close(self) -> None:
        with self._lock:
            self._parked = False
        self.sock.close()

    def _park(self) -> None:
        """Wait in the lot for connections (again); closed instead once stopping."""
        with self._lock:
            if self._stopping or self._parked:
                return
            self._parked = True
        try:
            self._lot.park_sockets(
                (self.sock,),
                self._park,  # the lot hands it over only when closing: nothing to do
                self._failed,
                timeout=0,
                abandon=self._close,
                move=self._accept,
            )
        except (OSError, RuntimeError) as error:  # the lot is closing: the daemon is stopping
            self._failed(error)

    def _failed(self, _error: BaseException) -> None:
        self._close()

    def _accept(self, _buffer: memoryview) -> Callable[[], None] | None:
        """On the lot's thread: accept what is waiting.  None: stay parked; else leave first."""
        for _ in range(ACCEPT_BATCH):
            with self._lock:
                if self._stopping:
                    return self._close
            if not self._room(self._resumed):
                return self._left
            try:
                conn, peer = self.sock.accept()
            except BlockingIOError:
                return None
            except OSError as error:
                if error.errno in STOPPED_ERRORS:
                    return self._close
                if error.errno in PEER_ERRORS:
                    continue
                _log_pause(self.log, self._throttle, self.number, error, logs.MSG_ACCEPT_FAILED)
                return self._back_off
            try:
                self._on_accept(conn, (str(peer[0]), int(peer[1])), self.number)
            except Exception:
                conn.close()
                self.log.exception("accepting a connection failed")
        return None  # more may be waiting: the level-triggered lot comes back at once

    def _left(self) -> None:
        """Out of the lot at the cap: ``room`` calls :meth:`_resumed` once a slot frees."""
        with self._lock:
            self._parked = False
            woken, self._woken = self._woken, False
        if woken:  # a slot freed before we were out: go on now
            self._park()

    def _resumed(self) -> None:
        with self._lock:
            if self._parked:  # still on its way out of the lot: _left parks it again
                self._woken = True
                return
        self._park()

    def _back_off(self) -> None:
        with self._lock:
            self._parked = False
        try:
            self._lot.park_sockets(
                (), self._park, self._failed, timeout=BACK_OFF, abandon=self._close
            )
        except (OSError, RuntimeError) as error:
            self._failed(error)
