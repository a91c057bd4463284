"""Listening sockets and what accepts on them.

``-listeners N`` opens N sockets on one address with ``SO_REUSEPORT`` so the
kernel spreads new connections across N accept queues.  TCP ones are drained by the parking
lot's threads (:class:`ParkedAcceptor`), UDP ones each by a thread of its own
(:class:`ListenerThread`).  Accepting must survive everything: one peer's failure is
ignored, running out of descriptors or memory is logged (rate-limited) and
retried after a short pause, and only the daemon stopping ends it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

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


class Lot(Protocol):
    """What :class:`ParkedAcceptor` needs of each lot (``ParkingLot.lots``)."""

    def park_sockets(
        self,
        sockets: Sequence[socket.socket],
        resume: Callable[[], None],
        failed: Callable[[BaseException], None],
        *,
        timeout: float,
        abandon: Callable[[], None],
        move: Callable[[memoryview], Callable[[], None] | None] | None = None,
        events: int = ...,
    ) -> None: ...

    def withdraw(self, sock: socket.socket) -> bool: ...

    def alive(self) -> bool: ...

    @property
    def load(self) -> int: ...

    def call_soon(self, job: Callable[[], None]) -> None: ...


class Admission(Protocol):
    """What :class:`ParkedAcceptor` asks before each ``accept()`` (the connection cap)."""

    def reserve(self, wake: Callable[[], None]) -> bool | None:
        """True: a slot is held for the next connection, which ``on_accept`` takes or gives
        back.  False: at the cap, and ``wake`` is called once a slot frees.  None: stopping."""
        ...

    def release(self) -> None:
        """Give back a slot that ``accept()`` found no connection for."""
        ...

    def paused(self, paused: bool) -> None:
        """The listening socket stopped being accepted on at the cap (True), or resumed."""
        ...


# Connections accepted per readiness before the lot looks at its other sockets.
ACCEPT_BATCH = 16
# Every lot watches every listening socket; the kernel wakes one of them per new connection.
EXCLUSIVE = select.EPOLLIN | getattr(select, "EPOLLEXCLUSIVE", 0)
# A new connection is handed to the least loaded lot when the accepting one holds more than
# twice its spots plus this many (a quiet connection parks two).  Closer balance cost more
# hand-offs than it saved (bench/README.md, "Every lot accepts").
HAND_OVER_MARGIN = 2


class _Seat:
    """A :class:`ParkedAcceptor`'s place in one lot."""

    def __init__(self, lot: Lot) -> None:
        self.lot = lot
        self.parked = False  # in the lot, or being moved there
        self.paused = False  # out of the lot at the cap, until ``room`` wakes it
        self.woken = False  # room came back while it was leaving the lot


