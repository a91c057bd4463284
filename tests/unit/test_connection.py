"""A TCP connection's lifecycle, without root: every state change, every way out.

The client and the backend are loopback TCP sockets of the test's own; the header is a LOCAL
one (``PROXY UNKNOWN``), so the connection connects upstream from this host's own address, as
an unprivileged process may.  The pool and the parking lot are the real ones; the metrics and
the tracker are fakes that count, so that "exactly once" is checked, not assumed.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from loopback import recv_exactly, tcp_pair

from mmproxy import logs
from mmproxy.config import build_config
from mmproxy.connection import Connection, Services, State
from mmproxy.errors import Refusal
from mmproxy.metrics import Metrics
from mmproxy.parking import SCRATCH, ParkingLot
from mmproxy.pool import WorkerPool
from mmproxy.relay import FORWARD, Pair
from mmproxy.tcp import Tracker

HEADER_TIMEOUT = Refusal.HEADER_TIMEOUT
IDLE_TIMEOUT = Refusal.IDLE_TIMEOUT
STOPPING = Refusal.STOPPING
UPSTREAM_FAILED = Refusal.UPSTREAM_FAILED

LOCAL = b"PROXY UNKNOWN\r\n"
WAIT = 10.0  # seconds any awaited event gets on a loaded machine


class CountingMetrics(Metrics):
    """Counts every call, and the parked gauge."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: dict[str, int] = {}
        self.closed_bytes: list[tuple[int, int]] = []
        self.header_errors: list[str] = []
        self.parked_now = 0

    def _count(self, name: str) -> None:
        with self._lock:
            self.calls[name] = self.calls.get(name, 0) + 1

    def opened(self) -> None:
        self._count("opened")

    def closed(self, to_target: int, to_client: int) -> None:
        self._count("closed")
        self.closed_bytes.append((to_target, to_client))

    def header_error(self, reason: str) -> None:
        self._count("header_error")
        self.header_errors.append(reason)

    def upstream_failed(self) -> None:
        self._count("upstream_failed")

    def parked(self) -> None:
        self._count("parked")
        with self._lock:
            self.parked_now += 1

    def resumed(self) -> None:
        self._count("resumed")
        with self._lock:
            self.parked_now -= 1


class CountingTracker(Tracker):
    def __init__(self) -> None:
        super().__init__(100)
        self.removed: list[Connection] = []

    def add(self, connection: Connection) -> bool:
        """What an acceptor does: reserve a slot, then admit the connection to it."""
        return bool(self.reserve(lambda: None)) and self.admit(connection)

    def remove(self, connection: Connection) -> None:
        self.removed.append(connection)
        super().remove(connection)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [record.getMessage() for record in self.records]


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"waited {WAIT}s for: {what}"
        threading.Event().wait(0.005)


class Rig:
    """A backend listener, the shared services, and the sockets to close at the end."""

    def __init__(
        self,
        *,
        grace: float = 0.05,
        idle_timeout: float = 0.0,
        header_timeout: float = 5.0,
        parking: bool = True,
        backend_port: int | None = None,
        scratch: int = SCRATCH,
        inline: bool = True,
    ) -> None:
        self.backend = socket.create_server(("127.0.0.1", 0))
        port = backend_port or self.backend.getsockname()[1]
        config = build_config(
            protocol="tcp",
            listen="127.0.0.1:0",
            target4=f"127.0.0.1:{port}",
            target6=f"[::1]:{port}",
            allowed_subnets=None,
            listeners=1,
            mark=0,
            verbose=2,
            close_after=60,
            dynamic_destination=False,
            listen_transparent=False,
            header_timeout=header_timeout,
            log_format="text",
            idle_timeout=idle_timeout,
            connect_timeout=2.0,
        )
        self.records = Records()
        logger = logging.getLogger(f"test-connection-{id(self)}")
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        logger.addHandler(self.records)
        self.pool = WorkerPool(idle_timeout=5)
        self.lot = ParkingLot(self.pool, scratch) if parking else None
        if self.lot is not None:
            self.lot.start()
        self.metrics = CountingMetrics()
        self.tracker = CountingTracker()
        self.services = Services(
            config,
            logs.ConnectionLog(logger, 2),
            self.pool,
            self.tracker,
            self.metrics,
            parking=self.lot,
            grace=grace,
            inline=inline,
        )
        self.sockets: list[socket.socket] = [self.backend]

    def connect(
        self, first: bytes = LOCAL, *, on_acceptor: bool = False
    ) -> tuple[socket.socket, Connection]:
        """A client whose connection is being served; ``first`` is what it sends at once.

        ``on_acceptor``: started on this thread, as the acceptor does, instead of on a worker.
        """
        client, daemon_side = tcp_pair()
        self.sockets.append(client)
        connection = Connection(daemon_side, ("127.0.0.1", 4000), 0, self.services)
        assert self.tracker.add(connection)
        assert connection.state is State.HEADER
        if first:
            client.sendall(first)
            if on_acceptor:  # all of it arrived, as the tests of this mode assume
                wait_for(lambda: inq(daemon_side) == len(first), "the bytes to arrive")
        if on_acceptor:
            connection.start()
        else:
            self.pool.submit(connection.serve)
        return client, connection

    def accept(self) -> socket.socket:
        self.backend.settimeout(WAIT)
        sock, _ = self.backend.accept()
        sock.settimeout(WAIT)
        self.sockets.append(sock)
        return sock

    def done(self, connection: Connection) -> None:
        wait_for(lambda: connection.state is State.DONE, "the connection to be done")
        wait_for(lambda: len(self.tracker) == 0, "the tracker to be empty")
        assert self.tracker.removed.count(connection) == 1, "left the tracker exactly once"

    def busy_workers(self) -> int:
        return self.pool.size - self.pool.idle

    def close(self) -> None:
        if self.lot is not None:
            self.lot.close()
        self.pool.close(timeout=5)
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    made = Rig()
    yield made
    made.close()


