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

The bookkeeping is one list and a few counters under one lock, so it is
correct without the GIL.  A worker whose wait times out takes that lock and
finds itself either still on the stack (nobody chose it: it retires) or gone
(a submitter chose it meanwhile and put the job in its queue under that lock:
it runs the job).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

Job = Callable[[], None]

DEFAULT_IDLE_TIMEOUT = 30.0  # seconds an idle worker waits for a job before it exits

_log = logging.getLogger(__name__)


class PoolClosedError(RuntimeError):
    """Raised by :meth:`WorkerPool.submit` after :meth:`WorkerPool.close`."""


# Where an idle worker waits: its own queue, which gets one job (or None: retire).
_Slot = queue.SimpleQueue[Job | None]


class WorkerPool:
    """Runs each submitted job at once on an idle worker or a new thread."""

    def __init__(self, name: str = "mmproxy-worker", idle_timeout: float = DEFAULT_IDLE_TIMEOUT):
        self._name = name
        self._idle_timeout = idle_timeout
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
        with self._lock:
            if self._closed:
                raise PoolClosedError("the worker pool is closed")
            if self._waiting:
                self._waiting.pop().put(job)
                return
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
        with self._lock:
            if self._closed:
                return None
            self._waiting.append(slot)
        try:
            return slot.get(timeout=self._idle_timeout)  # None when close() woke it
        except queue.Empty:
            with self._lock:
                if slot in self._waiting:  # nobody chose this worker: retire
                    self._waiting.remove(slot)
                    return None
            # A submitter chose it between the timeout and the lock, and put the
            # job in its queue under that lock: it is there now.
            return slot.get_nowait()

    @property
    def size(self) -> int:
        """Worker threads alive now (busy or idle)."""
        with self._lock:
            return len(self._threads)

    @property
    def idle(self) -> int:
        """Workers waiting for a job."""
        with self._lock:
            return len(self._waiting)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, wake idle workers so they exit, join them for up to ``timeout``.

        Busy workers finish their job first; the daemon stops their
        connections before closing the pool.
        """
        with self._lock:
            self._closed = True
            for slot in self._waiting:
                slot.put(None)
            self._waiting.clear()
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)
