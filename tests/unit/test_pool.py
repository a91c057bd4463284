"""The worker pool: never queues behind a busy worker, reuses idle ones, retires them."""

from __future__ import annotations

import functools
import threading
import time

import pytest

from mmproxy.pool import PoolClosedError, PoolFullError, WorkerPool


def wait_until(predicate: object, timeout: float = 5.0) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return bool(predicate())


def test_blocking_jobs_each_get_a_thread() -> None:
    # Relay jobs block for a connection's whole life: a queued job would stall.
    pool = WorkerPool(idle_timeout=5.0)
    release = threading.Event()
    started = threading.Semaphore(0)

    def job() -> None:
        started.release()
        release.wait(5.0)

    try:
        for _ in range(20):
            pool.submit(job)
        for _ in range(20):
            assert started.acquire(timeout=5.0), "a job waited behind a busy worker"
        assert pool.size == 20
    finally:
        release.set()
        pool.close(timeout=5.0)


def test_idle_workers_are_reused() -> None:
    pool = WorkerPool(idle_timeout=5.0)
    names: list[str] = []
    done = threading.Semaphore(0)

    def job() -> None:
        names.append(threading.current_thread().name)
        done.release()

    try:
        for _ in range(50):
            pool.submit(job)
            assert done.acquire(timeout=5.0)
            assert wait_until(lambda: pool.idle == 1)
        assert len(set(names)) == 1
        assert pool.size == 1
    finally:
        pool.close(timeout=5.0)


def test_idle_workers_retire() -> None:
    pool = WorkerPool(idle_timeout=0.05)
    for _ in range(5):
        pool.submit(lambda: time.sleep(0.01))
    assert wait_until(lambda: pool.size == 0)
    assert pool.idle == 0
    pool.close(timeout=1.0)


def test_no_job_is_lost_when_workers_time_out_during_hand_off() -> None:
    # Workers retire after 1 ms idle while jobs keep arriving: a job promised
    # to a worker whose wait is timing out must still run.
    pool = WorkerPool(idle_timeout=0.001)
    ran = threading.Semaphore(0)
    try:
        for _ in range(2000):
            pool.submit(ran.release)
        for index in range(2000):
            assert ran.acquire(timeout=5.0), f"job {index} never ran"
    finally:
        pool.close(timeout=5.0)
    assert pool.idle == 0


def test_a_failing_job_is_logged_and_the_worker_survives(caplog: pytest.LogCaptureFixture) -> None:
    pool = WorkerPool(idle_timeout=5.0)
    done = threading.Event()

    def bad() -> None:
        raise ValueError("boom")

    try:
        pool.submit(bad)
        assert wait_until(lambda: pool.idle == 1)
        pool.submit(done.set)
        assert done.wait(5.0)
        assert pool.size == 1
    finally:
        pool.close(timeout=5.0)
    assert any("a worker job failed" in r.getMessage() for r in caplog.records)


def test_close_refuses_new_jobs_and_joins_idle_workers() -> None:
    pool = WorkerPool(idle_timeout=60.0)
    release = threading.Event()

    def job() -> None:
        release.wait(5.0)

    for _ in range(3):
        pool.submit(job)
    release.set()
    assert wait_until(lambda: pool.idle == 3)
    pool.close(timeout=5.0)
    assert pool.size == 0
    with pytest.raises(PoolClosedError):
        pool.submit(lambda: None)


def test_close_while_workers_are_going_idle_leaves_none_waiting() -> None:
    """A worker that joins the idle stack just after close() emptied it must still retire."""
    for _ in range(20):
        pool = WorkerPool(idle_timeout=60.0)
        for _ in range(8):
            pool.submit(lambda: time.sleep(0.001))
        time.sleep(0.001)  # close while some jobs end and their workers go idle
        pool.close(timeout=5.0)
        assert pool.size == 0
        assert pool.idle == 0


def test_the_worker_idle_last_is_reused_first() -> None:
    """Idle workers form a stack: the warm one is reused, the ones at the bottom retire."""
    pool = WorkerPool(idle_timeout=5.0)
    # Which worker holds which gate: the three jobs may start in any order.
    names: dict[int, str] = {}
    gates = [threading.Event() for _ in range(3)]

    def hold(index: int) -> None:
        names[index] = threading.current_thread().name
        gates[index].wait(5.0)

    try:
        for index in range(len(gates)):
            pool.submit(functools.partial(hold, index))
        assert wait_until(lambda: len(names) == 3)
        for count, gate in enumerate(gates, start=1):
            gate.set()
            assert wait_until(lambda count=count: pool.idle == count)
        ran_on: list[str] = []
        done = threading.Event()

        def record() -> None:
            ran_on.append(threading.current_thread().name)
            done.set()

        pool.submit(record)
        assert done.wait(5.0)
        assert ran_on == [names[2]]
        # record() signals before its worker is back on the stack.
        assert wait_until(lambda: pool.idle == 3)
    finally:
        pool.close(timeout=5.0)


def test_max_workers_bounds_the_threads_and_a_freed_worker_is_reused() -> None:
    """At max_workers a submit waits for a worker to come free; if none does, PoolFullError."""
    pool = WorkerPool(max_workers=2, full_wait=0.05)
    release = threading.Event()
    started = threading.Semaphore(0)

    def hold() -> None:
        started.release()
        release.wait(10)

    try:
        pool.submit(hold)
        pool.submit(hold)
        assert started.acquire(timeout=10)
        assert started.acquire(timeout=10)
        with pytest.raises(PoolFullError):
            pool.submit(hold)
        assert pool.size == 2
        release.set()
        done = threading.Event()
        deadline = time.monotonic() + 10  # the released workers come back to the idle stack
        while pool.idle == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        pool.submit(done.set)
        assert done.wait(10)
        assert pool.size <= 2
    finally:
        release.set()
        pool.close(timeout=5)