def inq(sock: socket.socket) -> int:
    """Bytes waiting in ``sock``'s receive queue."""
    return len(sock.recv(1 << 16, socket.MSG_PEEK | socket.MSG_DONTWAIT))


def assert_closed_by_peer(sock: socket.socket) -> None:
    sock.settimeout(WAIT)
    assert sock.recv(1) == b""


# ------------------------------------------------------------------ the way through


def test_header_connect_relay_close(rig: Rig) -> None:
    client, connection = rig.connect(LOCAL + b"hello")
    backend = rig.accept()
    assert recv_exactly(backend, 5) == b"hello"
    backend.sendall(b"world!")
    assert recv_exactly(client, 6) == b"world!"
    client.shutdown(socket.SHUT_WR)
    assert_closed_by_peer(backend)  # the half-close is relayed ...
    backend.sendall(b"late")  # ... and the other way still flows
    assert recv_exactly(client, 4) == b"late"
    backend.shutdown(socket.SHUT_WR)
    assert_closed_by_peer(client)
    rig.done(connection)
    assert rig.metrics.calls.get("opened") == 1
    assert rig.metrics.closed_bytes == [(5, 10)]
    assert "header_error" not in rig.metrics.calls
    messages = rig.records.messages()
    assert messages.count("successfully established upstream connection") == 1
    assert messages.count("connection closing") == 1


@pytest.mark.parametrize("on_acceptor", [False, True], ids=["worker", "acceptor"])
def test_a_trickling_header_parks_then_completes(rig: Rig, on_acceptor: bool) -> None:
    client, connection = rig.connect(b"PROXY UNK", on_acceptor=on_acceptor)
    wait_for(lambda: rig.lot is not None and len(rig.lot) == 1, "the header to be parked")
    assert connection.state is State.HEADER
    wait_for(lambda: rig.busy_workers() == 0, "a parked header to hold no thread")
    client.sendall(b"NOWN\r\nping")
    backend = rig.accept()
    assert recv_exactly(backend, 4) == b"ping"
    client.close()
    backend.close()
    rig.done(connection)
    assert rig.metrics.closed_bytes == [(4, 0)]
    # Where start() never blocks, the lot goes on with the header itself: no worker.
    assert rig.pool._started == (0 if on_acceptor else 1)


# ------------------------------------------------------------------ ways out before the relay


def test_a_bad_header_is_refused_once(rig: Rig) -> None:
    client, connection = rig.connect(b"GET / HTTP/1.1\r\n\r\n")
    assert_closed_by_peer(client)
    rig.done(connection)
    assert rig.metrics.calls == {"header_error": 1}
    assert [m for m in rig.records.messages() if m == "failed to parse PROXY header"] == [
        "failed to parse PROXY header"
    ]


def test_a_header_that_never_completes_times_out() -> None:
    rig = Rig(header_timeout=0.2)
    try:
        client, connection = rig.connect(b"PROXY ")
        assert_closed_by_peer(client)
        rig.done(connection)
        assert rig.metrics.header_errors == [HEADER_TIMEOUT]
    finally:
        rig.close()


