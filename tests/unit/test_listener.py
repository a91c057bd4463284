"""Listeners: SO_REUSEPORT sharing, the accept loop's errno policy, the log throttle."""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from typing import Any, ClassVar

import pytest
from test_config import config as config_with_defaults

from mmproxy.config import Config
from mmproxy.listener import BACK_OFF, HAND_OVER_MARGIN, ParkedAcceptor, Throttle, open_listeners
from mmproxy.parking import ParkingLot
from mmproxy.pool import WorkerPool


def config(**overrides: Any) -> Config:
    """go-mmproxy's defaults, listening on a kernel-chosen loopback port unless overridden."""
    return config_with_defaults(**{"listen": "127.0.0.1:0", **overrides})


def test_several_listeners_share_one_kernel_chosen_port() -> None:
    sockets = open_listeners(config(listeners=3))
    try:
        ports = {sock.getsockname()[1] for sock in sockets}
        assert len(sockets) == 3
        assert len(ports) == 1
        assert ports != {0}
        assert all(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()


def test_a_single_listener_does_not_share_its_port() -> None:
    (sock,) = open_listeners(config())
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
    finally:
        sock.close()


def test_dual_stack_listener_accepts_ipv4() -> None:
    (sock,) = open_listeners(config(listen="[::]:0"))
    try:
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        port = sock.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            conn, peer = sock.accept()
            conn.close()
        assert peer[0] == "::ffff:127.0.0.1"
    finally:
        sock.close()


def test_a_failed_bind_closes_every_socket_it_opened() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="in use") as caught:
            open_listeners(config(listen=f"127.0.0.1:{port}"))
    assert caught.value.errno == errno.EADDRINUSE


def test_throttle_lets_one_through_per_interval_and_counts_the_rest() -> None:
    now = [100.0]
    throttle = Throttle(0.25, clock=lambda: now[0])
    assert throttle.ready() == 0
    now[0] = 100.125
    assert throttle.ready() is None
    now[0] = 100.2
    assert throttle.ready() is None
    now[0] = 100.25  # the interval has passed
    assert throttle.ready() == 2
    assert throttle.ready() is None


# ------------------------------------------------------------------ accepting from the lot


