"""The splice pump and a connection's pair of sockets, over real loopback TCP sockets."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from loopback import tcp_pair

from mmproxy import relay
from mmproxy.relay import BACKWARD, FORWARD, Pair, Step, open_pipe, pump, set_receive_timeout


@pytest.fixture
def legs() -> Iterator[tuple[socket.socket, socket.socket, socket.socket, socket.socket]]:
    """(client end, daemon's client side, daemon's upstream side, backend end)."""
    client, daemon_client = tcp_pair()
    daemon_upstream, backend = tcp_pair()
    yield client, daemon_client, daemon_upstream, backend
    for sock in (client, daemon_client, daemon_upstream, backend):
        sock.close()


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def start_pair(
    daemon_client: socket.socket, daemon_upstream: socket.socket, idle_timeout: float = 0.0
) -> tuple[Pair, list[threading.Thread], list[bool]]:
    """A Pair with both directions running, as the daemon runs them; ``finished`` collects
    each direction's return value (True from the one that finished the pair)."""
    pair = Pair(daemon_client, daemon_upstream, idle_timeout)
    threads, finished = run_directions(pair)
    return pair, threads, finished


def owner(pair: Pair, side: int) -> bool:
    """Run one direction as its owner does without a parking lot: True when it ended the pair
    (and the owner then closed it)."""
    step = pair.run(side)
    assert step is not Step.QUIET, "no grace: a direction is never quiet"
    if step is Step.LAST:
        pair.close()
    return step is Step.LAST


def run_directions(pair: Pair) -> tuple[list[threading.Thread], list[bool]]:
    """Start both directions of ``pair``, each on its own thread."""
    finished: list[bool] = []
    threads = [
        threading.Thread(target=lambda: finished.append(owner(pair, FORWARD))),
        threading.Thread(target=lambda: finished.append(owner(pair, BACKWARD))),
    ]
    for thread in threads:
        thread.start()
    return threads, finished


def join_all(threads: list[threading.Thread], timeout: float = 10.0) -> None:
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_open_pipe_is_enlarged_or_keeps_the_default() -> None:
    read_fd, write_fd, capacity = open_pipe()
    try:
        assert capacity in (1 << 20, 1 << 16) or capacity >= 4096
    finally:
        os.close(read_fd)
        os.close(write_fd)


