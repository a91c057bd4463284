"""The parking lot: connections without data wait on one thread, leaving it with data."""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from mmproxy.parking import SCRATCH, ParkingLot, lot_threads
from mmproxy.pool import WorkerPool
from mmproxy.relay import Pair

Legs = tuple[socket.socket, socket.socket, socket.socket, socket.socket]


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    return a, b


def park(
    lot: ParkingLot,
    pair: Pair,
    resume: Callable[[], None],
    failed: Callable[[BaseException], None],
    idle_timeout: float = 0.0,
) -> None:
    """Park both sockets of ``pair`` as one spot, expired (shut down as idle) at the timeout."""
    lot.park_sockets(
        (pair.client, pair.upstream),
        resume,
        failed,
        timeout=idle_timeout,
        expire=pair.expire,
        abandon=pair.close,
    )


class Rig:
    """Connections, a pool and a lot; everything opened is closed at the end."""

    def __init__(self, idle_timeout: float = 0.0, threads: int = 1) -> None:
        self.pool = WorkerPool(idle_timeout=5)
        self.lot = ParkingLot(self.pool, threads=threads)
        self.idle_timeout = idle_timeout
        self.lot.start()
        self.sockets: list[socket.socket] = []
        self.resumed: list[Pair] = []
        self.failures: list[BaseException] = []
        self._changed = threading.Condition()

    def legs(self) -> Legs:
        client, daemon_client = tcp_pair()
        daemon_upstream, backend = tcp_pair()
        self.sockets += [client, daemon_client, daemon_upstream, backend]
        return client, daemon_client, daemon_upstream, backend

    def park(self, pair: Pair) -> None:
        def resume() -> None:
            with self._changed:
                self.resumed.append(pair)
                self._changed.notify_all()

        park(self.lot, pair, resume, self.failures.append, self.idle_timeout)

    def wait_resumed(self, count: int, timeout: float = 5.0) -> list[Pair]:
        with self._changed:
            self._changed.wait_for(lambda: len(self.resumed) >= count, timeout)
            return list(self.resumed)

    def round_trip(self) -> None:
        """Return once the lot has polled after everything parked so far, and handed over.

        A sentinel pair is parked and woken; the poll that reports it reports every other
        ready socket too (level-triggered), and takes those spots out of the lot in the same
        turn.  So afterwards a spot still counted in the lot was not ready: no sleep needed.
        """
        client, daemon_client, daemon_upstream, _backend = self.legs()
        sentinel = Pair(daemon_client, daemon_upstream)
        self.park(sentinel)
        client.sendall(b"!")
        with self._changed:
            assert self._changed.wait_for(lambda: sentinel in self.resumed, 5.0)
            self.resumed.remove(sentinel)

    def close(self) -> None:
        self.lot.close()
        self.pool.close(timeout=5)
        for sock in self.sockets:
            sock.close()