class Room:
    """An :class:`~mmproxy.listener.Admission` with ``free`` slots; ``wake`` callbacks wait
    for the next one.  It records the pauses it is told of."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.waiting: list[Any] = []
        self.pauses: list[bool] = []
        self.lock = threading.Lock()

    def reserve(self, wake: Any) -> bool:
        with self.lock:
            if self.free > 0:
                self.free -= 1
                return True
            self.waiting.append(wake)
            return False

    def release(self) -> None:
        self.give()

    def paused(self, paused: bool) -> None:
        with self.lock:
            self.pauses.append(paused)

    def give(self) -> None:
        with self.lock:
            self.free += 1
            waiting, self.waiting = self.waiting, []
        for wake in waiting:
            wake()


class Scripted(socket.socket):
    """A listening socket whose accept() first plays a script of errors."""

    script: ClassVar[list[OSError]] = []

    def accept(self) -> tuple[socket.socket, Any]:
        if self.script:
            raise self.script.pop(0)
        return super().accept()


def listening(cls: type[socket.socket] = socket.socket) -> socket.socket:
    server = cls(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    return server


def wait_until(condition: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout}s for: {what}"
        threading.Event().wait(0.005)


@pytest.fixture
def lot() -> Any:
    pool = WorkerPool(idle_timeout=5)
    parking = ParkingLot(pool)
    parking.start()
    yield parking
    parking.close()
    pool.close(timeout=5)


@pytest.fixture
def lots() -> Any:
    """Two lot threads, as a free-threaded build on two CPUs has."""
    pool = WorkerPool(idle_timeout=5)
    parking = ParkingLot(pool, threads=2)
    parking.start()
    yield parking
    parking.close()
    pool.close(timeout=5)


def test_the_lot_accepts_and_pauses_at_the_cap(lot: ParkingLot) -> None:
    """Connections are accepted on the lot's thread; at the cap the acceptor leaves the lot
    (the rest wait in the backlog) and comes back when a slot frees."""
    server = socket.create_server(("127.0.0.1", 0))
    room = Room(2)
    accepted: list[socket.socket] = []
    threads: set[str] = set()

    def on_accept(conn: socket.socket, peer: tuple[str, int], number: int) -> None:
        threads.add(threading.current_thread().name)
        accepted.append(conn)

    acceptor = ParkedAcceptor(server, 0, on_accept, logging.getLogger("test"), lot.lots, room)
    acceptor.start("tcp")
    clients = [socket.create_connection(server.getsockname()) for _ in range(3)]
    try:
        wait_until(lambda: len(accepted) == 2, "two accepted")
        assert threads == {"mmproxy-parking"}
        wait_until(lambda: room.waiting, "the acceptor to wait for room")
        assert len(lot) == 0, "out of the lot at the cap"
        assert len(accepted) == 2, "the third waits in the backlog"
        assert len(room.waiting) == 1, "one pause, asked about once"
        assert room.pauses == [True]
        room.give()
        wait_until(lambda: len(accepted) == 3, "the third accepted once a slot freed")
        wait_until(lambda: len(room.pauses) == 3, "the acceptor to pause again")
        assert room.pauses == [True, False, True], "at the cap again after the third"
        assert acceptor.alive()
        acceptor.stop()
        assert server.fileno() == -1, "stop() closes the listening socket"
        assert not acceptor.alive()
        assert len(lot) == 0
    finally:
        for sock in clients + accepted:
            sock.close()
        server.close()


def test_every_lot_accepts_and_together_they_keep_the_cap(lots: ParkingLot) -> None:
    """With a lot per CPU each has a seat on the listening socket.  However the kernel
    spreads the wake-ups, the seats never admit more than the slots there are, one pause is
    reported while any seat waits for room, and stop() closes the socket once."""
    server = socket.create_server(("127.0.0.1", 0), backlog=64)
    room = Room(3)
    accepted: list[socket.socket] = []
    threads: set[str] = set()
    lock = threading.Lock()

    def on_accept(conn: socket.socket, peer: tuple[str, int], number: int) -> None:
        with lock:
            threads.add(threading.current_thread().name)
            accepted.append(conn)

    acceptor = ParkedAcceptor(server, 0, on_accept, logging.getLogger("test"), lots.lots, room)
    acceptor.start("tcp")
    assert len(lots) == 2, "a seat in each lot"
    clients = [socket.create_connection(server.getsockname()) for _ in range(12)]
    try:
        wait_until(lambda: len(accepted) == 3, "three accepted")
        wait_until(lambda: room.pauses, "a seat to wait for room")
        assert len(accepted) == 3, "the cap holds across both lots' threads"
        # A seat that reserved, then lost the race for the connection, gives its slot back,
        # which wakes a paused seat for a moment: pauses and resumes alternate.  With every
        # slot taken by an accepted connection nothing can be given back, so they have settled.
        wait_until(lambda: room.free == 0 and room.pauses[-1], "the seats paused at the cap")
        with room.lock:
            pauses = list(room.pauses)
        assert pauses == [True, False] * (len(pauses) // 2) + [True], pauses
        for given in range(4, 13):
            room.give()
            wait_until(lambda given=given: len(accepted) == given, f"connection {given}")
            assert len(accepted) == given, "one slot, one connection"
        assert threads <= {"mmproxy-parking", "mmproxy-parking-1"}
        wait_until(lambda: room.waiting, "a seat to wait for room again")
        assert room.pauses.count(True) == room.pauses.count(False) + 1, "paused now"
        acceptor.stop()
        # A seat busy accepting on its lot's thread lets go on its way out: soon, not now.
        wait_until(lambda: server.fileno() == -1, "the listening socket closed")
        wait_until(lambda: len(lots) == 0, "no seat left in either lot")
        room.give()  # as the tracker wakes paused seats when it closes
        assert room.pauses.count(True) == room.pauses.count(False), "the pause ended"
        assert len(lots) == 0
    finally:
        for sock in clients + accepted:
            sock.close()
        server.close()


def test_stop_lets_go_of_every_seat_even_while_paused(lots: ParkingLot) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    room = Room(0)
    acceptor = ParkedAcceptor(
        server, 0, lambda *_: None, logging.getLogger("test"), lots.lots, room
    )
    acceptor.start("tcp")
    client = socket.create_connection(server.getsockname())
    try:
        wait_until(lambda: room.pauses == [True], "a seat to pause at the cap")
        acceptor.stop()
        assert server.fileno() == -1
        assert len(lots) == 0
        room.give()  # the tracker wakes paused seats when it closes: they find it stopped
        assert len(lots) == 0
        assert room.pauses == [True, False]
    finally:
        client.close()
        server.close()


def test_a_resource_error_pauses_the_lot_acceptor_and_it_retries(
    lot: ParkingLot, caplog: pytest.LogCaptureFixture
) -> None:
    """Peer errors are skipped; resource errors are logged once (throttled) and retried after
    a pause; the acceptor keeps serving and gives back each slot it found nobody for."""
    server = listening(Scripted)
    Scripted.script = [
        OSError(errno.ECONNABORTED, "aborted"),
        OSError(errno.EMFILE, "Too many open files"),
        OSError(errno.EMFILE, "Too many open files"),
        OSError(errno.ENOBUFS, "No buffer space"),
        OSError(errno.EPROTO, "Protocol error"),
    ]
    accepted: list[socket.socket] = []
    room = Room(10)
    acceptor = ParkedAcceptor(
        server,
        0,
        lambda conn, peer, n: accepted.append(conn),
        logging.getLogger("t"),
        lot.lots,
        room,
    )
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        acceptor.start("tcp")
        client = socket.create_connection(server.getsockname())
        try:
            wait_until(lambda: len(accepted) == 1, "accepted after the pauses")
        finally:
            client.close()
            for sock in accepted:
                sock.close()
            acceptor.stop()
    assert time.monotonic() - started >= 3 * BACK_OFF * 0.9  # three resource errors
    warnings = [r for r in caplog.records if r.getMessage() == "failed to accept new connection"]
    assert len(warnings) == 1, "throttled: one line for three resource errors"
    assert "EMFILE" in warnings[0].__dict__["error"]
    assert getattr(warnings[0], "pauseSeconds", None) == BACK_OFF
    # The lot's thread may still be between a reservation and the accept that finds nobody.
    wait_until(lambda: room.free == 9, "every slot but the connection's given back")
    wait_until(lambda: server.fileno() == -1, "the listening socket closed")


def test_an_admission_bug_does_not_kill_the_acceptor(
    lot: ParkingLot, caplog: pytest.LogCaptureFixture
) -> None:
    server = listening()
    seen: list[int] = []

    def on_accept(sock: socket.socket, peer: tuple[str, int], number: int) -> None:
        seen.append(peer[1])
        if len(seen) == 1:
            raise RuntimeError("bug")
        sock.close()

    acceptor = ParkedAcceptor(server, 0, on_accept, logging.getLogger("t"), lot.lots, Room(10))
    acceptor.start("tcp")
    first = socket.create_connection(server.getsockname())
    second = socket.create_connection(server.getsockname())
    ports = sorted([first.getsockname()[1], second.getsockname()[1]])
    try:
        with caplog.at_level(logging.ERROR):
            wait_until(lambda: len(seen) == 2, "both accepted")
        first.settimeout(5)
        assert first.recv(1) == b"", "the acceptor closed the connection it could not admit"
        assert acceptor.alive()
    finally:
        acceptor.stop()
        first.close()
        second.close()
    assert sorted(seen) == ports
    assert any(r.getMessage() == "accepting a connection failed" for r in caplog.records)


def test_connections_arriving_one_by_one_are_spread_over_the_lots(lots: ParkingLot) -> None:
    """The kernel wakes the first idle lot for every connection, so at a low rate one lot
    would get them all; a lot that holds more than twice the least loaded one's spots hands
    the new one over before anything is made for it, and it stays where it was started."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    threads: list[str] = []
    changed = threading.Condition()

    def on_accept(conn: socket.socket, peer: tuple[str, int], number: int) -> None:
        # As a connection does: park its socket from the thread it was started on.
        lots.park_sockets((conn,), lambda: None, lambda error: None, timeout=0, abandon=conn.close)
        with changed:
            accepted.append(conn)
            threads.append(threading.current_thread().name)
            changed.notify_all()

    acceptor = ParkedAcceptor(server, 0, on_accept, logging.getLogger("t"), lots.lots, Room(99))
    acceptor.start("tcp")
    clients = []
    try:
        for count in range(1, 21):
            clients.append(socket.create_connection(server.getsockname()))
            with changed:
                assert changed.wait_for(lambda count=count: len(accepted) == count, 10)
            loads = [lot.load for lot in lots.lots]
            assert max(loads) <= 2 * min(loads) + HAND_OVER_MARGIN + 1, loads
        assert threads.count("mmproxy-parking") >= 5
        assert threads.count("mmproxy-parking-1") >= 5
    finally:
        acceptor.stop()
        for sock in clients + accepted:
            if lots.withdraw(sock):
                sock.close()
            sock.close()
        server.close()
