"""The UDP flow table and a flow's life, over real loopback sockets (no namespace needed)."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from mmproxy import upstream
from mmproxy.config import Endpoint
from mmproxy.logs import ConnectionLog
from mmproxy.udp import FLOW_LIMIT, Counters, DroppedError, Flow, FlowKey, FlowTable


def _udp_socket() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


target = pytest.fixture(_udp_socket, name="target")  # the backend
listener = pytest.fixture(_udp_socket, name="listener")  # mmproxy's listening socket


def make_flow(
    target: socket.socket, listener: socket.socket, sender: tuple[str, int] = ("127.0.0.1", 9)
) -> Flow:
    endpoint = Endpoint(ipaddress.ip_address("127.0.0.1"), target.getsockname()[1])
    conn_up = upstream.open_datagram(None, endpoint, mark=0)
    key: FlowKey = (sender, None, endpoint)
    return Flow(key, conn_up, listener, sender, ConnectionLog(logging.getLogger("t"), 0))


def test_capacity_is_enforced_and_a_key_is_never_added_twice(
    target: socket.socket, listener: socket.socket
) -> None:
    table = FlowTable(capacity=1)
    first = make_flow(target, listener)
    twin = make_flow(target, listener)  # same key
    other = make_flow(target, listener, ("127.0.0.1", 10))
    try:
        assert table.add(first) is None
        assert table.add(twin) is first
        with pytest.raises(DroppedError) as caught:
            table.add(other)
        assert caught.value.reason == FLOW_LIMIT
        assert len(table) == 1
    finally:
        for flow in (first, twin, other):
            flow.release()


def test_send_reaches_the_target_until_the_flow_expires(
    target: socket.socket, listener: socket.socket
) -> None:
    table = FlowTable(capacity=8)
    flow = make_flow(target, listener)
    table.add(flow)
    table.set_latest(flow.sender, flow)
    assert flow.send(memoryview(b"ping"))
    assert target.recv(10) == b"ping"
    assert not table.expire(flow, close_after=60), "a busy flow is not expired"
    time.sleep(0.05)
    assert table.expire(flow, close_after=0.01)
    assert table.get(flow.key) is None
    assert table.latest(flow.sender) is None
    assert not flow.send(memoryview(b"late")), "a closed flow refuses to send"
    assert not flow.touch()
    flow.release()
    assert flow.sock.fileno() == -1


def test_sends_racing_expiry_never_touch_a_closed_socket(
    target: socket.socket, listener: socket.socket
) -> None:
    """Many sends while the flow expires: each is either delivered or refused, never an error."""
    table = FlowTable(capacity=8)
    flow = make_flow(target, listener)
    table.add(flow)
    results: list[bool] = []
    stop = threading.Event()

    def sender() -> None:
        while not stop.is_set() and len(results) < 100_000:
            results.append(flow.send(memoryview(b"x")))

    thread = threading.Thread(target=sender)
    thread.start()
    time.sleep(0.02)
    deadline = time.monotonic() + 5
    while not table.expire(flow, close_after=0.0) and time.monotonic() < deadline:
        pass
    flow.release()
    time.sleep(0.02)
    stop.set()
    thread.join(5)
    assert results[0] is True
    assert results[-1] is False
    first_refusal = results.index(False)
    assert all(result is False for result in results[first_refusal:])


def test_counters_add_up_across_threads() -> None:
    counters = Counters()

    def work() -> None:
        for _ in range(10_000):
            counters.add("received")
            counters.add("bytes", 3)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counters.snapshot() == {"received": 40_000, "bytes": 120_000}