@pytest.fixture(params=[1, 2], ids=["one thread", "two threads"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    made = Rig(threads=request.param)
    yield made
    made.close()


@pytest.mark.parametrize("wake", ["client data", "backend data", "client end", "abort"])
def test_a_parked_pair_resumes_when_either_side_has_something(rig: Rig, wake: str) -> None:
    client, daemon_client, daemon_upstream, backend = rig.legs()
    pair = Pair(daemon_client, daemon_upstream)
    rig.park(pair)
    rig.round_trip()
    assert rig.resumed == [], "nothing happened yet: still parked"
    assert len(rig.lot) == 1
    if wake == "client data":
        client.sendall(b"x")
    elif wake == "backend data":
        backend.sendall(b"x")
    elif wake == "client end":
        client.shutdown(socket.SHUT_WR)
    else:
        pair.abort()
    assert rig.wait_resumed(1) == [pair]
    assert len(rig.lot) == 0
    assert not pair.idle
    assert daemon_client.fileno() != -1, "the lot never closes a connection's sockets"


def test_parked_pairs_hold_no_thread_and_leave_one_by_one(rig: Rig) -> None:
    parked = []
    for _ in range(100):
        client, daemon_client, daemon_upstream, _backend = rig.legs()
        pair = Pair(daemon_client, daemon_upstream)
        rig.park(pair)
        parked.append((client, pair))
    assert len(rig.lot) == 100
    assert rig.pool.size == 0  # no worker exists: waiting costs no thread
    for client, _pair in parked[::2]:
        client.sendall(b"go")
    resumed = rig.wait_resumed(50)
    assert {id(pair) for pair in resumed} == {id(pair) for _client, pair in parked[::2]}
    rig.round_trip()
    assert len(rig.resumed) == 50, "only the pairs with data left"
    assert len(rig.lot) == 50


def test_an_idle_pair_is_expired_and_handed_over() -> None:
    rig = Rig(idle_timeout=0.3)
    try:
        _client, daemon_client, daemon_upstream, _backend = rig.legs()
        pair = Pair(daemon_client, daemon_upstream)
        started = time.monotonic()
        rig.park(pair)
        # A pair parked later, with data before its deadline, is not expired.
        client2, daemon_client2, daemon_upstream2, _backend2 = rig.legs()
        busy = Pair(daemon_client2, daemon_upstream2)
        rig.park(busy)
        client2.sendall(b"x")
        resumed = rig.wait_resumed(2)
        assert resumed[0] is busy
        assert resumed[1] is pair
        assert 0.25 <= time.monotonic() - started < 3
        assert pair.idle
        assert not busy.idle
        shut_down = select.select([pair.client, pair.upstream], [], [], 0)[0]
        assert shut_down, "the expired pair was shut down, so its relay ends at once"
    finally:
        rig.close()


def test_a_pool_that_refuses_the_job_gets_the_failure_reported(rig: Rig) -> None:
    client, daemon_client, daemon_upstream, _backend = rig.legs()
    pair = Pair(daemon_client, daemon_upstream)
    rig.park(pair)
    rig.pool.close()
    client.sendall(b"x")
    deadline = time.monotonic() + 5
    while not rig.failures and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [type(error).__name__ for error in rig.failures] == ["PoolClosedError"]
    assert rig.resumed == []


def test_a_spot_withdrawn_before_it_is_handed_over_never_runs(rig: Rig) -> None:
    client, daemon_client, daemon_upstream, _backend = rig.legs()
    pair = Pair(daemon_client, daemon_upstream)
    rig.park(pair)
    assert rig.lot.withdraw(daemon_upstream)  # any socket of the spot takes it all back
    assert len(rig.lot) == 0
    assert not rig.lot.withdraw(daemon_client), "gone already"
    client.sendall(b"x")
    rig.round_trip()
    assert rig.resumed == []
    rig.park(pair)  # its sockets can wait again
    assert rig.wait_resumed(1) == [pair]
    assert not rig.lot.withdraw(daemon_client), "handed over: too late"


def test_closing_the_lot_closes_what_is_still_parked() -> None:
    rig = Rig()
    client, daemon_client, daemon_upstream, _backend = rig.legs()
    pair = Pair(daemon_client, daemon_upstream)
    rig.park(pair)
    rig.lot.close()
    assert daemon_client.fileno() == -1
    assert daemon_upstream.fileno() == -1
    client.settimeout(5)
    assert client.recv(1) == b""
    late = Pair(*tcp_pair())
    with pytest.raises(RuntimeError, match="closed"):
        park(rig.lot, late, lambda: None, lambda _error: None)
    late.close()  # refused: the caller still owns it
    rig.pool.close()
    for sock in rig.sockets:
        sock.close()


def test_one_socket_waits_until_data_or_its_own_deadline() -> None:
    """How a header still arriving waits: its client socket alone, with the header's deadline
    (beside the idle timeout's, in the same heap)."""
    rig = Rig(idle_timeout=30)
    try:
        quiet, quiet_daemon = tcp_pair()
        talks, talks_daemon = tcp_pair()
        rig.sockets += [quiet, quiet_daemon, talks, talks_daemon]
        events: list[str] = []
        done = threading.Semaphore(0)

        def park(name: str, sock: socket.socket) -> None:
            def resume() -> None:
                events.append(f"resume {name}")
                done.release()

            rig.lot.park_sockets(
                (sock,),
                resume,
                rig.failures.append,
                timeout=0.3,
                expire=lambda: events.append(f"expire {name}"),
                abandon=lambda: events.append(f"abandon {name}"),
            )

        started = time.monotonic()
        park("quiet", quiet_daemon)
        park("talks", talks_daemon)
        talks.sendall(b"PROXY")
        assert done.acquire(timeout=5)
        assert done.acquire(timeout=5)
        assert events == ["resume talks", "expire quiet", "resume quiet"]
        assert 0.25 <= time.monotonic() - started < 3
        assert len(rig.lot) == 0
        park("late", quiet_daemon)  # parked when the lot closes: given back to its owner
        rig.lot.close()
        assert events[-1] == "abandon late"
        assert quiet_daemon.fileno() != -1, "abandoning is the owner's business"
    finally:
        rig.pool.close()
        for sock in rig.sockets:
            sock.close()


def test_deadlines_expire_in_order_whatever_order_they_were_parked_in() -> None:
    """Each header brings its own time left: a later, shorter deadline expires first."""
    rig = Rig()
    try:
        expired: list[str] = []
        done = threading.Semaphore(0)
        for name, timeout in (("long", 0.6), ("short", 0.1), ("middle", 0.3)):
            ours, theirs = tcp_pair()
            rig.sockets += [ours, theirs]
            rig.lot.park_sockets(
                (theirs,),
                done.release,
                rig.failures.append,
                timeout=timeout,
                expire=lambda name=name: expired.append(name),
                abandon=lambda: None,
            )
        for _ in range(3):
            assert done.acquire(timeout=5)
        assert expired == ["short", "middle", "long"]
    finally:
        rig.close()


def test_the_deadline_heap_follows_what_is_parked_not_what_passed_through() -> None:
    """Spots that leave early (their data came) leave a heap entry behind until it is dropped;
    with a long timeout and one spot that stays, thousands of short visits must not pile up."""
    rig = Rig(idle_timeout=3600)
    try:
        stays = Pair(*tcp_pair())
        rig.sockets += [stays.client, stays.upstream]
        rig.park(stays)
        for visit in range(2000):
            client, daemon_client, daemon_upstream, _backend = rig.legs()
            rig.park(Pair(daemon_client, daemon_upstream))
            client.sendall(b"x")
            assert len(rig.wait_resumed(visit + 1)) == visit + 1
            for sock in rig.sockets[-4:]:
                sock.close()
            del rig.sockets[-4:]
        assert len(rig.lot) == 1
        assert len(rig.lot._lots[0]._deadlines) <= 2 * 1 + 64 + 1  # the bound under test
    finally:
        rig.close()


class Mover:
    """A spot's move for the tests: drains what arrived, then says what the test asked for."""

    def __init__(self, sock: socket.socket, then: Callable[[], None] | None = None) -> None:
        self.sock = sock
        self.then = then
        self.moved = bytearray()
        self.threads: set[str] = set()
        self.sizes: set[int] = set()
        self.changed = threading.Condition()
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()

    def __call__(self, buffer: bytearray) -> Callable[[], None] | None:
        self.entered.set()
        assert self.hold.wait(10)
        received = self.sock.recv_into(buffer, len(buffer), socket.MSG_DONTWAIT)
        with self.changed:
            self.moved += buffer[:received]
            self.threads.add(threading.current_thread().name)
            self.sizes.add(len(buffer))
            self.changed.notify_all()
        return self.then

    def wait_moved(self, size: int) -> bytes:
        with self.changed:
            self.changed.wait_for(lambda: len(self.moved) >= size, 10)
            return bytes(self.moved)


def test_a_spot_that_moves_inline_stays_parked_and_is_never_resumed(rig: Rig) -> None:
    a, b = socket.socketpair()
    rig.sockets += [a, b]
    mover = Mover(b)
    resumed = threading.Event()
    rig.lot.park_sockets(
        (b,), resumed.set, rig.failures.append, timeout=0, abandon=b.close, move=mover
    )
    for i in range(5):
        a.sendall(b"m%d" % i)
        assert mover.wait_moved(2 * (i + 1)).endswith(b"m%d" % i)
    assert len(rig.lot) == 1, "still parked after five moves"
    (thread,) = mover.threads
    assert thread.startswith("mmproxy-parking")
    assert mover.sizes == {SCRATCH}
    assert not resumed.is_set()
    assert rig.lot.withdraw(b)
    assert len(rig.lot) == 0
    assert not rig.failures


def test_a_move_that_returns_a_job_leaves_the_lot_and_runs_it_there(rig: Rig) -> None:
    a, b = socket.socketpair()
    rig.sockets += [a, b]
    ran = threading.Event()
    where: list[tuple[str, int]] = []

    def then() -> None:
        where.append((threading.current_thread().name, len(rig.lot)))
        ran.set()

    resumed = threading.Event()
    rig.lot.park_sockets(
        (b,), resumed.set, rig.failures.append, timeout=0, abandon=b.close, move=Mover(b, then)
    )
    a.sendall(b"end")
    assert ran.wait(10)
    ((thread, parked_then),) = where
    assert thread.startswith("mmproxy-parking")
    assert parked_then == 0, "ran on the lot's thread, after leaving it"
    assert not rig.lot.withdraw(b)
    assert not resumed.is_set()


def test_a_spot_being_moved_cannot_be_withdrawn(rig: Rig) -> None:
    a, b = socket.socketpair()
    rig.sockets += [a, b]
    mover = Mover(b)
    mover.hold.clear()
    rig.lot.park_sockets(
        (b,), lambda: None, rig.failures.append, timeout=0, abandon=b.close, move=mover
    )
    a.sendall(b"x")
    assert mover.entered.wait(10)
    assert not rig.lot.withdraw(b), "the lot's thread is moving it"
    mover.hold.set()
    assert mover.wait_moved(1) == b"x"
    deadline = time.monotonic() + 10
    while not rig.lot.withdraw(b):  # free again once the move is over
        assert time.monotonic() < deadline
        threading.Event().wait(0.005)


def test_a_move_that_fails_is_handed_over_as_usual(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = socket.socketpair()
    rig.sockets += [a, b]

    def broken(_buffer: bytearray) -> None:
        raise ValueError("a bug")

    resumed = threading.Event()
    rig.lot.park_sockets(
        (b,), resumed.set, rig.failures.append, timeout=0, abandon=b.close, move=broken
    )
    a.sendall(b"x")
    assert resumed.wait(10)
    assert len(rig.lot) == 0
    assert "move failed" in caplog.text


def test_spots_spread_over_the_lots_threads_and_each_is_served() -> None:
    rig = Rig(threads=2)
    try:
        movers = []
        for n in range(8):
            a, b = socket.socketpair()  # consecutive descriptors: alternate which one parks
            rig.sockets += [a, b]
            if n % 2:
                a, b = b, a
            mover = Mover(b)
            rig.lot.park_sockets(
                (b,), lambda: None, rig.failures.append, timeout=0, abandon=b.close, move=mover
            )
            movers.append((a, mover))
        assert len(rig.lot) == 8
        for a, mover in movers:
            a.sendall(b"hi")
            assert mover.wait_moved(2) == b"hi"
        threads = set().union(*(mover.threads for _a, mover in movers))
        assert threads == {"mmproxy-parking", "mmproxy-parking-1"}
        # A spot is busy until its move has returned (after the mover saw the bytes): withdraw
        # each once the lot has let go of it.
        deadline = time.monotonic() + 10
        left = [mover.sock for _a, mover in movers]
        while left and time.monotonic() < deadline:
            left = [sock for sock in left if not rig.lot.withdraw(sock)]
            threading.Event().wait(0.005)
        assert left == []
        assert len(rig.lot) == 0
    finally:
        rig.close()


def test_one_lot_thread_with_the_gil_one_per_cpu_without(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "_is_gil_enabled", lambda: True, raising=False)
    assert lot_threads() == 1
    monkeypatch.setattr(sys, "_is_gil_enabled", lambda: False, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert lot_threads() == 4


def test_a_spot_with_only_a_deadline_is_handed_over_at_it(rig: Rig) -> None:
    resumed = threading.Event()
    rig.lot.park_sockets((), resumed.set, rig.failures.append, timeout=0.05, abandon=lambda: None)
    assert resumed.wait(10)
    assert len(rig.lot) == 0


def test_a_spot_parked_from_a_lots_thread_stays_in_that_lot() -> None:
    """A connection started on a lot's thread keeps its spots there, whatever its descriptor
    numbers; from any other thread a spot goes where its first descriptor picks."""
    rig = Rig(threads=2)
    try:
        ends = [tcp_pair() for _ in range(7)]
        rig.sockets += [sock for end in ends for sock in end]
        socks = [daemon_side for _peer, daemon_side in ends[:6]]
        lots = rig.lot.lots
        done = threading.Event()

        def park_all_here() -> None:
            for sock in socks:
                rig.lot.park_sockets(
                    (sock,), lambda: None, rig.failures.append, timeout=0, abandon=lambda: None
                )
            done.set()

        lots[1].call_soon(park_all_here)
        assert done.wait(10)
        assert [lot.load for lot in lots] == [0, 6]
        outside = ends[6][1]
        rig.lot.park_sockets(
            (outside,), lambda: None, rig.failures.append, timeout=0, abandon=lambda: None
        )
        assert lots[outside.fileno() % 2].load == (7 if outside.fileno() % 2 else 1)
        for sock in [*socks, outside]:
            assert rig.lot.withdraw(sock)
    finally:
        rig.close()


def test_call_soon_runs_on_the_lots_thread_and_a_queued_job_survives_the_close() -> None:
    pool = WorkerPool(idle_timeout=5)
    parking = ParkingLot(pool, threads=2)
    parking.start()
    ran: list[str] = []
    first = threading.Event()
    parking.lots[1].call_soon(lambda: (ran.append(threading.current_thread().name), first.set()))
    assert first.wait(10)
    assert ran == ["mmproxy-parking-1"]
    # A job that fails is logged; the lot goes on.
    parking.lots[1].call_soon(lambda: 1 / 0)
    second = threading.Event()
    parking.lots[1].call_soon(second.set)
    assert second.wait(10)
    assert parking.alive()
    parking.close()
    with pytest.raises(RuntimeError, match="closed"):
        parking.lots[0].call_soon(lambda: None)
    pool.close(timeout=5)


def test_a_job_queued_as_the_lot_closes_is_run_by_the_closing_thread() -> None:
    pool = WorkerPool(idle_timeout=5)
    parking = ParkingLot(pool, threads=1)
    parking.start()
    (lot,) = parking.lots
    ran: list[str] = []
    gate = threading.Event()
    lot.call_soon(gate.wait)  # holds the lot's thread, so the next job is still queued
    lot.call_soon(lambda: ran.append(threading.current_thread().name))
    closer = threading.Thread(target=parking.close, name="closer")
    closer.start()
    gate.set()
    closer.join(10)
    assert not closer.is_alive()
    assert len(ran) == 1, "run once, by the lot's thread or, if it had stopped, the closer"
    pool.close(timeout=5)
