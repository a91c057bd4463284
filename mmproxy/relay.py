"""The zero-copy pump: bytes move socket -> pipe -> socket with ``os.splice``.

Each direction of a connection runs in its own thread and never copies a byte
through Python.  The rules that make a relay correct:

* Half-close is relayed: end of stream from one side becomes
  ``shutdown(SHUT_WR)`` on the other, and the other direction keeps flowing
  until it ends too.  (Closing both at the first EOF loses the reply of every
  request/response protocol that half-closes.)
* An error on either side shuts both sockets down, which wakes the sibling
  thread: a splice or recv blocked on a socket returns once it is shut down.
* Whoever finishes last closes both sockets; each direction closes its own
  pipe.  Shutdown from other threads (:meth:`Pair.abort`) and the final close
  are serialised by one lock, so a shutdown can never land on a descriptor
  number that was closed and already reused by another connection.  A
  direction's own half-close needs no lock: nothing closes the sockets while
  a direction still runs.
* A direction holds no pipe until its first byte arrives (it waits with a
  one-byte ``MSG_PEEK``), so an idle connection costs 2 descriptors, not 6.
  Pipes come out of a budget (:class:`PipeBudget`) so that they can never
  starve accept() of descriptors; a direction that gets none copies through
  a 64 KiB buffer instead: slower, never wrong.
* The idle timeout (off unless asked for) costs no polling: each socket gets
  ``SO_RCVTIMEO``, which the kernel applies to the blocking peek and to
  ``splice`` alike.  A direction whose read times out looks at when *either*
  direction last moved a byte (:class:`IdleWatch`); only when both were idle
  for the whole period does it end the pair, otherwise it sleeps again for
  the time that is left.  A read that times out has moved nothing, so no byte
  is ever lost to it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import socket
import struct
import threading
import time

PIPE_SIZE = 1 << 20  # bytes; 16x Linux's default, fewer splice calls per megabyte
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)

# Errors that mean "the peer went away": part of normal life, not worth a traceback.
PEER_GONE = frozenset(
    {errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTUNREACH}
)


# A pipe cannot be made: the process or the system is out of descriptors (or
# memory).  A direction that gets no pipe copies through a buffer instead.
NO_PIPE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})
COPY_BUFFER = 64 * 1024  # bytes per direction, only while copying


class PipeBudget:
    """How many pipes the relays may hold at once (``None``: no limit).

    The daemon budgets 2 descriptors per connection (its sockets) and keeps a
    share of the descriptor limit for pipes, so that idle connections, which
    hold no pipe, can use most of the limit, while pipes can never take the
    descriptors that accept() and the upstream sockets need.  A direction
    that finds the budget spent copies through a buffer: slower, never wrong.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._held = 0

    def take(self) -> bool:
        """Reserve one pipe; False when the budget is spent."""
        with self._lock:
            if self.limit is not None and self._held >= self.limit:
                return False
            self._held += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self._held -= 1

    @property
    def held(self) -> int:
        with self._lock:
            return self._held


UNLIMITED = PipeBudget(None)