def test_an_upstream_that_refuses_is_counted_as_such() -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    rig = Rig(backend_port=port)
    try:
        client, connection = rig.connect()
        assert_closed_by_peer(client)
        rig.done(connection)
        assert rig.metrics.calls == {"upstream_failed": 1}
        reasons = [getattr(record, "reason", None) for record in rig.records.records]
        assert [reason for reason in reasons if reason] == [UPSTREAM_FAILED]
    finally:
        rig.close()


def test_abort_while_the_header_is_parked(rig: Rig) -> None:
    client, connection = rig.connect(b"PROXY ")
    wait_for(lambda: rig.lot is not None and len(rig.lot) == 1, "the header to be parked")
    connection.abort()
    assert_closed_by_peer(client)
    rig.done(connection)
    assert rig.metrics.calls == {"header_error": 1}


def test_a_lot_that_closes_on_a_parked_header_finishes_it(rig: Rig) -> None:
    client, connection = rig.connect(b"PROXY ")
    wait_for(lambda: rig.lot is not None and len(rig.lot) == 1, "the header to be parked")
    assert rig.lot is not None
    rig.lot.close()
    rig.lot = None
    assert_closed_by_peer(client)
    rig.done(connection)
    assert rig.metrics.header_errors == [STOPPING]


def test_a_connection_that_got_no_thread_is_finished(rig: Rig) -> None:
    client, daemon_side = tcp_pair()
    rig.sockets.append(client)
    connection = Connection(daemon_side, ("127.0.0.1", 4000), 0, rig.services)
    assert rig.tracker.add(connection)
    connection.not_served(RuntimeError("no thread"))
    assert_closed_by_peer(client)
    rig.done(connection)
    connection.not_served(RuntimeError("again"))  # a second way out changes nothing
    assert rig.tracker.removed == [connection]
    assert rig.metrics.calls == {}  # never read: no header error, nothing relayed
    # go-mmproxy's "new connection" comes first, once the peer is taken up (-v 2).
    assert rig.records.messages() == ["new connection", "no thread for the connection"]


# ------------------------------------------------------------------ quiet relays park


def exchange(client: socket.socket, backend: socket.socket, up: bytes, down: bytes) -> None:
    client.sendall(up)
    assert recv_exactly(backend, len(up)) == up
    backend.sendall(down)
    assert recv_exactly(client, len(down)) == down


def parked(rig: Rig, connection: Connection) -> None:
    wait_for(lambda: connection.state is State.PARKED, "the connection to park")
    wait_for(lambda: rig.busy_workers() == 0, "every worker to be idle")
    assert rig.metrics.parked_now == 1


def quiet_after_one_byte(rig: Rig) -> tuple[socket.socket, socket.socket, Connection]:
    """A connection that relayed one byte up and then went quiet: (client, backend, it)."""
    client, connection = rig.connect(LOCAL + b"x")
    backend = rig.accept()
    assert recv_exactly(backend, 1) == b"x"
    parked(rig, connection)
    return client, backend, connection


def test_a_quiet_relay_parks_and_resumes_in_order(rig: Rig) -> None:
    client, connection = rig.connect(LOCAL + b"req1")
    backend = rig.accept()
    assert recv_exactly(backend, 4) == b"req1"
    backend.sendall(b"rep1")
    assert recv_exactly(client, 4) == b"rep1"
    for round_ in range(3):
        parked(rig, connection)
        assert rig.lot is not None
        assert len(rig.lot) == 2, "both sockets wait in the lot"
        exchange(client, backend, b"up%d" % round_ * 1000, b"down%d" % round_ * 3000)
    parked(rig, connection)
    client.close()
    backend.close()
    rig.done(connection)
    assert rig.metrics.parked_now == 0
    assert rig.metrics.calls["parked"] == rig.metrics.calls["resumed"] >= 1
    assert rig.metrics.closed_bytes == [(4 + 3 * 3000, 4 + 3 * 15000)]


def test_a_connection_with_nothing_to_relay_parks_at_once() -> None:
    rig = Rig(grace=60)  # no grace needed: nothing arrived with the header
    try:
        client, connection = rig.connect()
        backend = rig.accept()
        parked(rig, connection)
        exchange(client, backend, b"a", b"b")
        backend.sendall(b"x" * 100_000)
        assert recv_exactly(client, 100_000) == b"x" * 100_000
        client.close()
        backend.close()
        rig.done(connection)
        assert rig.metrics.closed_bytes == [(1, 100_001)]
    finally:
        rig.close()