@pytest.fixture(params=["splice", "copy"])
def pipes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with pipes, and again as if the process had no descriptor left for one."""
    if request.param == "copy":

        def no_descriptors() -> tuple[int, int, int]:
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(relay, "open_pipe", no_descriptors)
    return str(request.param)


def test_pump_moves_every_byte_and_returns_at_eof(
    legs: tuple[socket.socket, ...], pipes: str
) -> None:
    """By splice, or by copying when no pipe can be had: the same bytes, the same count."""
    client, src, dst, backend = legs
    data = random.Random(1).randbytes(3 << 20)
    counter = [0]

    def send() -> None:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)

    def relay() -> None:
        pump(src, dst, counter)
        dst.shutdown(socket.SHUT_WR)

    threads = [threading.Thread(target=send), threading.Thread(target=relay)]
    for thread in threads:
        thread.start()
    received = read_all(backend)
    for thread in threads:
        thread.join(10)
    assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
    assert counter == [len(data)]


def test_pump_holds_no_pipe_while_idle(legs: tuple[socket.socket, ...]) -> None:
    client, src, dst, _backend = legs
    before = open_fds()
    pumper = threading.Thread(target=pump, args=(src, dst, [0]))
    pumper.start()
    try:
        threading.Event().wait(0.1)
        assert open_fds() == before  # blocked in the one-byte peek, no pipe yet
    finally:
        client.shutdown(socket.SHUT_WR)
        pumper.join(5)
    assert not pumper.is_alive()
    assert open_fds() == before


def test_pair_relays_half_close_both_ways(legs: tuple[socket.socket, ...], pipes: str) -> None:
    # 1 MiB up, SHUT_WR, then 1 MiB down: the reply must survive the first EOF.
    client, daemon_client, daemon_upstream, backend = legs
    rng = random.Random(2)
    up, down = rng.randbytes(1 << 20), rng.randbytes(1 << 20)
    pair, threads, finished = start_pair(daemon_client, daemon_upstream)
    client.sendall(up)
    client.shutdown(socket.SHUT_WR)
    assert read_all(backend) == up
    backend.sendall(down)
    backend.shutdown(socket.SHUT_WR)
    assert read_all(client) == down
    join_all(threads)
    assert sorted(finished) == [False, True]  # exactly one thread finished the pair
    assert pair.to_target == [len(up)]
    assert pair.to_client == [len(down)]
    assert pair.error is None
    assert daemon_client.fileno() == -1
    assert daemon_upstream.fileno() == -1


def test_a_reset_on_one_side_ends_both(legs: tuple[socket.socket, ...]) -> None:
    client, daemon_client, daemon_upstream, backend = legs
    _pair, threads, finished = start_pair(daemon_client, daemon_upstream)
    client.sendall(b"hello")
    assert backend.recv(5) == b"hello"
    backend.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    backend.close()  # RST
    client.settimeout(5)
    with contextlib.suppress(ConnectionResetError):  # a reset tells the client as promptly
        assert client.recv(10) == b""
    join_all(threads, 5)
    assert sorted(finished) == [False, True]
    assert daemon_client.fileno() == -1
    assert daemon_upstream.fileno() == -1


def test_abort_wakes_both_directions(legs: tuple[socket.socket, ...]) -> None:
    _client, daemon_client, daemon_upstream, _backend = legs
    pair, threads, finished = start_pair(daemon_client, daemon_upstream)
    threading.Event().wait(0.05)
    pair.abort()
    join_all(threads, 5)
    assert sorted(finished) == [False, True]
    pair.abort()  # after close: a no-op, never touches a reused descriptor number
    pair.close()


# ------------------------------------------------------------------ idle timeout


def test_receive_timeout_is_never_zero_by_rounding() -> None:
    """SO_RCVTIMEO 0 means "wait forever": a tiny positive wait must not round down to it."""
    a, b = tcp_pair()
    with a, b:
        # The kernel keeps the value in jiffies (1-10 ms): compare within 10 ms.
        for seconds, expected in ((0.0, 0.0), (1e-9, 0.001), (2.25, 2.25)):
            set_receive_timeout(a, seconds)
            raw = a.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.calcsize("ll"))
            whole, micros = struct.unpack("ll", raw)
            actual = whole + micros / 1e6
            assert (actual > 0) == (seconds > 0), seconds
            assert abs(actual - expected) <= 0.01, (seconds, actual)


def test_idle_pair_is_closed_after_the_idle_timeout(legs: tuple[socket.socket, ...]) -> None:
    client, daemon_client, daemon_upstream, backend = legs
    start = time.monotonic()
    pair, threads, finished = start_pair(daemon_client, daemon_upstream, idle_timeout=0.3)
    client.settimeout(5)
    backend.settimeout(5)
    assert client.recv(10) == b""  # FIN, not a reset: the relay shuts both legs down
    assert backend.recv(10) == b""
    elapsed = time.monotonic() - start
    join_all(threads, 5)
    assert sorted(finished) == [False, True]
    assert pair.idle is True
    assert pair.error is None
    assert 0.25 <= elapsed < 5
    assert daemon_client.fileno() == -1
    assert daemon_upstream.fileno() == -1


def test_traffic_one_way_keeps_the_pair_open_without_polling(
    legs: tuple[socket.socket, ...], monkeypatch: pytest.MonkeyPatch, pipes: str
) -> None:
    """Only both directions idle for the whole period end a pair.  The silent direction wakes
    about once per period to look, not in a loop; every byte sent arrives."""
    wakeups = [0]
    original = relay.IdleWatch.expired

    def counting(self: relay.IdleWatch, side: int, src: socket.socket | None) -> bool:
        wakeups[0] += 1
        return original(self, side, src)

    monkeypatch.setattr(relay.IdleWatch, "expired", counting)
    client, daemon_client, daemon_upstream, backend = legs
    pair, threads, finished = start_pair(daemon_client, daemon_upstream, idle_timeout=0.3)
    backend.settimeout(5)
    received = bytearray()
    sent = 0
    for _ in range(15):  # 1.5 s of one byte per 100 ms: five idle periods for the other way
        client.sendall(b"x")
        sent += 1
        received += backend.recv(10)
        time.sleep(0.1)
    assert all(thread.is_alive() for thread in threads)
    assert not pair.idle
    while len(received) < sent:
        received += backend.recv(10)
    assert bytes(received) == b"x" * sent
    join_all(threads, 5)  # now silent: closed one period later
    assert pair.idle is True
    assert pair.to_target == [sent]
    assert sorted(finished) == [False, True]
    # 1.5 s of traffic plus the final period, with 0.3 s periods: about 6-8 looks in all.
    assert 1 <= wakeups[0] <= 20, wakeups[0]


def test_idle_timeout_off_sets_no_receive_timeout(legs: tuple[socket.socket, ...]) -> None:
    _client, daemon_client, daemon_upstream, _backend = legs
    pair = Pair(daemon_client, daemon_upstream)
    for sock in (daemon_client, daemon_upstream):
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.calcsize("ll"))
        assert struct.unpack("ll", raw) == (0, 0)
    pair.close()


def test_pipe_budget_is_taken_while_data_flows_and_given_back(
    legs: tuple[socket.socket, ...],
) -> None:
    """One pipe in the budget: the first direction gets it, the second copies; both relay
    every byte, and the budget is whole again once they end."""
    client, daemon_client, daemon_upstream, backend = legs
    budget = relay.PipeBudget(1)
    pair = Pair(daemon_client, daemon_upstream, pipes=budget)
    finished: list[bool] = []
    forward = threading.Thread(target=lambda: finished.append(owner(pair, FORWARD)))
    forward.start()
    client.sendall(b"up")
    assert backend.recv(2) == b"up"
    assert budget.held == 1  # the forward direction holds the only pipe
    backward = threading.Thread(target=lambda: finished.append(owner(pair, BACKWARD)))
    backward.start()
    backend.sendall(b"down")
    assert client.recv(4) == b"down"  # copied: no pipe was left
    assert budget.held == 1
    client.shutdown(socket.SHUT_WR)
    backend.shutdown(socket.SHUT_WR)
    join_all([forward, backward])
    assert sorted(finished) == [False, True]
    assert budget.held == 0
    assert pair.to_target == [2]
    assert pair.to_client == [4]


def test_an_expired_pair_ends_as_idle(legs: tuple[socket.socket, ...]) -> None:
    client, daemon_client, daemon_upstream, _backend = legs
    pair = Pair(daemon_client, daemon_upstream, idle_timeout=30)
    pair.expire()
    threads, finished = run_directions(pair)
    join_all(threads)
    assert pair.idle
    assert sorted(finished) == [False, True]
    client.settimeout(5)
    assert client.recv(1) == b""  # the client sees the connection end