class ParkedAcceptor:
    """Accepts on one listening TCP socket from every parking lot's thread: no thread of its own.

    An acceptor thread handing each connection to a worker cost a wake-up per connection, and
    with the GIL the two spent their time handing it back and forth (bench/README.md, issue
    13).  So the lots watch the listening sockets: the thread that is woken accepts a
    connection, starts it (:meth:`~mmproxy.connection.Connection.start` never blocks) and
    moves its messages.  With one lot per CPU (free-threaded builds) each listening socket
    has a seat in every lot, registered with ``EPOLLEXCLUSIVE`` so that a new connection wakes
    one thread, not all.  The kernel wakes the first idle one, so at a low rate one lot would
    accept everything, and a connection stays in the lot that starts it: a lot holding more
    than twice the spots of the least loaded one (plus :data:`HAND_OVER_MARGIN`) hands the
    connection there (``call_soon``) before anything is made for it.  The socket is non-blocking;
    ``accept4`` still gives blocking ones.

    Before each ``accept()`` a seat reserves a slot (:class:`Admission`); at the cap it
    leaves its lot (the kernel's backlog holds new connections) and comes back once a slot
    frees.  A resource error pauses it for :data:`BACK_OFF`, as a listener thread pauses.
    The socket is closed once, by whoever sees the last seat leave after :meth:`stop`.
    """

    def __init__(
        self,
        sock: socket.socket,
        number: int,
        on_accept: OnAccept,
        log: logging.Logger,
        lots: Sequence[Lot],
        admission: Admission,
    ) -> None:
        self.sock = sock
        self.number = number
        self.log = log
        self._on_accept = on_accept
        self._admission = admission
        self._seats = [_Seat(lot) for lot in lots]
        self._throttle = Throttle(10.0)
        self._lock = threading.Lock()
        self._paused = 0  # seats out at the cap
        self._stopping = False
        self._started = False
        self._closed = False

    def start(self, protocol: str) -> None:
        self.sock.setblocking(False)
        self._started = True
        for seat in self._seats:
            self._park(seat)
        _log_listening(self.log, self.sock, self.number, protocol)

    def alive(self) -> bool:
        with self._lock:
            if not self._started or self._stopping:
                return False
        return all(seat.lot.alive() for seat in self._seats)

    def stop(self) -> None:
        """Stop accepting and close the listening socket (nothing else uses it).

        Each seat is taken back from its lot if it waits there.  A lot's thread accepting on
        it now lets go on its way out, or, if it had just decided to stay, is woken again by
        the shutdown (a listening socket shut down reads as hung up, to every lot).
        """
        with self._lock:
            self._stopping = True
            parked = [seat for seat in self._seats if seat.parked]
            closed = self._closed
        if not closed:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
        for seat in parked:
            if seat.lot.withdraw(self.sock):
                self._let_go(seat)
        self._close_if_free()

    def _let_go(self, seat: _Seat) -> None:
        """``seat`` is out of its lot for good (stopping) or for now (the lot said so)."""
        with self._lock:
            seat.parked = False
        self._close_if_free()

    def _close_if_free(self) -> None:
        """Once stopping and no seat holds the socket, close it (once)."""
        with self._lock:
            if not self._stopping or self._closed or any(s.parked for s in self._seats):
                return
            self._closed = True
        self.sock.close()

    def _park(self, seat: _Seat) -> None:
        """Wait in ``seat``'s lot for connections (again); let go instead once stopping."""
        with self._lock:
            if seat.parked:
                return
            if self._stopping:
                stopping = True
            else:
                stopping = False
                seat.parked = True
        if stopping:
            self._close_if_free()
            return
        try:
            seat.lot.park_sockets(
                (self.sock,),
                functools.partial(self._rejoin, seat),  # only if a move failed: park again
                functools.partial(self._failed, seat),
                timeout=0,
                abandon=functools.partial(self._let_go, seat),
                move=functools.partial(self._accept, seat),
                events=EXCLUSIVE,
            )
        except (OSError, RuntimeError) as error:  # the lot is closing: the daemon is stopping
            self._failed(seat, error)

    def _rejoin(self, seat: _Seat) -> None:
        """``seat`` was handed over by its lot (it has left it): park it again."""
        with self._lock:
            seat.parked = False
        self._park(seat)

    def _failed(self, seat: _Seat, _error: BaseException) -> None:
        with self._lock:
            self._stopping = True  # a lot that cannot take it back is closing
        self._let_go(seat)

    def _accept(self, seat: _Seat, _buffer: memoryview) -> Callable[[], None] | None:
        """On ``seat``'s lot's thread: accept what is waiting.  None: stay parked; else leave
        first, then run what it returns."""
        admission = self._admission
        for _ in range(ACCEPT_BATCH):
            with self._lock:
                if self._stopping:
                    return functools.partial(self._let_go, seat)
            room = admission.reserve(functools.partial(self._resumed, seat))
            if room is None:  # stopping
                return functools.partial(self._let_go, seat)
            if not room:
                return functools.partial(self._left, seat)
            try:
                conn, peer = self.sock.accept()
            except BlockingIOError:
                admission.release()
                return None
            except OSError as error:
                admission.release()
                if error.errno in STOPPED_ERRORS:
                    return functools.partial(self._let_go, seat)
                if error.errno in PEER_ERRORS:
                    continue
                _log_pause(self.log, self._throttle, self.number, error, logs.MSG_ACCEPT_FAILED)
                return functools.partial(self._back_off, seat)
            home = self._home(seat.lot)
            if home is not seat.lot:
                try:
                    home.call_soon(functools.partial(self._serve, conn, peer))
                    continue
                except RuntimeError:  # that lot is closing: serve it here
                    pass
            self._serve(conn, peer)
        return None  # more may be waiting: the level-triggered lot comes back at once

    def _home(self, here: Lot) -> Lot:
        """The lot a new connection accepted on ``here`` should live in (a loop, not
        ``min()`` with a key: this runs for every connection)."""
        here_load = here.load
        least, least_load = here, here_load
        for seat in self._seats:
            load = seat.lot.load
            if load < least_load:
                least, least_load = seat.lot, load
        return least if here_load > 2 * least_load + HAND_OVER_MARGIN else here

    def _serve(self, conn: socket.socket, peer: Any) -> None:
        try:
            self._on_accept(conn, (str(peer[0]), int(peer[1])), self.number)
        except Exception:  # on_accept gives its slot back before raising
            conn.close()
            self.log.exception("accepting a connection failed")

    def _left(self, seat: _Seat) -> None:
        """Out of the lot at the cap: the admission calls :meth:`_resumed` once a slot frees."""
        with self._lock:
            seat.parked = False
            seat.paused = True
            self._paused += 1
            first = self._paused == 1
            woken, seat.woken = seat.woken, False
        if first:
            self._admission.paused(True)
        if woken:  # a slot freed before we were out: go on now
            self._resumed(seat)

    def _resumed(self, seat: _Seat) -> None:
        with self._lock:
            if seat.parked:  # still on its way out of the lot: _left resumes it
                seat.woken = True
                return
            was_paused, seat.paused = seat.paused, False
            if was_paused:
                self._paused -= 1
            last = was_paused and self._paused == 0
        if last:
            self._admission.paused(False)
        self._park(seat)

    def _back_off(self, seat: _Seat) -> None:
        with self._lock:
            seat.parked = False
        try:
            seat.lot.park_sockets(
                (),
                functools.partial(self._rejoin, seat),
                functools.partial(self._failed, seat),
                timeout=BACK_OFF,
                abandon=functools.partial(self._let_go, seat),
            )
        except (OSError, RuntimeError) as error:
            self._failed(seat, error)
