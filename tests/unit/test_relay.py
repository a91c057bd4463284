"""The splice pump and a connection's pair of sockets, over real loopback TCP sockets."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import threading
from collections.abc import Iterator

import pytest

from mmproxy.relay import Pair, open_pipe, pump


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected loopback TCP sockets (splice needs real sockets, as the daemon has)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    return a, b


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
    daemon_client: socket.socket, daemon_upstream: socket.socket
) -> tuple[Pair, list[threading.Thread], list[bool]]:
    """A Pair with both directions running, as the daemon runs them; ``finished`` collects
    each direction's return value (True from the one that finished the pair)."""
    pair = Pair(daemon_client, daemon_upstream)
    finished: list[bool] = []
    threads = [
        threading.Thread(target=lambda: finished.append(pair.forward())),
        threading.Thread(target=lambda: finished.append(pair.backward())),
    ]
    for thread in threads:
        thread.start()
    return pair, threads, finished


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


def test_pump_moves_every_byte_and_returns_at_eof(legs: tuple[socket.socket, ...]) -> None:
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


def test_pair_relays_half_close_both_ways(legs: tuple[socket.socket, ...]) -> None:
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
