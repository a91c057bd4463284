"""KernelPair on loopback TCP (root: bpf(2)): the hand-over's pitfalls, one test each."""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
from collections.abc import Iterator

import pytest

from mmproxy.parking import ParkingLot
from mmproxy.pool import WorkerPool
from mmproxy.relay import Pair
from mmproxy.sockmap import FALLBACK_ENDED, FALLBACK_INSERT, KernelPair, KernelRelay

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="bpf(2) needs root (CI runs as root)")


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    for sock in (a, b):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


def recv_to_eof(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


class Rig:
    """client -- [daemon_client | daemon_upstream] -- backend, with the kernel relay between."""

    def __init__(self) -> None:
        self.pool = WorkerPool(idle_timeout=5)
        self.lot = ParkingLot(self.pool)
        self.lot.start()
        self.kernel = KernelRelay.open(16)
        self.client, self.daemon_client = tcp_pair()
        self.daemon_upstream, self.backend = tcp_pair()
        self.pair = Pair(self.daemon_client, self.daemon_upstream)
        self.done = threading.Event()
        self.in_kernel = False

    def hand_over(self, kernel: KernelRelay | None = None) -> str | None:
        fallback = KernelPair(kernel or self.kernel, self.pair, self.lot, self.done.set).start()
        self.in_kernel = fallback is None
        return fallback

    def close(self) -> None:
        self.pair.abort()
        if not (self.in_kernel and self.done.wait(10)):  # a pair left to splice is ours
            self.pair.close()
        for sock in (self.client, self.backend):
            sock.close()
        self.lot.close()
        self.pool.close(timeout=1)
        self.kernel.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    made = Rig()
    yield made
    made.close()


def wait_queued(sock: socket.socket, size: int) -> None:
    """Until ``size`` bytes wait in ``sock``'s receive queue (peeked, not read)."""
    sock.settimeout(5)
    while len(sock.recv(size, socket.MSG_PEEK | socket.MSG_WAITALL)) < size:
        pass
    sock.settimeout(None)  # the daemon's sockets are blocking; the relay expects that


def test_header_and_payload_in_one_segment_reach_the_backend_once(rig: Rig) -> None:
    """The header is read from the skb that also carries payload: nothing is sent twice."""
    rig.client.sendall(b"HEADER|first")
    wait_queued(rig.daemon_client, 12)
    assert rig.daemon_client.recv(7) == b"HEADER|"  # a partly consumed skb stays behind
    assert rig.hand_over() is None
    rig.client.sendall(b"+second")
    rig.client.shutdown(socket.SHUT_WR)
    assert recv_to_eof(rig.backend) == b"first+second"


def test_half_close_waits_for_queued_data_and_counts_exactly(rig: Rig) -> None:
    """A FIN behind megabytes still queued reaches the backend after them; the reply comes back
    after the client's end, and the byte counts are exact."""
    assert rig.hand_over() is None
    rig.backend.sendall(b"banner\n")  # a server that speaks first
    assert rig.client.recv(7) == b"banner\n"
    payload = os.urandom(8 << 20)
    sender = threading.Thread(target=lambda: (rig.client.sendall(payload), rig.client.shutdown(1)))
    sender.start()
    assert recv_to_eof(rig.backend) == payload
    sender.join()
    rig.backend.sendall(b"reply")
    rig.backend.shutdown(socket.SHUT_WR)
    assert recv_to_eof(rig.client) == b"reply"
    assert rig.done.wait(10)
    assert (rig.pair.to_target[0], rig.pair.to_client[0]) == (len(payload), 12)
    assert rig.pair.error is None
    assert rig.kernel.held == 0


def test_data_queued_before_insertion_is_not_stranded(rig: Rig) -> None:
    """Bytes that arrive after the drain but before insertion move with no further data."""

    class LateArrival(KernelPair):
        def _drain(self) -> bool:
            quiet = super()._drain()
            rig.client.sendall(b"late")
            wait_queued(rig.daemon_client, 4)
            return quiet

    assert LateArrival(rig.kernel, rig.pair, rig.lot, rig.done.set).start() is None
    rig.in_kernel = True
    rig.backend.settimeout(10)
    assert rig.backend.recv(4) == b"late"


def test_a_side_that_already_ended_stays_with_splice(rig: Rig) -> None:
    rig.client.sendall(b"all of it")
    rig.client.shutdown(socket.SHUT_WR)
    wait_queued(rig.daemon_client, 9)
    assert rig.hand_over() == FALLBACK_ENDED
    assert recv_to_eof(rig.backend) == b"all of it"  # drained and half-closed
    assert rig.kernel.held == 0


def test_reset_ends_the_pair_with_the_error(rig: Rig) -> None:
    assert rig.hand_over() is None
    rig.backend.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    rig.backend.close()
    rig.backend = socket.socket()  # closed above; a stand-in for close()
    assert rig.done.wait(10)
    assert isinstance(rig.pair.error, ConnectionResetError)
    assert rig.kernel.held == 0


def test_a_full_map_leaves_the_pair_to_splice_with_nothing_lost(rig: Rig) -> None:
    """Insertion fails (the map holds one pair): nothing was inserted, what was drained went on."""
    first = Rig()
    try:
        small = KernelRelay.open(1)
        try:
            assert first.hand_over(small) is None
            rig.client.sendall(b"drained")
            wait_queued(rig.daemon_client, 7)
            assert rig.hand_over(small) == FALLBACK_INSERT
            assert small.held == 1
            rig.backend.settimeout(10)
            assert rig.backend.recv(7) == b"drained"
            assert rig.pair.to_target[0] == 7
            first.pair.abort()
            assert first.done.wait(10)
            assert small.held == 0
        finally:
            small.close()
    finally:
        first.close()


def test_an_insertion_that_fails_after_the_kernel_took_bytes_fails_the_pair(rig: Rig) -> None:
    """The last map update fails after the first socket already ran the verdict: what that
    redirected is gone with the removal, so the pair must fail, not go on to splice with a
    hole in the stream."""

    class LateFailure(KernelRelay):
        def insert(self, keys: tuple[bytes, bytes], a: socket.socket, b: socket.socket) -> None:
            super().insert(keys, a, b)
            rig.client.sendall(b"taken")  # redirected by the verdict, queued for the backend
            rig.backend.settimeout(10)
            assert rig.backend.recv(5) == b"taken"
            self.remove(keys)
            raise OSError(errno.ENOMEM, "a late failure")

    failing = LateFailure.open(4)
    try:
        with pytest.raises(OSError, match=r"took 5 bytes from the client socket .*a late failure"):
            rig.hand_over(failing)
        assert failing.held == 0
    finally:
        failing.close()


def test_an_insertion_that_fails_before_any_byte_moved_leaves_the_pair_to_splice(
    rig: Rig,
) -> None:
    class LateFailure(KernelRelay):
        def insert(self, keys: tuple[bytes, bytes], a: socket.socket, b: socket.socket) -> None:
            super().insert(keys, a, b)
            self.remove(keys)
            raise OSError(errno.ENOMEM, "a late failure")

    failing = LateFailure.open(4)
    try:
        assert rig.hand_over(failing) == FALLBACK_INSERT
        rig.client.sendall(b"spliced")
        assert rig.daemon_client.recv(7) == b"spliced"  # still readable here: nothing taken
    finally:
        failing.close()


def test_a_fin_that_fails_the_insertion_leaves_the_pair_to_splice(rig: Rig) -> None:
    """The client's FIN arrives between the drain and the insertion (which then fails: the
    socket is no longer established).  TCP counts the FIN as a byte received; it is not one
    the kernel took, so the pair goes on to splice, for the ordinary reason (a side ended),
    not as a failed insertion an operator should look into."""

    class FinFirst(KernelRelay):
        def insert(self, keys: tuple[bytes, bytes], a: socket.socket, b: socket.socket) -> None:
            rig.client.shutdown(socket.SHUT_WR)
            poller = select.poll()
            poller.register(a, select.POLLRDHUP)
            assert poller.poll(10_000)
            raise OSError(errno.EOPNOTSUPP, "not established")

    refusing = FinFirst.open(4)
    try:
        assert rig.hand_over(refusing) == FALLBACK_ENDED
    finally:
        refusing.close()


def test_a_pair_that_ended_cleanly_leaves_the_maps_with_its_close() -> None:
    """After a clean end the pair is only closed (no removal calls): closing a socket takes
    it out of every map, so a relay with room for one pair takes one pair after another."""
    small = KernelRelay.open(1)
    try:
        for _ in range(3):
            rig = Rig()
            try:
                assert rig.hand_over(small) is None
                rig.client.sendall(b"ping")
                rig.client.shutdown(socket.SHUT_WR)
                assert recv_to_eof(rig.backend) == b"ping"
                rig.backend.shutdown(socket.SHUT_WR)
                assert recv_to_eof(rig.client) == b""
                assert rig.done.wait(10)
                assert rig.pair.error is None
                assert small.held == 0
            finally:
                rig.close()
    finally:
        small.close()
