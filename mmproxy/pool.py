"""A thread pool that grows on demand and retires idle workers.

Each active TCP connection needs two threads that block in system calls for
its whole life, so the pool must never queue a job behind a busy worker: a
job either goes to a worker that is idle right now or gets a new thread.
Starting two fresh threads per connection caps the connection rate well below
what reusing them allows, so a worker that finishes waits a while
(``idle_timeout``) for the next job before it exits.

The bookkeeping is one counter under one lock, so it is correct without the
GIL.  ``_idle`` counts workers that wait and have not been promised a job; a
submitter that finds one decrements it *and* enqueues under the same lock, so
a worker whose wait times out can tell, under that lock, whether a job was
promised to it (the queue is not empty) before it retires.
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


class WorkerPool:
    """Runs each submitted job at once on an idle worker or a new thread."""

    def __init__(self, name: str = "mmproxy-worker", idle_timeout: float = DEFAULT_IDLE_TIMEOUT):
        self._name = name
        self._idle_timeout = idle_timeout
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # waiting workers not yet promised a job
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
            if self._idle:
                self._idle -= 1
                self._jobs.put(job)
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
        try:
            while job is not None:
                try:
                    job()
                except Exception:  # noqa: BLE001 - a job's own bug must not kill the worker
                    _log.exception("a worker job failed")
                job = None  # drop references to the finished job before waiting
                job = self._next_job()
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _next_job(self) -> Job | None:
        """Wait for a job; None means retire (idle too long, or the pool closed)."""
        with self._lock:
            if self._closed:
                return None
            self._idle += 1
        try:
            return self._jobs.get(timeout=self._idle_timeout)
        except queue.Empty:
            with self._lock:
                try:
                    # A submitter may have promised us a job between the timeout
                    # and taking the lock: it is in the queue now, so run it.
                    return self._jobs.get_nowait()
                except queue.Empty:
                    self._idle -= 1
                    return None

    @property
    def size(self) -> int:
        """Worker threads alive now (busy or idle)."""
        with self._lock:
            return len(self._threads)

    @property
    def idle(self) -> int:
        """Workers waiting for a job."""
        with self._lock:
            return self._idle

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, wake idle workers so they exit, join them for up to ``timeout``.

        Busy workers finish their job first; the daemon stops their
        connections before closing the pool.
        """
        with self._lock:
            self._closed = True
            for _ in range(self._idle):
                self._jobs.put(None)
            self._idle = 0
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)
