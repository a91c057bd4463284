"""Sockets with nothing to say wait here, many on one thread.

A connection may stay silent for minutes between messages (keep-alive HTTP, WebSockets, a
database pool), or before its first one.  A thread per quiet connection costs memory (more on a
free-threaded build, where each thread also owns allocator pages for everything it ever
allocated; bench/README.md has the figures).  So what waits for a quiet socket is *parked*: the
socket joins one epoll set served by one thread, and holds no thread until it has something to
say (data, an end, an error, or a shutdown from another thread).  Then its job goes to the
worker pool, unless the spot can ``move`` what came on the lot's own thread: a spot with a
``move`` is given the lot's scratch buffer first and stays parked (its descriptors stay
registered, no epoll_ctl per message) when that was enough; otherwise it leaves the lot and
the job ``move`` returned runs on the lot's thread (which must never block).  A spot being
moved is ``busy``: :meth:`ParkingLot.withdraw` leaves it alone, so only one thread ever
serves a parked direction.

The TCP connection parks a relay direction whose source has been quiet for a grace (its own
source socket: a quiet direction parks while the other one streams, and a pair with both
directions quiet has both sockets here), and a header still arriving (its client socket, until
more of it comes or its header deadline passes).

A spot may have a deadline (an idle timeout, a header's own): then ``expire`` runs on the
lot's thread and the job is handed over all the same.  Deadlines wait in one heap.  A spot
handed over leaves its entry behind, dropped when it reaches the top; once such entries
outnumber the live ones the heap is rebuilt, so its size follows what is parked now, not what
passed through during a long timeout.

With several threads (one per CPU on a free-threaded build) each has its own lot.  A spot
parked from a lot's own thread stays in that lot: a connection accepted there keeps its
messages on the thread that made its objects (no cross-thread reference counting, no
cross-core wake-up between its two directions).  From any other thread a spot goes to the
lot its first descriptor picks.  :meth:`_Lot.call_soon` runs a job on a lot's thread, which
is how an accepting thread hands a new connection to a less loaded lot.

Ownership: the lot never closes a socket.  It registers it, unregisters it before handing the
job over (so an fd is never in the set once its owner may close it), and owns only its epoll
and eventfd descriptors.  Spots still parked when the lot closes are given back through their
``abandon`` callback.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import logging
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mmproxy.pool import Job, WorkerPool

# Readable, ended (either way) or failed: any of them means the relay has work to do.
EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLPRI
BATCH = 256  # events taken per epoll_wait
SCRATCH = 64 * 1024  # bytes; the lot's buffer for moves (a read that fills it is bulk)

_log = logging.getLogger(__name__)

OnFailure = Callable[[BaseException], None]
# Given the lot's scratch buffer: None to stay parked, or a job to run on the lot's thread
# once the spot has left the lot.
Move = Callable[[memoryview], Job | None]


@dataclass(eq=False)
class _Spot:
    resume: Job
    failed: OnFailure
    expire: Callable[[], None]  # runs (on the lot's thread) before resume when the time is up
    abandon: Callable[[], None]  # runs when the lot closes with the spot still parked
    deadline: float
    move: Move | None = None
    fds: tuple[int, ...] = field(default=())
    left: bool = False  # handed over (or the lot closed): no longer ours
    busy: bool = False  # its move runs on the lot's thread now: nobody else may take it


_current = threading.local()  # .lot: the lot whose thread this is, if any


def _nothing() -> None:
    """An expiry that needs no action: the resumed job sees its deadline has passed."""


def lot_threads() -> int:
    """Threads for the lot: one with the GIL (two take turns: 0.62x the connection rate of
    one), one per CPU without it, where one thread moving every message was the bottleneck
    (bench/README.md, "How many lot threads")."""
    gil_enabled: Callable[[], bool] = getattr(sys, "_is_gil_enabled", lambda: True)
    return 1 if gil_enabled() else max(1, os.cpu_count() or 1)


class ParkingLot:
    """Parked sockets spread over ``threads`` lots (:class:`_Lot`) by descriptor number."""

    def __init__(self, pool: WorkerPool, scratch: int = SCRATCH, threads: int = 1) -> None:
        self._lots = [_Lot(pool, scratch, f"-{n}" if n else "", self) for n in range(threads)]

    def start(self) -> None:
        for lot in self._lots:
            lot.start()

    def __len__(self) -> int:
        """Spots parked now."""
        return sum(len(lot) for lot in self._lots)

    def park_sockets(
        self,
        sockets: Sequence[socket.socket],
        resume: Job,
        failed: OnFailure,
        *,
        timeout: float,
        expire: Callable[[], None] = _nothing,
        abandon: Callable[[], None],
        move: Move | None = None,
        events: int = EVENTS,
    ) -> None:
        """See :meth:`_Lot.park_sockets`.  From a lot's own thread the spot stays in that
        lot; from any other, it goes to the lot of its first socket (a spot with none, only a
        deadline, to the first lot)."""
        lot = getattr(_current, "lot", None)
        if lot is None or lot.owner is not self:
            lot = self._lots[sockets[0].fileno() % len(self._lots) if sockets else 0]
        lot.park_sockets(
            sockets,
            resume,
            failed,
            timeout=timeout,
            expire=expire,
            abandon=abandon,
            move=move,
            events=events,
        )

    @property
    def threads(self) -> int:
        return len(self._lots)

    @property
    def lots(self) -> Sequence[_Lot]:
        """Each thread's lot, for a socket that every thread watches (a listening one)."""
        return tuple(self._lots)

    def alive(self) -> bool:
        """Every lot's thread runs."""
        return all(lot.alive() for lot in self._lots)

    def withdraw(self, sock: socket.socket) -> bool:
        """See :meth:`_Lot.withdraw`, for a socket parked here (in one lot at most)."""
        return any(lot.withdraw(sock) for lot in self._lots)

    def close(self) -> None:
        for lot in self._lots:
            lot.close()


