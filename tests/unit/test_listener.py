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
from mmproxy.listener import BACK_OFF, Acceptor, ParkedAcceptor, Throttle, open_listeners
from mmproxy.parking import ParkingLot
from mmproxy.pool import WorkerPool


class ScriptedListener:
    """Stands in for a listening socket: accept() plays a script, then blocks until shutdown."""

    def __init__(self, script: list[OSError | tuple[socket.socket, tuple[str, int]]]) -> None:
        self._script = list(script)
        self._shut = threading.Event()
        self.closed = False

    def accept(self) -> tuple[socket.socket, tuple[str, int]]:
        if self._script:
            step = self._script.pop(0)
            if isinstance(step, OSError):
                raise step
            return step
        self._shut.wait(10)
        raise OSError(errno.EINVAL, "Invalid argument")

    def shutdown(self, how: int) -> None:
        self._shut.set()

    def close(self) -> None:
        self.closed = True

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", 1)


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


def test_accept_loop_survives_every_error(caplog: pytest.LogCaptureFixture) -> None:
    # Peer errors are skipped, resource errors logged once (throttled) and
    # retried after a pause; the loop keeps serving and ends only at stop().
    a, b = socket.socketpair()
    script: list[OSError | tuple[socket.socket, tuple[str, int]]] = [
        OSError(errno.ECONNABORTED, "aborted"),
        OSError(errno.EMFILE, "Too many open files"),
        OSError(errno.EMFILE, "Too many open files"),
        OSError(errno.ENOBUFS, "No buffer space"),
        OSError(errno.EPROTO, "Protocol error"),
        (a, ("192.0.2.1", 1234)),
    ]
    listener = ScriptedListener(script)
    accepted: list[tuple[str, int]] = []
    got_one = threading.Event()

    def on_accept(sock: socket.socket, peer: tuple[str, int], number: int) -> None:
        accepted.append(peer)
        sock.close()
        got_one.set()

    log = logging.getLogger("test-acceptor")
    acceptor = Acceptor(listener, 3, on_accept, log)  # type: ignore[arg-type]
    started = time.monotonic()
    acceptor.start("tcp")
    try:
        assert got_one.wait(5)
    finally:
        acceptor.stop()
        b.close()
    assert accepted == [("192.0.2.1", 1234)]
    assert time.monotonic() - started >= 0.25  # three resource errors, three pauses
    warnings = [r for r in caplog.records if r.name == "test-acceptor"]
    assert len(warnings) == 1  # throttled: one line for three resource errors
    assert "EMFILE" in warnings[0].__dict__["error"]
    assert listener.closed


def test_an_admission_bug_does_not_kill_the_acceptor(caplog: pytest.LogCaptureFixture) -> None:
    pairs = [socket.socketpair() for _ in range(2)]
    listener = ScriptedListener([(pairs[0][0], ("192.0.2.1", 1)), (pairs[1][0], ("192.0.2.2", 2))])
    seen: list[str] = []
    both = threading.Event()

    def on_accept(sock: socket.socket, peer: tuple[str, int], number: int) -> None:
        seen.append(peer[0])
        if len(seen) == 1:
            raise RuntimeError("bug")
        sock.close()
        both.set()

    acceptor = Acceptor(listener, 0, on_accept, logging.getLogger("test-acceptor"))  # type: ignore[arg-type]
    acceptor.start("tcp")
    try:
        assert both.wait(5)
    finally:
        acceptor.stop()
        for _a, b in pairs:
            b.close()
    assert seen == ["192.0.2.1", "192.0.2.2"]
    assert pairs[0][0].fileno() == -1  # the acceptor closed the connection it could not admit


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
    """A cap for ParkedAcceptor: ``free`` slots; ``wake`` callbacks wait for the next one."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.waiting: list[Any] = []
        self.lock = threading.Lock()

    def __call__(self, wake: Any) -> bool:
        with self.lock:
            if self.free > 0:
                return True
            self.waiting.append(wake)
            return False

    def take(self) -> None:
        with self.lock:
            self.free -= 1

    def give(self) -> None:
        with self.lock:
            self.free += 1
            waiting, self.waiting = self.waiting, []
        for wake in waiting:
            wake()


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
        room.take()

    acceptor = ParkedAcceptor(server, 0, on_accept, logging.getLogger("test"), lot, room)
    acceptor.start("tcp")
    clients = [socket.create_connection(server.getsockname()) for _ in range(3)]
    try:
        wait_until(lambda: len(accepted) == 2, "two accepted")
        assert threads == {"mmproxy-parking"}
        wait_until(lambda: room.waiting, "the acceptor to wait for room")
        assert len(lot) == 0, "out of the lot at the cap"
        assert len(accepted) == 2, "the third waits in the backlog"
        assert len(room.waiting) == 1, "one pause, asked about once (the metrics count it)"
        room.give()
        wait_until(lambda: len(accepted) == 3, "the third accepted once a slot freed")
        assert acceptor.alive()
        acceptor.stop()
        assert server.fileno() == -1, "stop() closes the listening socket"
        assert not acceptor.alive()
        assert len(lot) == 0
    finally:
        for sock in clients + accepted:
            sock.close()
        server.close()


def test_a_resource_error_pauses_the_lot_acceptor_and_it_retries(
    lot: ParkingLot, caplog: pytest.LogCaptureFixture
) -> None:
    class Flaky(socket.socket):
        """A listening socket whose first accept() fails as if out of descriptors."""

        failures: ClassVar[list[OSError]] = [OSError(errno.EMFILE, "Too many open files")]

        def accept(self) -> tuple[socket.socket, Any]:
            if self.failures:
                raise self.failures.pop()
            return super().accept()

    server = Flaky(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted: list[socket.socket] = []
    acceptor = ParkedAcceptor(
        server,
        0,
        lambda conn, peer, n: accepted.append(conn),
        logging.getLogger("t"),
        lot,
        Room(10),
    )
    with caplog.at_level(logging.WARNING):
        acceptor.start("tcp")
        client = socket.create_connection(server.getsockname())
        try:
            wait_until(lambda: len(accepted) == 1, "accepted after the pause")
        finally:
            client.close()
            for sock in accepted:
                sock.close()
            acceptor.stop()
    warnings = [r for r in caplog.records if r.getMessage() == "failed to accept new connection"]
    assert len(warnings) == 1
    assert getattr(warnings[0], "pauseSeconds", None) == BACK_OFF