def open_pipe() -> tuple[int, int, int]:
    """A close-on-exec pipe, enlarged to :data:`PIPE_SIZE` when the kernel allows.

    Returns ``(read_fd, write_fd, capacity)``.  Unprivileged users have a pipe
    quota (``/proc/sys/fs/pipe-user-pages-soft``); past it the kernel refuses
    the resize and the default size is kept.
    """
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            capacity = fcntl.fcntl(write_fd, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            capacity = fcntl.fcntl(write_fd, F_GETPIPE_SZ)
    except BaseException:
        os.close(read_fd)
        os.close(write_fd)
        raise
    return read_fd, write_fd, capacity


MIN_WAIT = 0.001  # seconds; SO_RCVTIMEO of zero would mean "wait forever"


class IdleTimeoutError(Exception):
    """Neither direction of a pair moved a byte for the whole idle timeout."""


def set_receive_timeout(sock: socket.socket, seconds: float) -> None:
    """Set ``SO_RCVTIMEO`` (0: none); reads then fail with EAGAIN after ``seconds`` without data.

    Unlike ``sock.settimeout`` this keeps the socket blocking, which splice needs.
    """
    if seconds > 0:
        seconds = max(seconds, MIN_WAIT)
    whole = int(seconds)
    micros = min(999_999, round((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", whole, micros))


class IdleWatch:
    """When each direction of a pair last moved a byte, and whether both have been idle too long.

    Slot 0 is client -> upstream, slot 1 upstream -> client; each slot is
    written only by its own direction's thread and read by the other (a
    slightly stale reading only delays the decision to the next wake-up).
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        now = time.monotonic()
        self._last = [now, now]

    def touch(self, side: int) -> None:
        """Direction ``side`` moved bytes just now."""
        self._last[side] = time.monotonic()

    def expired(self, side: int, src: socket.socket) -> bool:
        """Direction ``side``'s read of ``src`` timed out: True if the pair is idle.

        Otherwise the other direction was active meanwhile, and ``src``'s
        receive timeout is set to the time left until the pair would be idle.
        """
        idle_for = time.monotonic() - max(self._last)
        if idle_for >= self.timeout:
            return True
        set_receive_timeout(src, self.timeout - idle_for)
        return False


def pump(
    src: socket.socket,
    dst: socket.socket,
    counter: list[int],
    idle: IdleWatch | None = None,
    side: int = 0,
    pipes: PipeBudget = UNLIMITED,
) -> None:
    """Move bytes from ``src`` to ``dst`` until ``src`` ends; add them to ``counter[0]``.

    Returns at end of stream (including a ``src`` shut down by another
    thread); raises OSError on a socket error.  Both sockets must be blocking.
    With ``idle`` (and ``SO_RCVTIMEO`` on ``src``), raises IdleTimeoutError
    once neither direction has moved a byte for ``idle.timeout`` seconds;
    ``side`` is this direction's slot in ``idle``.  The pipe comes out of
    ``pipes``; without one the bytes are copied through a buffer.
    """
    while True:
        try:
            if not src.recv(1, socket.MSG_PEEK):
                return  # ended before any data: no pipe needed
            break
        except BlockingIOError:  # SO_RCVTIMEO expired
            if idle is None or idle.expired(side, src):
                raise IdleTimeoutError from None
    if not pipes.take():
        _copy(src, dst, counter, idle, side)
        return
    try:
        read_fd, write_fd, capacity = open_pipe()
    except OSError as error:
        pipes.give_back()
        if error.errno not in NO_PIPE:
            raise
        _copy(src, dst, counter, idle, side)  # out of descriptors: correct, if not zero-copy
        return
    try:
        src_fd, dst_fd = src.fileno(), dst.fileno()
        while True:
            try:
                pending = os.splice(src_fd, write_fd, capacity)
            except BlockingIOError:  # SO_RCVTIMEO expired; nothing was moved
                if idle is None or idle.expired(side, src):
                    raise IdleTimeoutError from None
                continue
            if pending == 0:
                return
            while pending:
                # flags 0: SPLICE_F_MORE here would hold back small writes
                # (interactive traffic) waiting for more.
                moved = os.splice(read_fd, dst_fd, pending)
                pending -= moved
                counter[0] += moved
                if idle is not None:  # a slow reader at dst is still progress
                    idle.touch(side)
    finally:
        os.close(read_fd)
        os.close(write_fd)
        pipes.give_back()


def _copy(
    src: socket.socket, dst: socket.socket, counter: list[int], idle: IdleWatch | None, side: int
) -> None:
    """:func:`pump` through a buffer in Python, for when no pipe can be had."""
    buffer = bytearray(COPY_BUFFER)
    view = memoryview(buffer)
    while True:
        try:
            received = src.recv_into(buffer)
        except BlockingIOError:  # SO_RCVTIMEO expired
            if idle is None or idle.expired(side, src):
                raise IdleTimeoutError from None
            continue
        if received == 0:
            return
        dst.sendall(view[:received])
        counter[0] += received
        if idle is not None:
            idle.touch(side)


class Pair:
    """The two sockets of one relayed connection, and who closes them.

    ``client`` is the load balancer's connection; ``upstream`` the one to the
    backend.  :meth:`run` is called once per direction, from two threads.
    With ``idle_timeout`` (seconds, 0: off) the pair ends once neither
    direction has moved a byte for that long, and :attr:`idle` says so.
    """

    def __init__(
        self,
        client: socket.socket,
        upstream: socket.socket,
        idle_timeout: float = 0.0,
        pipes: PipeBudget = UNLIMITED,
    ) -> None:
        self._pipes = pipes
        self.client = client
        self.upstream = upstream
        self.started = time.monotonic()
        # bytes client->upstream, upstream->client; each list written by one thread only
        self.to_target = [0]
        self.to_client = [0]
        self.error: OSError | None = None  # the first error either direction saw
        self.idle = False  # True when the idle timeout ended the pair
        self.aborted = False  # True once abort() shut the sockets down
        self._watch: IdleWatch | None = None
        if idle_timeout > 0:
            self._watch = IdleWatch(idle_timeout)
            for sock in (client, upstream):
                # Only fails on a socket that is already broken; the relay then sees that at once.
                with contextlib.suppress(OSError):
                    set_receive_timeout(sock, idle_timeout)
        self._lock = threading.Lock()
        self._running = 2
        self._closed = False

    def forward(self) -> bool:
        """Relay client -> upstream; True when this call finished the pair (see :meth:`_run`)."""
        return self._run(self.client, self.upstream, self.to_target, 0)

    def backward(self) -> bool:
        """Relay upstream -> client; True when this call finished the pair."""
        return self._run(self.upstream, self.client, self.to_client, 1)

    def _run(self, src: socket.socket, dst: socket.socket, counter: list[int], side: int) -> bool:
        """Pump one direction; returns True in the thread that finished last.

        That thread has closed both sockets when this returns, and the
        caller may then log the outcome.
        """
        try:
            pump(src, dst, counter, self._watch, side, self._pipes)
            self._shutdown(dst, socket.SHUT_WR)  # relay the half-close
        except IdleTimeoutError:
            self.expire()
        except OSError as error:
            with self._lock:
                if self.error is None:
                    self.error = error
            self.abort()
        with self._lock:
            self._running -= 1
            if self._running:
                return False
        self.close()
        return True

    def input_waiting(self) -> bool:
        """Whether either socket has data, an end or an error now (never blocks)."""
        poller = select.poll()
        for sock in (self.client, self.upstream):
            poller.register(sock, select.POLLIN)  # POLLHUP and POLLERR come unasked
        return bool(poller.poll(0))

    def expire(self) -> None:
        """End the pair as idle (both directions then find their sockets shut down)."""
        with self._lock:
            self.idle = True
        self.abort()

    def abort(self) -> None:
        """Shut both sockets down (both directions end soon); safe from any thread, any time."""
        with self._lock:
            if self._closed:
                return
            self.aborted = True
            for sock in (self.client, self.upstream):
                with contextlib.suppress(OSError):  # not connected any more: nothing to wake
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close both sockets (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.client.close()
            self.upstream.close()

    def _shutdown(self, sock: socket.socket, how: int) -> None:
        """Relay a half-close, from a direction's own thread.

        Without the lock: the sockets are closed only by the direction that
        finishes last, after this one has returned (or by others before either
        direction started), so they are open for as long as a direction runs.
        Only :meth:`abort`, which other threads call at any time, needs the lock
        against :meth:`close`.  (Holding a lock across this system call made the
        sibling direction spin for it, on free-threaded CPython.)
        """
        try:
            sock.shutdown(how)
        except OSError as error:
            if error.errno != errno.ENOTCONN:
                raise

    @property
    def duration(self) -> float:
        """Seconds since the pair was made."""
        return time.monotonic() - self.started