class _Lot:
    """One thread waiting on its share of the parked sockets."""

    def __init__(self, pool: WorkerPool, scratch: int, suffix: str, owner: ParkingLot) -> None:
        self.owner = owner
        self._pool = pool
        self._lock = threading.Lock()
        self._calls: list[Job] = []  # call_soon's, run by the thread at its next turn
        self._by_fd: dict[int, _Spot] = {}
        self._parked = 0
        self._timed = 0  # parked spots with a deadline
        self._deadlines: list[tuple[float, int, _Spot]] = []  # heap; the int breaks ties
        self._order = itertools.count()
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._scratch = memoryview(bytearray(scratch))  # only the lot's thread uses it
        self._closing = False
        self._thread = threading.Thread(
            target=self._loop, name=f"mmproxy-parking{suffix}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def __len__(self) -> int:
        """Spots parked now."""
        with self._lock:
            return self._parked

    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def load(self) -> int:
        """Spots parked now, read without the lock: a hint for spreading work, no more."""
        return self._parked

    def call_soon(self, job: Job) -> None:
        """Run ``job`` on this lot's thread at its next turn (it must not block).

        Raises RuntimeError once the lot is closing; a job queued before that runs all the
        same, on the thread that closes the lot.
        """
        with self._lock:
            if self._closing:
                raise RuntimeError("the parking lot is closed")
            self._calls.append(job)
        os.eventfd_write(self._wake, 1)

    def park_sockets(
        self,
        sockets: Sequence[socket.socket],
        resume: Job,
        failed: OnFailure,
        *,
        timeout: float,
        expire: Callable[[], None] = _nothing,
        abandon: Callable[[], None],
        move: Move | None = None,
        events: int = EVENTS,
    ) -> None:
        """Hold ``sockets`` until one has something or ``timeout`` seconds pass (0: never).

        ``events``: what counts as something (errors and hang-ups always do).

        Then ``resume`` runs on the pool (after ``expire``, on this thread, if the time ran
        out).  ``failed`` runs instead when the pool cannot take the job; ``abandon`` when
        the lot closes first.  With ``move``, readiness runs that first (module docstring).
        Raises OSError when a socket cannot be registered, and
        RuntimeError once the lot is closing; the caller then still has the sockets.
        """
        deadline = time.monotonic() + timeout if timeout > 0 else 0.0
        spot = _Spot(resume, failed, expire, abandon, deadline, move)
        with self._lock:
            if self._closing:
                raise RuntimeError("the parking lot is closed")
            fds: list[int] = []
            try:
                for sock in sockets:
                    fd = sock.fileno()
                    self._epoll.register(fd, events)
                    fds.append(fd)
            except OSError:
                for fd in fds:
                    self._epoll.unregister(fd)
                raise
            spot.fds = tuple(fds)
            for fd in fds:
                self._by_fd[fd] = spot
            self._parked += 1
            earliest = False
            if deadline:
                self._timed += 1
                heapq.heappush(self._deadlines, (deadline, next(self._order), spot))
                earliest = self._deadlines[0][2] is spot
        if earliest:
            os.eventfd_write(self._wake, 1)  # the loop may sleep past this deadline: wake it

    def withdraw(self, sock: socket.socket) -> bool:
        """Take back the spot ``sock`` waits in, before it is handed over.

        True when it was still parked: it has left the lot and its jobs will never run (the
        caller runs the work itself).  False when it is not here, already handed over, or
        being moved on the lot's thread right now.
        """
        with self._lock:
            spot = self._by_fd.get(sock.fileno())
            if spot is None or spot.left or spot.busy:
                return False
            self._leave(spot)
            return True

    def close(self) -> None:
        """Stop the thread; what is still parked is abandoned (its sockets closed by its owner).

        The daemon calls this after its connections were drained or aborted, so normally
        nothing is left.
        """
        with self._lock:
            self._closing = True
        os.eventfd_write(self._wake, 1)
        self._thread.join()
        self._run_calls()
        with self._lock:
            left = {id(spot): spot for spot in self._by_fd.values()}
            for spot in left.values():
                self._leave(spot)
        for spot in left.values():
            spot.abandon()
        self._epoll.close()
        os.close(self._wake)

    # ------------------------------------------------------------------ the thread

    def _loop(self) -> None:
        _current.lot = self
        while True:
            with self._lock:
                if self._closing:
                    return
                timeout = self._next_timeout()
            try:
                events = self._epoll.poll(timeout, BATCH)
            except OSError:  # EBADF cannot happen while we own it; EINTR is retried by Python
                _log.exception("the parking lot's epoll failed")
                return
            ready: list[_Spot] = []
            moving: list[_Spot] = []
            with self._lock:
                # Deadlines first: a spot that expired is handed over, not moved.
                expired = self._expired(time.monotonic())
                for fd, _mask in events:
                    if fd == self._wake:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(self._wake)
                        continue
                    spot = self._by_fd.get(fd)
                    if spot is None or spot.left or spot.busy:
                        continue
                    if spot.move is not None:
                        spot.busy = True
                        moving.append(spot)
                    else:
                        self._leave(spot)
                        ready.append(spot)
            if moving:
                self._move(moving)
            if self._calls:  # read without the lock: a job queued meanwhile also wrote _wake
                self._run_calls()
            for spot in expired:
                spot.expire()
            for spot in (*ready, *expired):
                self._hand_over(spot)

    def _next_timeout(self) -> float | None:
        """Seconds until the earliest deadline (None: no deadline); under the lock."""
        heap = self._deadlines
        while heap and heap[0][2].left:
            heapq.heappop(heap)
        return max(0.0, heap[0][0] - time.monotonic()) if heap else None

    def _expired(self, now: float) -> list[_Spot]:
        """Spots past their deadline, taken out of the set; under the lock."""
        expired = []
        heap = self._deadlines
        while heap and (heap[0][2].left or heap[0][0] <= now):
            spot = heapq.heappop(heap)[2]
            if not spot.left:
                self._leave(spot)
                expired.append(spot)
        return expired

    def _leave(self, spot: _Spot) -> None:
        """Take ``spot`` out of the epoll set and the index; under the lock."""
        spot.left = True
        self._parked -= 1
        if spot.deadline:
            self._timed -= 1
            heap = self._deadlines
            if len(heap) > 2 * self._timed + 64:  # mostly entries of spots gone: rebuild
                heap[:] = [entry for entry in heap if not entry[2].left]
                heapq.heapify(heap)
        for fd in spot.fds:
            self._by_fd.pop(fd, None)
            try:  # noqa: SIM105 - not contextlib.suppress: it costs three calls per socket
                self._epoll.unregister(fd)
            except OSError:  # already gone from the set: nothing to undo
                pass

    def _move(self, spots: list[_Spot]) -> None:
        """Run the busy ``spots``' moves; each stays parked, or leaves and its follow-up runs
        here.  One lock round for the batch."""
        thens: list[Job | None] = []
        for spot in spots:
            try:
                thens.append(spot.move(self._scratch) if spot.move is not None else None)
            except Exception:  # noqa: BLE001 - a bug in a move must not stop the lot
                _log.exception("a parked spot's move failed")
                thens.append(functools.partial(self._hand_over, spot))
        follow = []
        with self._lock:
            for spot, then in zip(spots, thens, strict=True):
                spot.busy = False
                if then is not None:
                    self._leave(spot)
                    follow.append(then)
        for then in follow:
            try:
                then()
            except Exception:  # noqa: BLE001
                _log.exception("a parked spot's follow-up failed")

    def _run_calls(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for call in calls:
            try:
                call()
            except Exception:  # noqa: BLE001 - a bug in a job must not stop the lot
                _log.exception("a job run on the parking lot's thread failed")

    def _hand_over(self, spot: _Spot) -> None:
        try:
            self._pool.submit(spot.resume)
        except (RuntimeError, OSError) as error:
            spot.failed(error)
