"""UDP flows without threads: the event loop, the flow budget, a dispatcher driven by hand.

Real loopback sockets, no namespace: headers are LOCAL (nothing to impersonate), and each
"balancer" is its own socket, so each is its own flow.  The dispatcher's loop is not run: the
tests call its handlers and its timer with a clock they choose, so nothing waits on time.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from test_config import GO_DEFAULTS

from mmproxy.acl import AllowList, AllowListHolder
from mmproxy.config import build_config
from mmproxy.dispatch import CACHED_HEADER, HEADERS_PER_FLOW, POLLING_FLOWS, Dispatcher
from mmproxy.errors import Refusal
from mmproxy.eventloop import EventLoop, Spin
from mmproxy.flows import (
    GSO_MAX_BYTES,
    GSO_MAX_SEGMENTS,
    GSO_MAX_SIZE,
    FlowBudget,
    kernel_drops,
    send_datagrams,
)
from mmproxy.protocol import ProxyHeader, encode
from mmproxy.tlv import Noop
from mmproxy.udp import UdpServer

LOCAL = encode(ProxyHeader.local())


def _udp_socket() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    yield sock
    sock.close()


backend = pytest.fixture(_udp_socket, name="backend")


class Rig:
    """A UdpServer on one listening socket whose dispatcher the test drives by hand."""

    def __init__(self, backend: socket.socket, **flags: Any) -> None:
        port = backend.getsockname()[1]
        options: dict[str, Any] = {
            **GO_DEFAULTS,
            "protocol": "udp",
            "listen": "127.0.0.1:0",
            "target4": f"127.0.0.1:{port}",
            "target6": f"[::1]:{port}",
        }
        config = build_config(**{**options, **flags})
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.listener.bind(("127.0.0.1", 0))
        self.server = UdpServer(
            config,
            logging.getLogger("test-udp"),
            [self.listener],
            flags.get("max_udp_flows") or 64,
            AllowListHolder(AllowList.everyone()),
        )
        self.dispatcher: Dispatcher = self.server._dispatchers[0]
        self.balancers: list[socket.socket] = []

    def balancer(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        self.balancers.append(sock)
        return sock

    def send(self, balancer: socket.socket, data: bytes) -> None:
        """Send ``data`` to the listener and let the dispatcher read it."""
        balancer.sendto(data, self.listener.getsockname())
        self.dispatcher._readable()

    def close(self) -> None:
        self.dispatcher.loop.stop()
        self.server.stop("test")  # the loops never ran: stop() still closes every flow
        for sock in self.balancers:
            sock.close()


@pytest.fixture
def rig(backend: socket.socket) -> Iterator[Rig]:
    made = Rig(backend)
    yield made
    made.close()


def test_a_flow_opens_once_and_its_header_is_cached(rig: Rig, backend: socket.socket) -> None:
    balancer = rig.balancer()
    rig.send(balancer, LOCAL + b"one")
    rig.send(balancer, LOCAL + b"two")
    assert backend.recv(100) == b"one"
    assert backend.recv(100) == b"two"
    assert len(rig.dispatcher.flows) == 1
    assert list(rig.dispatcher.routes) == [(balancer.getsockname(), LOCAL)]
    assert rig.dispatcher.counts["flowsOpened"] == 1


def test_replies_reach_the_balancer_without_a_header(rig: Rig, backend: socket.socket) -> None:
    balancer = rig.balancer()
    rig.send(balancer, LOCAL + b"ping")
    data, peer = backend.recvfrom(100)
    backend.sendto(b"pong:" + data, peer)
    (flow,) = rig.dispatcher.flows.values()
    # the reply loop is this dispatcher's loop; its handler for the flow's socket reads
    rig.dispatcher.replies._readable(flow)
    assert balancer.recvfrom(100) == (b"pong:ping", rig.listener.getsockname())
    assert flow.datagrams_to_client == 1


def test_idle_flow_expires_by_the_heap_and_a_busy_one_is_kept(
    rig: Rig, backend: socket.socket
) -> None:
    idle, busy = rig.balancer(), rig.balancer()
    rig.send(idle, LOCAL + b"a")
    rig.send(busy, LOCAL + b"b")
    dispatcher = rig.dispatcher
    flows = {flow.sender: flow for flow in dispatcher.flows.values()}
    idle_flow, busy_flow = flows[idle.getsockname()], flows[busy.getsockname()]
    start = dispatcher.loop.now
    busy_flow.last_out = start + 50  # a reply moved 50 s later
    deadline = dispatcher._tick(start + 61)
    assert idle_flow.sock.fileno() == -1, "the idle flow's socket is closed"
    assert list(dispatcher.flows.values()) == [busy_flow]
    assert list(dispatcher.routes.values()) == [busy_flow], "the cache forgot it"
    assert [entry[0] for entry in dispatcher._deadlines] == [pytest.approx(start + 50 + 60)]
    assert deadline is not None
    assert deadline <= start + 50 + 60
    assert rig.server.open_flows == 1
    rig.send(idle, LOCAL + b"again")  # a new datagram opens a new flow
    assert len(dispatcher.flows) == 2
    assert dispatcher.counts["flowsOpened"] == 3


def test_route_cache_holds_a_few_short_headers_per_flow(rig: Rig, backend: socket.socket) -> None:
    """Distinct padded headers for one flow: each is delivered, few are remembered."""
    balancer = rig.balancer()
    for size in range(200):
        header = encode(ProxyHeader.local(tlvs=(Noop(b"x" * size),)))
        rig.send(balancer, header + b"p")
    assert [backend.recv(10) for _ in range(200)] == [b"p"] * 200
    assert len(rig.dispatcher.flows) == 1
    assert len(rig.dispatcher.routes) == HEADERS_PER_FLOW
    assert all(len(header) <= CACHED_HEADER for _sender, header in rig.dispatcher.routes)


def _batch(rig: Rig, balancer: socket.socket, datagrams: list[bytes]) -> None:
    """Queue ``datagrams`` at the listener, then let the dispatcher read them as one batch."""
    for datagram in datagrams:
        balancer.sendto(datagram, rig.listener.getsockname())
    rig.dispatcher._readable()


@pytest.mark.parametrize("udp_header", ["every", "first"])
def test_one_batch_keeps_a_flow_in_order_across_headers(
    backend: socket.socket, udp_header: str
) -> None:
    """Within one batch, repeated headers (the batch's last hit), another cached header, a
    parsed one and (--udp-header first) a datagram without one all reach the flow in order."""
    rig = Rig(backend, udp_header=udp_header)
    try:
        balancer = rig.balancer()
        padded = encode(ProxyHeader.local(tlvs=(Noop(b"pad"),)))
        longer = encode(ProxyHeader.local(tlvs=(Noop(b"longer"),)))
        rig.send(balancer, LOCAL + b"0")
        rig.send(balancer, padded + b"1")  # both headers are cached now
        bare = [b"5"] if udp_header == "first" else [LOCAL + b"5"]
        _batch(
            rig,
            balancer,
            [LOCAL + b"2", LOCAL + b"3", padded + b"4", *bare, longer + b"6", LOCAL + b"7"],
        )
        assert [backend.recv(10) for _ in range(8)] == [str(n).encode() for n in range(8)]
        assert len(rig.dispatcher.flows) == 1
    finally:
        rig.close()


def test_the_loop_polls_only_while_few_flows_move(rig: Rig, backend: socket.socket) -> None:
    """Each second's check counts the flows that sent datagrams since the last one: more than
    POLLING_FLOWS rule the loop's polling out until a later check counts few again."""
    dispatcher = rig.dispatcher
    spin = dispatcher.loop.spin
    balancers = [rig.balancer() for _ in range(POLLING_FLOWS + 1)]
    for balancer in balancers:
        rig.send(balancer, LOCAL + b"open")
    start = dispatcher.loop.now
    dispatcher._tick(start + 1)
    assert not spin.allowed  # flows opened since the last check count too
    for balancer in balancers:
        rig.send(balancer, LOCAL + b"busy")
    dispatcher._tick(start + 2)
    assert not spin.allowed
    spin.worked(start + 2.0001, start + 2.0002)
    spin.worked(start + 2.0003, start + 2.0004)
    assert spin.until == float("-inf")  # work came soon, but polling is ruled out
    rig.send(balancers[0], LOCAL + b"one")
    dispatcher._tick(start + 3)
    assert spin.allowed


def test_no_route_is_cached_without_a_flow(backend: socket.socket) -> None:
    rig = Rig(backend, max_udp_flows=1)
    try:
        first, second = rig.balancer(), rig.balancer()
        rig.send(first, LOCAL + b"in")
        for number in range(50):
            rig.send(second, encode(ProxyHeader.local(tlvs=(Noop(bytes(number)),))) + b"out")
        assert backend.recv(10) == b"in"
        assert rig.dispatcher.counts[f"dropped.{Refusal.FLOW_LIMIT}"] == 50
        assert len(rig.dispatcher.routes) == 1
    finally:
        rig.close()


def test_stop_closes_every_flow_and_gives_the_budget_back(backend: socket.socket) -> None:
    rig = Rig(backend)
    balancers = [rig.balancer() for _ in range(5)]
    for balancer in balancers:
        rig.send(balancer, LOCAL + b"x")
    flows = list(rig.dispatcher.flows.values())
    assert rig.server.open_flows == 5
    rig.close()
    assert all(flow.sock.fileno() == -1 for flow in flows)
    assert rig.server.open_flows == 0
    assert rig.dispatcher.replies.counts["flowsClosed"] == 5


def test_flow_budget_is_shared_and_given_back() -> None:
    budget = FlowBudget(2)
    assert budget.take()
    assert budget.take()
    assert not budget.take()
    budget.give_back()
    assert budget.take()
    assert len(budget) == 2


def test_kernel_drops_are_read_from_the_socket() -> None:
    """A receive queue too small for a burst: the kernel's drop counter says how many."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        sink.bind(("127.0.0.1", 0))
        assert kernel_drops(sink) == 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as source:
            for _ in range(200):
                source.sendto(b"x" * 512, sink.getsockname())
        dropped = kernel_drops(sink)
        assert dropped is not None
        assert dropped > 0


# ----------------------------------------------------------------------------- batches


def receive_all(sock: socket.socket, count: int) -> list[bytes]:
    return [sock.recv(65536) for _ in range(count)]


MIXED = (
    [b"a" * 64] * 20  # one run
    + [b"b" * 10]  # a shorter one ends it
    + [b""]  # an empty datagram goes alone
    + [b"c" * 100] * (GSO_MAX_SEGMENTS + 3)  # longer than a run may be
    + [b"d" * (GSO_MAX_SIZE + 1)] * 2  # too large to be segmented
    + [b"e" * 7, b"f" * 9]  # different sizes, each its own
)


def test_batches_arrive_as_the_same_datagrams_in_order(backend: socket.socket) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as connected:
        connected.connect(backend.getsockname())
        assert send_datagrams(connected, list(MIXED)) == (0, 0, None)
        assert receive_all(backend, len(MIXED)) == MIXED
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as unconnected:
        assert send_datagrams(unconnected, list(MIXED), backend.getsockname()) == (0, 0, None)
        assert receive_all(backend, len(MIXED)) == MIXED


class Counting:
    """A socket that counts its segmented sends."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.segmented: list[int] = []  # bytes per sendmsg

    def sendmsg(self, buffers: list[bytes], *args: Any) -> int:
        self.segmented.append(sum(map(len, buffers)))
        return self.sock.sendmsg(buffers, *args)

    def send(self, data: bytes) -> int:
        return self.sock.send(data)


def test_a_run_stays_within_64_kib_per_send(backend: socket.socket) -> None:
    payloads = [bytes([n]) * GSO_MAX_SIZE for n in range(100)]
    backend.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # room for them all
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as connected:
        connected.connect(backend.getsockname())
        counting = Counting(connected)
        assert send_datagrams(counting, payloads) == (0, 0, None)  # type: ignore[arg-type]
        assert receive_all(backend, 100) == payloads
    assert len(counting.segmented) == 3
    assert max(counting.segmented) <= GSO_MAX_BYTES


class NoGso:
    """A socket whose kernel refuses UDP_SEGMENT: sendmsg fails, send works."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.refused = 0

    def sendmsg(self, *_args: object) -> int:
        self.refused += 1
        raise OSError(errno.EIO, "no GSO here")

    def send(self, data: bytes) -> int:
        return self.sock.send(data)


def test_a_kernel_without_gso_gets_them_one_by_one(backend: socket.socket) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as connected:
        connected.connect(backend.getsockname())
        fake = NoGso(connected)
        payloads = [b"x" * 32] * 5
        assert send_datagrams(fake, payloads) == (0, 0, None)  # type: ignore[arg-type]
        assert fake.refused == 1
        assert receive_all(backend, 5) == payloads


def test_a_refused_run_is_counted_as_not_sent() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as connected:
        connected.connect(("127.0.0.1", 9))  # nothing listens: ICMP port unreachable
        connected.send(b"probe")
        failed = 0
        for _ in range(100):  # the ICMP error arrives asynchronously; a few tries at most
            failed, failed_bytes, error = send_datagrams(connected, [b"y" * 8] * 3)
            if failed:
                break
        assert (failed, failed_bytes) == (3, 24)
        assert isinstance(error, ConnectionRefusedError)


# ----------------------------------------------------------------------------- the event loop


@contextlib.contextmanager
def running(
    loop: EventLoop, handler: Callable[[int], None]
) -> Iterator[tuple[int, threading.Thread]]:
    """``loop`` on a thread of its own, with ``handler(fd)`` on a pipe's read end; yields the
    write end and the thread, and stops and closes everything after."""
    read, write = os.pipe()
    loop.add_reader(read, lambda: handler(read))
    thread = threading.Thread(target=loop.run)
    thread.start()
    try:
        yield write, thread
    finally:
        loop.stop()
        thread.join(5)
        loop.close()
        os.close(read)
        os.close(write)
    assert not thread.is_alive()


def test_loop_runs_handlers_on_its_thread_until_stopped() -> None:
    seen: list[int] = []
    done = threading.Event()

    def readable(fd: int) -> None:
        seen.append(threading.get_ident())
        os.read(fd, 10)
        done.set()

    with running(EventLoop(), readable) as (write, thread):
        os.write(write, b"x")
        assert done.wait(5)
    assert seen == [thread.ident]


def test_loop_timer_gets_its_deadline() -> None:
    """The timer runs after every turn; the deadline it returns ends the next wait."""
    loop = EventLoop()
    fired = threading.Event()
    calls: list[float] = []

    def timer(now: float) -> float | None:
        calls.append(now)
        if len(calls) == 3:
            fired.set()
            return None
        return now + 0.01

    def drain(fd: int) -> None:
        os.read(fd, 10)

    loop.timer = timer
    with running(loop, drain) as (write, _thread):
        os.write(write, b"x")  # the first turn: nothing else would end the first wait
        assert fired.wait(5)
    assert calls[1] >= calls[0] + 0.01
    assert calls[2] >= calls[1] + 0.01


def test_loop_timer_waits_for_its_deadline_unless_brought_forward() -> None:
    """Turns before the timer's deadline do not call it; timer_by makes it due sooner."""
    loop = EventLoop()
    calls: list[float] = []
    turns: list[bytes] = []
    handled = threading.Event()
    called_again = threading.Event()

    def timer(now: float) -> float | None:
        calls.append(now)
        if len(calls) == 2:
            called_again.set()
        return now + 3600.0  # far away: only timer_by can make it due in this test

    def readable(fd: int) -> None:
        data = os.read(fd, 10)
        turns.append(data)
        if data == b"bring":
            loop.timer_by(loop.now)
        handled.set()

    loop.timer = timer
    with running(loop, readable) as (write, _thread):
        for _ in range(3):
            handled.clear()
            os.write(write, b"x")
            assert handled.wait(5)
        assert len(calls) == 1  # the first turn only: the deadline is an hour away
        os.write(write, b"bring")
        assert called_again.wait(5)
    assert turns[-1] == b"bring"
    assert len(calls) == 2


def test_spin_only_after_work_that_came_soon() -> None:
    """The loop polls without waiting only while each turn's work came within the window of
    the turn before it; a longer gap, or the first turn, puts it back to sleeping."""
    spin = Spin(0.001)
    spin.worked(10.0, 10.0002)  # the first turn: nothing came before it
    assert spin.until == float("-inf")
    spin.worked(10.0009, 10.001)  # 0.7 ms after the last turn ended: within the window
    assert spin.until == pytest.approx(10.002)
    spin.worked(10.0015, 10.0016)  # found while polling
    assert spin.until == pytest.approx(10.0026)
    spin.worked(10.0040, 10.0041)  # 2.4 ms later: the polling ran out, the loop slept
    assert spin.until == float("-inf")
    spin.worked(10.0045, 10.0046)  # soon again: polling again
    assert spin.until == pytest.approx(10.0056)


def test_spin_is_ruled_out_by_its_owner() -> None:
    """``allowed`` False (the dispatcher's many busy flows keep the loop busy anyway): turns
    close together do not start polling."""
    spin = Spin(0.001)
    spin.allowed = False
    spin.worked(10.0, 10.0001)
    spin.worked(10.0002, 10.0003)
    assert spin.until == float("-inf")
    spin.allowed = True
    spin.worked(10.0004, 10.0005)
    assert spin.until == pytest.approx(10.0015)


def test_spin_window_zero_never_polls() -> None:
    spin = Spin(0.0)
    for turn in range(5):
        spin.worked(float(turn), turn + 0.5)
        assert spin.until == float("-inf")


def yields_counted(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], threading.Event]:
    """Count the loop's ``sched_yield`` calls (one per poll that found nothing while it
    polls); the event is set at the first."""
    counted = [0]
    yielded = threading.Event()
    real = os.sched_yield

    def counting() -> None:
        counted[0] += 1
        yielded.set()
        real()

    monkeypatch.setattr(os, "sched_yield", counting)
    return counted, yielded


def reading(handled: threading.Event) -> Callable[[int], None]:
    """A handler that drains its pipe and sets ``handled``."""

    def readable(fd: int) -> None:
        os.read(fd, 10)
        handled.set()

    return readable


def test_loop_polls_instead_of_sleeping_while_work_comes_soon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two turns of work close together: the loop then polls (yielding the CPU in between)
    instead of sleeping, and still stops when told."""
    _yields, yielded = yields_counted(monkeypatch)
    handled = threading.Event()
    readable = reading(handled)
    with running(EventLoop(spin=3600.0), readable) as (write, _thread):
        os.write(write, b"x")
        assert handled.wait(5)
        assert not yielded.is_set()  # the first turn: nothing came before it, so it sleeps
        handled.clear()
        os.write(write, b"x")
        assert handled.wait(5)
        assert yielded.wait(5)  # within the window of the first: it polls now


def test_loop_without_a_spin_window_always_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    yields, _yielded = yields_counted(monkeypatch)
    handled = threading.Event()
    readable = reading(handled)
    with running(EventLoop(spin=0.0), readable) as (write, _thread):
        for _ in range(5):
            handled.clear()
            os.write(write, b"x")
            assert handled.wait(5)
    assert yields[0] == 0