def test_one_direction_parks_while_the_other_streams() -> None:
    # Every read fills a 1-byte scratch buffer, so the lot hands the backend's stream to a
    # thread (as it does bulk), and a long grace keeps it there.
    rig = Rig(scratch=1, grace=60)
    try:
        one_direction_parks_while_the_other_streams(rig)
    finally:
        rig.close()


def one_direction_parks_while_the_other_streams(rig: Rig) -> None:
    client, connection = rig.connect(LOCAL + b"subscribe")
    backend = rig.accept()
    assert recv_exactly(backend, 9) == b"subscribe"
    assert rig.lot is not None
    lot = rig.lot
    sent = 0
    received = bytearray()
    # The backend streams for a while; the client says nothing: its direction parks, while
    # the streaming one is on a thread.  (Between the lot handing the stream over and the
    # thread taking it, one spot is parked and the state still says PARKED: wait for both.)
    deadline = time.monotonic() + WAIT

    def settled() -> bool:
        return len(lot) == 1 and connection.state is State.RELAYING

    while not settled() and time.monotonic() < deadline:
        backend.sendall(b"tick")
        sent += 4
        received += client.recv(65536)
        threading.Event().wait(0.01)
    assert len(lot) == 1, "the quiet direction parked its source"
    assert connection.state is State.RELAYING
    client.sendall(b"more")  # the parked direction wakes and relays
    assert recv_exactly(backend, 4) == b"more"
    backend.shutdown(socket.SHUT_WR)
    client.settimeout(WAIT)
    while chunk := client.recv(65536):
        received += chunk
    assert bytes(received) == b"tick" * (sent // 4)
    client.close()
    rig.done(connection)
    assert rig.metrics.closed_bytes == [(13, sent)]


def test_half_close_while_parked() -> None:
    rig = Rig()
    try:
        client, connection = rig.connect(LOCAL + b"q")
        backend = rig.accept()
        assert recv_exactly(backend, 1) == b"q"
        parked(rig, connection)
        client.shutdown(socket.SHUT_WR)
        assert_closed_by_peer(backend)
        parked(rig, connection)  # one direction over, the other parked again
        backend.sendall(b"answer")
        assert recv_exactly(client, 6) == b"answer"
        backend.shutdown(socket.SHUT_WR)
        assert_closed_by_peer(client)
        rig.done(connection)
        assert rig.metrics.parked_now == 0
        assert rig.metrics.closed_bytes == [(1, 6)]
    finally:
        rig.close()


def test_the_idle_timeout_ends_a_parked_pair() -> None:
    rig = Rig(grace=0.05, idle_timeout=0.4)
    try:
        started = time.monotonic()
        client, backend, connection = quiet_after_one_byte(rig)
        assert_closed_by_peer(client)
        assert_closed_by_peer(backend)
        rig.done(connection)
        assert time.monotonic() - started >= 0.3
        reasons = [getattr(record, "reason", None) for record in rig.records.records]
        assert reasons.count(IDLE_TIMEOUT) == 1
        assert rig.metrics.closed_bytes == [(1, 0)]
        assert rig.metrics.parked_now == 0
    finally:
        rig.close()


def test_abort_wakes_a_parked_pair(rig: Rig) -> None:
    client, backend, connection = quiet_after_one_byte(rig)
    connection.abort()
    assert_closed_by_peer(client)
    assert_closed_by_peer(backend)
    rig.done(connection)
    assert rig.metrics.closed_bytes == [(1, 0)]
    assert "connection closing" in rig.records.messages()


def test_a_lot_that_closes_on_a_parked_pair_finishes_it_once(rig: Rig) -> None:
    client, _backend, connection = quiet_after_one_byte(rig)
    assert rig.lot is not None
    rig.lot.close()
    rig.lot = None
    assert_closed_by_peer(client)
    rig.done(connection)
    assert rig.metrics.calls["closed"] == 1
    assert rig.metrics.parked_now == 0
    assert rig.records.messages().count("connection broken") == 1


def test_a_pool_that_refuses_the_resume_finishes_it_once() -> None:
    rig = Rig(scratch=1)  # every read fills the lot's buffer: "bulk", for a thread
    try:
        pool_refuses_the_resume(rig)
    finally:
        rig.close()


def pool_refuses_the_resume(rig: Rig) -> None:
    client, backend, connection = quiet_after_one_byte(rig)
    rig.pool.close(timeout=5)
    client.sendall(b"y")  # the lot moves it, hands the direction over; the pool refuses it
    assert recv_exactly(backend, 1) == b"y"
    assert_closed_by_peer(backend)
    rig.done(connection)
    assert rig.metrics.calls["closed"] == 1
    assert rig.metrics.parked_now == 0


def test_without_a_lot_a_relay_keeps_its_threads() -> None:
    rig = Rig(parking=False)
    try:
        client, connection = rig.connect(LOCAL + b"x")
        backend = rig.accept()
        assert recv_exactly(backend, 1) == b"x"
        assert connection.state is State.RELAYING
        wait_for(lambda: rig.busy_workers() == 2, "both directions on a worker")
        client.close()
        backend.close()
        rig.done(connection)
    finally:
        rig.close()


@pytest.mark.parametrize("on_acceptor", [False, True], ids=["worker", "acceptor"])
def test_a_request_its_answer_and_the_closes_take_no_relay_thread(
    rig: Rig, on_acceptor: bool
) -> None:
    """The lot moves the answer and both ends itself: the thread that read the header is
    the only one (on the acceptor, header, connect and the relay's start need no worker)."""
    client, connection = rig.connect(LOCAL + b"GET\n", on_acceptor=on_acceptor)
    if on_acceptor:
        assert connection.state is State.PARKED, "relaying, back from start() with no thread"
    backend = rig.accept()
    assert recv_exactly(backend, 4) == b"GET\n"
    backend.sendall(b"answer")
    backend.close()
    assert recv_exactly(client, 6) == b"answer"
    assert_closed_by_peer(client)
    client.close()
    rig.done(connection)
    assert rig.lot is not None
    assert len(rig.lot) == 0
    assert rig.pool._started == (0 if on_acceptor else 1)
    assert rig.metrics.closed_bytes == [(4, 6)]
    assert rig.metrics.calls["parked"] == rig.metrics.calls["resumed"] == 1


# ------------------------------------------------------------------ started on the acceptor


def test_on_the_acceptor_a_refused_connect_finishes_at_once() -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    rig = Rig(backend_port=port)
    try:
        client, connection = rig.connect(on_acceptor=True)
        assert connection.state is State.DONE, "a refusal on loopback is known at once"
        assert_closed_by_peer(client)
        rig.done(connection)
        assert rig.metrics.calls == {"upstream_failed": 1}
        assert rig.pool._started == 0
    finally:
        rig.close()


def test_on_the_acceptor_a_connect_under_way_waits_on_a_worker() -> None:
    """A backend that has not answered the SYN yet: the acceptor never waits for it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    filler = socket.create_connection(server.getsockname(), timeout=WAIT)  # queue full
    rig = Rig(backend_port=server.getsockname()[1])
    rig.sockets += [server, filler]
    try:
        client, connection = rig.connect(LOCAL + b"late", on_acceptor=True)
        assert connection.state is State.CONNECTING
        assert rig.pool._started == 1, "the wait for the connect went to a worker"
        first, _ = server.accept()  # room in the queue: the retransmitted SYN gets in
        first.close()
        server.settimeout(WAIT)
        backend, _ = server.accept()
        rig.sockets.append(backend)
        assert recv_exactly(backend, 4) == b"late"
        client.close()
        backend.close()
        rig.done(connection)
        assert rig.metrics.closed_bytes == [(4, 0)]
    finally:
        rig.close()


def test_what_the_backend_cannot_take_at_once_is_left_pending(rig: Rig) -> None:
    """The bytes that came with the header are sent without waiting: what a full backend
    does not take now waits in the pair, for the direction's worker to send first."""
    client, daemon_side = tcp_pair()
    up, backend = socket.socketpair()  # stream sockets whose buffers can be made small
    rig.sockets += [client, daemon_side, up, backend]
    up.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    connection = Connection(daemon_side, ("127.0.0.1", 4000), 0, rig.services)
    pair = Pair(daemon_side, up)
    payload = bytes(range(256)) * 1024
    connection._send_first(pair, payload)
    sent = pair.to_target[0]
    assert 0 < sent < len(payload)
    assert pair.pending[FORWARD] == payload[sent:]
    received = recv_exactly(backend, sent)
    assert received == payload[:sent]


def test_without_inline_start_hands_the_connection_to_a_worker() -> None:
    """Free-threaded builds: the acceptor hands the header and the connect to a worker."""
    rig = Rig(inline=False)
    try:
        client, connection = rig.connect(LOCAL + b"x", on_acceptor=True)
        backend = rig.accept()
        assert recv_exactly(backend, 1) == b"x"
        assert rig.pool._started == 1
        client.close()
        backend.close()
        rig.done(connection)
    finally:
        rig.close()
