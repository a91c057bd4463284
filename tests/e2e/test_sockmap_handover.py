"""The kernel relay's hand-over under stress: every byte once, in order, at both ends.

The pair is handed to the kernel while both ends may be sending (mmproxy.sockmap: drain,
insert, kick).  Nothing read in user space may reach the verdict program again (a partly
read segment is redirected whole), nothing queued may be stranded, and the kernel must not
write a byte twice (the relay resets such a pair).  These connections vary what shares a
segment with the header (nothing, a little, more than one read takes) and whether the
backend speaks at once, many at a time, each checked byte for byte.
"""

from __future__ import annotations

import hashlib
import random
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from daemon_runner import Daemon, StartDaemon
from netns import (
    Backend,
    BackendConnection,
    ClientAddresses,
    Deadline,
    Net,
    Peer,
    exchange,
    rewound,
)

CONNECTIONS = 600
AT_ONCE = 24
# Up-payload sizes: none, within one header read, around one read (16 KiB), several segments.
SIZES = (0, 1, 700, 16 * 1024 - 60, 16 * 1024 + 5, 60_000, 300_000)
HEADER_MODES = ("together", "apart", "split")  # payload in the header's send, after it, or
# the header itself in two sends


@pytest.fixture
def relay() -> str:
    return "sockmap"  # a test that runs both relays says so


@dataclass(frozen=True)
class Job:
    number: int
    source: Peer
    header_mode: str
    up: int
    down: int
    backend_speaks: bool  # the backend sends at once, while the client still sends

    def payload(self, direction: str) -> bytes:
        size = self.up if direction == "up" else self.down
        return random.Random(f"{self.number}-{direction}").randbytes(size)


def header(source: Peer) -> bytes:
    return f"PROXY TCP4 {source[0]} 203.0.113.1 {source[1]} 443\r\n".encode()


def backend_handler(jobs: dict[Peer, Job]) -> object:
    def handler(conn: BackendConnection) -> None:
        job = jobs[conn.peer]
        down = job.payload("down")
        if job.backend_speaks:
            writer = threading.Thread(target=conn.send, args=(down,))
            writer.start()
            conn.recv_to_eof()
            writer.join(conn.deadline.remaining())
        else:
            conn.recv_to_eof()
            conn.send(down)
        conn.shut_wr()

    return handler


def client(net: Net, daemon: Daemon, job: Job) -> None:
    up, down = job.payload("up"), job.payload("down")
    deadline = Deadline(60)
    first = header(job.source)
    with net.sockets.connect((daemon.host, daemon.port), 30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if job.header_mode == "together":
            sock.sendall(first + up[:4096])
            rest = up[4096:]
        elif job.header_mode == "split":
            sock.sendall(first[:20])
            sock.sendall(first[20:])
            rest = up
        else:
            sock.sendall(first)
            rest = up
        received = exchange(sock, rest, deadline)
    assert hashlib.sha256(received).digest() == hashlib.sha256(down).digest(), job


def test_every_byte_once_while_both_ends_send_at_hand_over(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    rng = random.Random(14)
    jobs = [
        Job(
            number,
            addresses.v4(),
            rng.choice(HEADER_MODES),
            rng.choice(SIZES),
            rng.choice(SIZES),
            rng.random() < 0.7,
        )
        for number in range(CONNECTIONS)
    ]
    by_source = {job.source: job for job in jobs}
    backend4.handler = backend_handler(by_source)  # type: ignore[assignment]
    daemon = mmproxy(verbose=2)
    deadline = Deadline(240)
    with ThreadPoolExecutor(max_workers=AT_ONCE) as pool:
        futures = [pool.submit(client, net, daemon, job) for job in jobs]
        for future in futures:
            future.result(timeout=max(1.0, deadline.remaining()))
    conns = backend4.wait_done(timeout=60)
    assert len(conns) == len(jobs)
    wrong = []
    for conn in conns:
        job = by_source[conn.peer]
        expected = hashlib.sha256(job.payload("up")).digest()
        if conn.received != job.up or conn.digest.digest() != expected:
            wrong.append((job, conn.received, bytes(conn.head[:80])))
    kernel = daemon.wait_for(lambda line: line.get("msg") == "relayed in the kernel", 1, 1)
    print(f"FIGURE sockmap hand-over stress: {len(kernel)} of {len(jobs)} in the kernel")
    assert not wrong, wrong[:5]
    assert kernel  # the kernel relay was exercised, not only its fallbacks
    failures = daemon.wait_for(lambda line: line.get("dropConnection") is True, 1, 0.5)
    assert not failures, failures


@pytest.mark.parametrize("relay", ["splice", "sockmap"])
def test_a_retransmission_that_repeats_received_bytes(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses, relay: str
) -> None:
    """A segment that repeats 2 bytes the daemon already has (a retransmission cut
    differently from the original, made here with TCP_REPAIR).  TCP's own reads skip them:
    splice relays the stream exactly.  The kernel relay's program gets the segment whole
    and redirects the repeated bytes again (a kernel fault, 6.18); the relay cannot undo
    that, so it resets both sides at the end instead of ending the stream like a good one,
    and says why."""
    received = threading.Event()

    def reader(conn: BackendConnection) -> None:
        while conn.received < 4:
            conn.recv()
        received.set()
        conn.recv_to_eof()

    backend4.handler = reader
    daemon = mmproxy(verbose=2)
    sock = net.sockets.connect((daemon.host, daemon.port), 10)
    try:
        sock.sendall(header(addresses.v4()) + b"AAAA")
        assert received.wait(10)
        if relay == "sockmap":
            assert daemon.wait_for(lambda line: line.get("msg") == "relayed in the kernel")
        sock = rewound(sock, 2, net.sockets.new_socket)
        sock.sendall(b"AABBBB")
        sock.shutdown(socket.SHUT_WR)
        (conn,) = backend4.wait_done()
    finally:
        sock.close()
    if relay == "splice":
        assert bytes(conn.head) == b"AAAABBBB"
        assert conn.error is None
        return
    assert bytes(conn.head) == b"AAAAAABBBB"  # the kernel's doing: 2 bytes twice
    assert conn.error is not None
    assert "ConnectionResetError" in conn.error
    (line,) = daemon.wait_for(lambda line: "wrote 2 bytes twice" in str(line.get("error")))
    assert line.get("dropConnection") is True
