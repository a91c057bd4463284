"""A thread pool that grows on demand and retires idle workers.

Each active TCP connection needs two threads that block in system calls for
its whole life, so the pool must never queue a job behind a busy worker: a
job either goes to a worker that is idle right now or gets a new thread.
Starting two fresh threads per connection caps the connection rate well below
what reusing them allows, so a worker that finishes waits a while
(``idle_timeout``) for the next job before it exits.

A job is handed to one idle worker directly: each idle worker waits on a
queue of its own, and the submitter puts the job there.  No queue is shared by
the waiting workers, so they never contend for one (on free-threaded CPython,
a queue that many threads wait on had the submitters and the waiters spinning
on its lock).  A worker's own queue, not a lock, because a ``threading.Lock``
that must wait spins (``sched_yield``) before it sleeps on free-threaded
CPython, which costs an idle worker CPU on every wait; a queue's ``get`` goes
to sleep at once.  The idle workers form a stack: the one that finished last
is reused first, while its memory is warm, and the ones at the bottom retire.

The stack is a plain list used only through its atomic operations (``append``,
``pop``, ``remove``), so the hand-off takes no pool lock: on free-threaded
CPython a contended ``threading.Lock`` spins with ``sched_yield``, and under
connection churn the pool lock was where most of the daemon's spinning came
from (bench/README.md).  Each idle worker is popped by exactly one submitter (or by
:meth:`WorkerPool.close`), which then puts one job (or None) in its queue.  A
worker whose wait times out removes itself from the stack: if that fails, a
submitter took it meanwhile and its job is on the way, so it waits for it.
The thread set and counter, touched only when a thread starts or ends, stay
under a lock.

``max_workers`` bounds the threads.  The daemon sizes it so that every admitted
connection (or flow) can have its threads; it is the backstop, not the
throttle: admission (``--max-connections``) pauses accepting first.  At the
bound, a submitter waits up to ``full_wait`` seconds for a worker that is
finishing its job, then gets :class:`PoolFullError`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

Job = Callable[[], None]

# Seconds an idle worker waits for a job before it exits.  Steady load reuses the few workers
# on top of the stack; a burst's extra workers (each one's memory: bench/README.md) go soon
# after the burst, since quiet connections give their threads back.
DEFAULT_IDLE_TIMEOUT = 5.0
FULL_WAIT = 1.0  # seconds a submitter waits at max_workers for a worker to come free
_FULL_POLL = 0.005  # seconds between looks at the idle stack while waiting at the bound

_log = logging.getLogger(__name__)


class PoolClosedError(RuntimeError):
    """Raised by :meth:`WorkerPool.submit` after :meth:`WorkerPool.close`."""


class PoolFullError(RuntimeError):
    """Raised by :meth:`WorkerPool.submit` when ``max_workers`` are busy and stay busy."""


# Where an idle worker waits: its own queue, which gets one job (or None: retire).
_Slot = queue.SimpleQueue[Job | None]


class WorkerPool:
    """Runs each submitted job at once on an idle worker or a new thread."""

    def __init__(
        self,
        name: str = "mmproxy-worker",
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_workers: int | None = None,
        full_wait: float = FULL_WAIT,
    ):
        self._name = name
        self._idle_timeout = idle_timeout
        self.max_workers = max_workers  # None: unbounded
        self._full_wait = full_wait
        self._lock = threading.Lock()
        self._waiting: list[_Slot] = []  # idle workers, most recently idle last
        self._threads: set[threading.Thread] = set()
        self._started = 0  # threads ever started, for names and for tests
        self._closed = False

    def submit(self, job: Job) -> None:
        """Run ``job`` now, on an idle worker or a new thread.

        A job must handle its own exceptions; one that escapes is logged and
        the worker carries on.  Raises :class:`PoolClosedError` after :meth:`close`,
        and whatever ``Thread.start`` raises when no thread can be created
        (the caller then still owns whatever the job would have cleaned up).
        """
        if self._closed:
            raise PoolClosedError("the worker pool is closed")
        deadline = None
        while True:
            try:
                slot = self._waiting.pop()  # atomic: each idle worker goes to one submitter
            except IndexError:
                pass
            else:
                slot.put(job)
                return
            if self._start(job):
                return
            # At max_workers: a worker finishing its job is about to join the idle stack.
            now = time.monotonic()
            deadline = now + self._full_wait if deadline is None else deadline
            if now >= deadline:
                raise PoolFullError(f"all {self.max_workers} worker threads are busy")
            time.sleep(_FULL_POLL)

    def _start(self, job: Job) -> bool:
        """Start a new worker for ``job``; False at ``max_workers``."""
        with self._lock:
            if self._closed:
                raise PoolClosedError("the worker pool is closed")
            if self.max_workers is not None and len(self._threads) >= self.max_workers:
                return False
            self._started += 1
            thread = threading.Thread(
                target=self._work, args=(job,), name=f"{self._name}-{self._started}", daemon=True
            )
            self._threads.add(thread)
        try:
            thread.start()
        except BaseException:
            with self._lock:
                self._threads.discard(thread)
            raise
        return True

    def _work(self, job: Job | None) -> None:
        slot: _Slot = queue.SimpleQueue()
        try:
            while job is not None:
                try:
                    job()
                except Exception:  # noqa: BLE001 - a job's own bug must not kill the worker
                    _log.exception("a worker job failed")
                job = None  # drop references to the finished job before waiting
                job = self._next_job(slot)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _next_job(self, slot: _Slot) -> Job | None:
        """Wait for a job; None means retire (idle too long, or the pool closed)."""
        self._waiting.append(slot)
        if self._closed:  # close() may have emptied the stack just before this append
            return self._leave(slot)
        try:
            return slot.get(timeout=self._idle_timeout)  # None when close() woke it
        except queue.Empty:
            return self._leave(slot)

    def _leave(self, slot: _Slot) -> Job | None:
        """Take ``slot`` off the stack to retire; if it is gone, wait for what its taker puts."""
        try:
            self._waiting.remove(slot)  # atomic, like the submitter's pop
        except ValueError:
            # A submitter (or close) took this worker meanwhile: its job (or None)
            # is in the queue, or about to be.
            return slot.get()
        return None

    @property
    def size(self) -> int:
        """Worker threads alive now (busy or idle)."""
        with self._lock:
            return len(self._threads)

    @property
    def idle(self) -> int:
        """Workers waiting for a job."""
        return len(self._waiting)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, wake idle workers so they exit, join them for up to ``timeout``.

        Busy workers finish their job first; the daemon stops their
        connections before closing the pool.
        """
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        while True:
            try:
                slot = self._waiting.pop()
            except IndexError:
                break
            slot.put(None)
        for thread in threads:
            thread.join(timeout)
