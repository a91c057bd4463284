"""The zero-copy pump: bytes move socket -> pipe -> socket with ``os.splice``.

Each direction of a connection runs in its own thread and never copies a byte
through Python.  The rules that make a relay correct:

* Half-close is relayed: end of stream from one side becomes
  ``shutdown(SHUT_WR)`` on the other, and the other direction keeps flowing
  until it ends too.  (Closing both at the first EOF loses the reply of every
  request/response protocol that half-closes.)
* An error on either side shuts both sockets down, which wakes the sibling
  thread: a splice or recv blocked on a socket returns once it is shut down.
* The direction that ends last says so (:data:`Step.LAST`); its owner then
  closes both sockets (:meth:`Pair.close`).  Each direction closes its own
  pipe.  Shutdown from other threads (:meth:`Pair.abort`) and the final close
  are serialised by one lock, so a shutdown can never land on a descriptor
  number that was closed and already reused by another connection.  A
  direction's own half-close needs no lock: nothing closes the sockets while
  a direction still runs.
* With a ``grace``, a direction whose source stays silent that long returns
  :data:`Step.QUIET` instead of blocking on: it has moved every byte it read
  and holds no pipe, so whoever runs it can wait for the source elsewhere
  (the parking lot) and run it again; the pair is not ended.
* A direction holds no pipe until its first byte arrives (it waits with a
  one-byte ``MSG_PEEK``), so an idle connection costs 2 descriptors, not 6.
  Pipes come out of a budget (:class:`PipeBudget`); a direction that gets
  none copies through a 64 KiB buffer instead: slower, never wrong.
* A parked direction may be moved by another thread meanwhile
  (:mod:`mmproxy.hop`); bytes it read but could not send wait in
  :attr:`Pair.pending`, sent first when the direction runs again.
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
import enum
import errno
import fcntl
import os
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

    def expired(self, side: int, src: socket.socket | None) -> bool:
        """Direction ``side``'s read of ``src`` timed out: True if the pair is idle.

        Otherwise the other direction was active meanwhile, and ``src``'s
        receive timeout (unless ``src`` is None) is set to the time left until
        the pair would be idle.
        """
        left = self.left()
        if left <= 0:
            return True
        if src is not None:
            set_receive_timeout(src, left)
        return False

    def left(self) -> float:
        """Seconds until the pair is idle for the whole timeout (0 or less: it is)."""
        return self.timeout - (time.monotonic() - max(self._last))


def pump(
    src: socket.socket,
    dst: socket.socket,
    counter: list[int],
    idle: IdleWatch | None = None,
    side: int = 0,
    pipes: PipeBudget = UNLIMITED,
    quiet: bool = False,
) -> bool:
    """Move bytes from ``src`` to ``dst`` until ``src`` ends; add them to ``counter[0]``.

    Returns True at end of stream (including a ``src`` shut down by another
    thread); raises OSError on a socket error.  Both sockets must be blocking.
    With ``idle`` (and ``SO_RCVTIMEO`` on ``src``), raises IdleTimeoutError
    once neither direction has moved a byte for ``idle.timeout`` seconds;
    ``side`` is this direction's slot in ``idle``.  With ``quiet``, a read
    that times out (``SO_RCVTIMEO``: the grace) returns False instead of
    waiting again: nothing is in flight then.  The pipe comes out of
    ``pipes``; without one the bytes are copied through a buffer.
    """
    while True:
        try:
            if not src.recv(1, socket.MSG_PEEK):
                return True  # ended before any data: no pipe needed
            break
        except BlockingIOError:  # SO_RCVTIMEO expired
            if _timed_out(src, idle, side, quiet):
                return False
    if not pipes.take():
        return _copy(src, dst, counter, idle, side, quiet)
    try:
        read_fd, write_fd, capacity = open_pipe()
    except OSError as error:
        pipes.give_back()
        if error.errno not in NO_PIPE:
            raise
        # out of descriptors: correct, if not zero-copy
        return _copy(src, dst, counter, idle, side, quiet)
    try:
        src_fd, dst_fd = src.fileno(), dst.fileno()
        while True:
            try:
                pending = os.splice(src_fd, write_fd, capacity)
            except BlockingIOError:  # SO_RCVTIMEO expired; nothing was moved, the pipe is empty
                if _timed_out(src, idle, side, quiet):
                    return False
                continue
            if pending == 0:
                return True
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


def _timed_out(src: socket.socket, idle: IdleWatch | None, side: int, quiet: bool) -> bool:
    """A read of ``src`` timed out with nothing moved: True to return quiet, False to read again.

    Raises IdleTimeoutError when the pair has been idle for the whole idle timeout.
    """
    if quiet:
        if idle is not None and idle.expired(side, None):
            raise IdleTimeoutError
        return True
    if idle is None or idle.expired(side, src):
        raise IdleTimeoutError
    return False


def _copy(
    src: socket.socket,
    dst: socket.socket,
    counter: list[int],
    idle: IdleWatch | None,
    side: int,
    quiet: bool,
) -> bool:
    """:func:`pump` through a buffer in Python, for when no pipe can be had."""
    buffer = bytearray(COPY_BUFFER)
    view = memoryview(buffer)
    while True:
        try:
            received = src.recv_into(buffer)
        except BlockingIOError:  # SO_RCVTIMEO expired
            if _timed_out(src, idle, side, quiet):
                return False
            continue
        if received == 0:
            return True
        dst.sendall(view[:received])
        counter[0] += received
        if idle is not None:
            idle.touch(side)


class Step(enum.Enum):
    """How one run of a direction (:meth:`Pair.run`) came back."""

    QUIET = "quiet"  # nothing arrived for the grace: run it again once its source has something
    ENDED = "ended"  # this direction is over; the other one still runs (or waits)
    LAST = "last"  # this direction ended the pair: the caller closes it and reports


FORWARD = 0  # client -> upstream, slot 0 of the IdleWatch
BACKWARD = 1  # upstream -> client


class Pair:
    """The two sockets of one relayed connection, and how its directions end.

    ``client`` is the load balancer's connection; ``upstream`` the one to the
    backend.  :meth:`run` is called for each direction (:data:`FORWARD`,
    :data:`BACKWARD`), never twice at once for the same one; with a ``grace``
    a run may come back :data:`Step.QUIET` and is then called again later.
    With ``idle_timeout`` (seconds, 0: off) the pair ends once neither
    direction has moved a byte for that long, and :attr:`idle` says so.
    """

    def __init__(
        self,
        client: socket.socket,
        upstream: socket.socket,
        idle_timeout: float = 0.0,
        pipes: PipeBudget = UNLIMITED,
        grace: float = 0.0,
    ) -> None:
        self._pipes = pipes
        self.client = client
        self.upstream = upstream
        self.started = time.monotonic()
        # bytes client->upstream, upstream->client; each list written by one direction only
        self.to_target = [0]
        self.to_client = [0]
        self.pending = [b"", b""]  # per direction: read, not yet sent (see mmproxy.hop)
        self.error: OSError | None = None  # the first error either direction saw
        self.idle = False  # True when the idle timeout ended the pair
        self.aborted = False  # True once abort() shut the sockets down
        self._watch: IdleWatch | None = None
        self._quiet = grace > 0
        # The wait before a read gives up: the grace, or the idle timeout if that is shorter.
        # Set on a source when a thread first reads it (most pairs never need one: the lot
        # moves their messages), each flag by that direction's thread only.
        self._wait = (
            min(grace, idle_timeout) if grace > 0 and idle_timeout > 0 else grace or idle_timeout
        )
        self._timed = [self._wait <= 0, self._wait <= 0]
        if idle_timeout > 0:
            self._watch = IdleWatch(idle_timeout)
        self._lock = threading.Lock()
        self._running = 2
        self._closed = False

    def source(self, side: int) -> socket.socket:
        """The socket direction ``side`` reads from."""
        return self.client if side == FORWARD else self.upstream

    def run(self, side: int) -> Step:
        """Pump direction ``side`` until it ends, or until it is quiet for the grace."""
        if side == FORWARD:
            src, dst, counter = self.client, self.upstream, self.to_target
        else:
            src, dst, counter = self.upstream, self.client, self.to_client
        if not self._timed[side]:
            self._timed[side] = True
            # Only fails on a socket that is already broken; the relay then sees that at once.
            with contextlib.suppress(OSError):
                set_receive_timeout(src, self._wait)
        try:
            if pending := self.pending[side]:
                self.pending[side] = b""
                dst.sendall(pending)
                counter[0] += len(pending)
            if not pump(src, dst, counter, self._watch, side, self._pipes, self._quiet):
                return Step.QUIET
            self._shutdown(dst, socket.SHUT_WR)  # relay the half-close
        except IdleTimeoutError:
            self.expire()
        except OSError as error:
            self._failed(error)
        return self._ended()

    def end(self, error: OSError | None = None) -> Step:
        """End a direction that does not run again: its source ended (its half-close was
        relayed), or its wait failed with ``error``, which ends the pair."""
        if error is not None:
            self._failed(error)
        return self._ended()

    def touch(self, side: int) -> None:
        """Direction ``side`` moved bytes off its thread (the idle timeout counts them)."""
        if self._watch is not None:
            self._watch.touch(side)

    def _failed(self, error: OSError) -> None:
        with self._lock:
            if self.error is None:
                self.error = error
        self.abort()

    def _ended(self) -> Step:
        with self._lock:
            self._running -= 1
            return Step.ENDED if self._running else Step.LAST

    def time_to_idle(self) -> float:
        """Seconds until the pair would be idle (0: no idle timeout; never below 1 ms otherwise)."""
        if self._watch is None:
            return 0.0
        return max(self._watch.left(), MIN_WAIT)

    def expire_if_idle(self) -> None:
        """End the pair as idle if neither direction moved a byte for the whole idle timeout."""
        if self._watch is not None and self._watch.left() <= 0:
            self.expire()

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

        Without the lock: the sockets are closed only after both directions
        ended, so they are open while a direction runs; only :meth:`abort`,
        called at any time, needs the lock against :meth:`close`.  (Holding a
        lock across this call made the sibling spin on free-threaded CPython.)
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
