"""Small moves of a parked direction (mmproxy.hop), over real loopback TCP sockets."""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from loopback import WAIT, recv_exactly, tcp_pair

from mmproxy.hop import Hop, move
from mmproxy.relay import BACKWARD, FORWARD, Pair, Step

Legs = tuple[socket.socket, socket.socket, socket.socket, socket.socket]


@pytest.fixture
def legs() -> Iterator[Legs]:
    """(client end, daemon's client side, daemon's upstream side, backend end)."""
    client, daemon_client = tcp_pair()
    daemon_upstream, backend = tcp_pair()
    for sock in (client, backend):
        sock.settimeout(WAIT)
    yield client, daemon_client, daemon_upstream, backend
    for sock in (client, daemon_client, daemon_upstream, backend):
        sock.close()


def readable(sock: socket.socket) -> None:
    """Wait until ``sock`` has data, an end or an error, as the lot's epoll would say
    (a poll, which leaves a pending error for the move to find)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    assert poller.poll(WAIT * 1000), "nothing arrived"


def test_a_small_message_moves_whole_and_is_counted(legs: Legs) -> None:
    client, daemon_client, daemon_upstream, backend = legs
    pair = Pair(daemon_client, daemon_upstream)
    buffer = bytearray(1024)
    client.sendall(b"ping")
    readable(daemon_client)
    assert move(pair, FORWARD, buffer) is Hop.MOVED
    assert recv_exactly(backend, 4) == b"ping"
    backend.sendall(b"pong!")
    readable(daemon_upstream)
    assert move(pair, BACKWARD, buffer) is Hop.MOVED
    assert recv_exactly(client, 5) == b"pong!"
    assert pair.to_target == [4]
    assert pair.to_client == [5]
    assert pair.pending == [b"", b""]


def test_nothing_to_read_moves_nothing(legs: Legs) -> None:
    _client, daemon_client, daemon_upstream, _backend = legs
    pair = Pair(daemon_client, daemon_upstream)
    assert move(pair, FORWARD, bytearray(16)) is Hop.MOVED
    assert pair.to_target == [0]


def test_a_read_that_fills_the_buffer_is_bulk_for_a_thread(legs: Legs) -> None:
    client, daemon_client, daemon_upstream, backend = legs
    pair = Pair(daemon_client, daemon_upstream)
    client.sendall(b"0123456789abcdef")
    readable(daemon_client)
    assert move(pair, FORWARD, bytearray(8)) is Hop.BUSY
    assert pair.to_target == [8]
    assert pair.pending[FORWARD] == b""
    # The direction's thread relays the rest, in order.
    client.shutdown(socket.SHUT_WR)
    assert pair.run(FORWARD) is Step.ENDED
    assert recv_exactly(backend, 16) == b"0123456789abcdef"
    assert backend.recv(1) == b""
    assert pair.to_target == [16]


def fill(sock: socket.socket) -> int:
    """Queue bytes on ``sock`` until its send buffer is full; how many."""
    sent = 0
    chunk = b"f" * 65536
    while True:
        try:
            sent += sock.send(chunk, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return sent


def test_a_partial_send_leaves_the_rest_pending_for_the_thread(legs: Legs) -> None:
    client, daemon_client, daemon_upstream, backend = legs
    daemon_upstream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    backend.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    pair = Pair(daemon_client, daemon_upstream)
    filler = fill(daemon_upstream)  # the backend reads nothing yet: its window is full
    message = bytes(range(256)) * 40
    client.sendall(message)
    readable(daemon_client)
    assert move(pair, FORWARD, bytearray(65536)) is Hop.BUSY
    sent = pair.to_target[0]
    assert 0 <= sent < len(message)
    assert pair.pending[FORWARD] == message[sent:]
    got = bytearray()

    def drain() -> None:
        while chunk := backend.recv(65536):
            got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    client.shutdown(socket.SHUT_WR)
    assert pair.run(FORWARD) is Step.ENDED  # sends what is pending first, then the end
    reader.join(WAIT)
    assert not reader.is_alive()
    assert bytes(got) == b"f" * filler + message
    assert pair.to_target == [len(message)]
    assert pair.pending[FORWARD] == b""


def test_an_end_is_relayed_as_a_half_close_both_ways(legs: Legs) -> None:
    client, daemon_client, daemon_upstream, backend = legs
    pair = Pair(daemon_client, daemon_upstream)
    client.shutdown(socket.SHUT_WR)
    readable(daemon_client)
    assert move(pair, FORWARD, bytearray(64)) is Hop.ENDED
    assert backend.recv(1) == b""
    assert pair.end() is Step.ENDED
    # The other way still flows, then ends too: the pair is over.
    backend.sendall(b"late answer")
    readable(daemon_upstream)
    assert move(pair, BACKWARD, bytearray(64)) is Hop.MOVED
    backend.shutdown(socket.SHUT_WR)
    readable(daemon_upstream)
    assert move(pair, BACKWARD, bytearray(64)) is Hop.ENDED
    assert pair.end() is Step.LAST
    assert recv_exactly(client, 11) == b"late answer"
    assert client.recv(1) == b""
    assert pair.error is None
    assert (pair.to_target, pair.to_client) == ([0], [11])


def test_a_reset_source_raises(legs: Legs) -> None:
    client, daemon_client, daemon_upstream, _backend = legs
    pair = Pair(daemon_client, daemon_upstream)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # an abortive close: the daemon's side gets a reset
    readable(daemon_client)
    with pytest.raises(ConnectionResetError) as raised:
        move(pair, FORWARD, bytearray(64))
    assert pair.end(raised.value) is Step.ENDED
    assert pair.error is raised.value


def test_a_move_counts_as_activity_for_the_idle_timeout(legs: Legs) -> None:
    client, daemon_client, daemon_upstream, backend = legs
    pair = Pair(daemon_client, daemon_upstream, idle_timeout=0.5)
    deadline = time.monotonic() + WAIT
    while pair.time_to_idle() > 0.3:  # let some of the timeout pass
        assert time.monotonic() < deadline
        threading.Event().wait(0.01)
    client.sendall(b"x")
    readable(daemon_client)
    assert move(pair, FORWARD, bytearray(64)) is Hop.MOVED
    assert pair.time_to_idle() > 0.4
    assert recv_exactly(backend, 1) == b"x"
