"""The upstream connect without root: started without blocking, finished with a deadline.

``connect_plain`` is the unprivileged twin of ``connect_spoofed`` (no ``IP_TRANSPARENT``);
both start the connect the same way and hand back a :class:`~mmproxy.upstream.Connecting`.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import time
from collections.abc import Iterator

import pytest

from mmproxy.config import Endpoint, sockaddr
from mmproxy.upstream import Connecting, connect_plain

WAIT = 10.0  # seconds an awaited connect gets on a loaded machine


def endpoint(sock: socket.socket) -> Endpoint:
    host, port = sock.getsockname()[:2]
    return Endpoint(ipaddress.ip_address(host), port)


@pytest.fixture
def backend() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server


def test_a_local_backend_is_connected_when_connect_returns(backend: socket.socket) -> None:
    connecting = connect_plain(endpoint(backend), mark=0, timeout=WAIT)
    assert connecting.done(), "a loopback handshake is over before connect() returns"
    up = connecting.finish()
    try:
        assert up.sock.getblocking(), "splice needs a blocking socket"
        assert up.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        accepted, peer = backend.accept()
        with accepted:
            assert peer[:2] == up.source
            up.sock.sendall(b"hello")
            accepted.settimeout(WAIT)
            assert accepted.recv(5) == b"hello"
    finally:
        up.sock.close()


def test_a_refused_connect_says_so_and_closes_its_socket() -> None:
    with socket.create_server(("127.0.0.1", 0)) as gone:
        target = endpoint(gone)  # closed below: nothing listens on this port any more
    connecting = connect_plain(target, mark=0, timeout=WAIT)
    with pytest.raises(ConnectionRefusedError, match=r"^\[Errno \d+\] connect 127\.0\.0\.1:\d+: "):
        connecting.finish()
    assert connecting.sock.fileno() == -1, "the socket is closed with the failure"


def full_backlog() -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full, so the next SYN is dropped and its connect
    stays under way, with the connections that filled it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    filler = socket.create_connection(server.getsockname(), timeout=WAIT)
    return server, [filler]


def test_a_connect_still_under_way_is_not_done_and_times_out() -> None:
    server, fillers = full_backlog()
    try:
        connecting = connect_plain(endpoint(server), mark=0, timeout=0.3)
        assert not connecting.done()
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="timed out"):
            connecting.finish()
        assert time.monotonic() - started >= 0.2, "finish() waited for the deadline"
        assert connecting.sock.fileno() == -1
    finally:
        server.close()
        for sock in fillers:
            sock.close()


def test_a_connect_that_completes_later_is_waited_for() -> None:
    server, fillers = full_backlog()
    try:
        connecting = connect_plain(endpoint(server), mark=0, timeout=WAIT)
        assert isinstance(connecting, Connecting)
        assert not connecting.done()
        accepted, _ = server.accept()  # room in the queue: the SYN's retransmission gets in
        accepted.close()
        up = connecting.finish()
        try:
            poller = select.poll()
            poller.register(up.sock, select.POLLOUT)
            assert poller.poll(0), "connected"
        finally:
            up.sock.close()
    finally:
        server.close()
        for sock in fillers:
            sock.close()


def test_the_connect_starts_on_a_non_blocking_socket(backend: socket.socket) -> None:
    connecting = connect_plain(endpoint(backend), mark=0, timeout=WAIT)
    try:
        assert not connecting.sock.getblocking(), "made so by socket(), not by an ioctl later"
    finally:
        connecting.sock.close()


def test_finish_after_done_does_not_poll_again(
    backend: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    connecting = connect_plain(endpoint(backend), mark=0, timeout=WAIT)
    assert connecting.done()

    def no_poll() -> None:
        raise AssertionError("done() already saw the connect complete")

    monkeypatch.setattr(select, "poll", no_poll)
    up = connecting.finish()
    monkeypatch.undo()
    try:
        assert up.sock.getblocking()
        accepted, peer = backend.accept()
        accepted.close()
        assert peer[:2] == up.source, "the source is asked of the socket when wanted"
    finally:
        up.sock.close()


def test_a_refused_connect_seen_by_done_still_fails_in_finish() -> None:
    with socket.create_server(("127.0.0.1", 0)) as gone:
        target = endpoint(gone)
    connecting = connect_plain(target, mark=0, timeout=WAIT)
    poller = select.poll()
    poller.register(connecting.sock, select.POLLOUT)
    assert poller.poll(int(WAIT * 1000)), "a refusal on loopback comes back at once"
    assert connecting.done()
    assert connecting.events & (select.POLLERR | select.POLLHUP), "a failed connect shows it"
    with pytest.raises(ConnectionRefusedError, match=r"^\[Errno \d+\] connect 127\.0\.0\.1:\d+: "):
        connecting.finish()
    assert connecting.sock.fileno() == -1


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("192.0.2.7", 40123, ("192.0.2.7", 40123)),
        ("0.0.0.0", 0, ("0.0.0.0", 0)),
        ("255.255.255.255", 1, ("255.255.255.255", 1)),
        ("2001:db8::7", 40123, ("2001:db8::7", 40123, 0, 0)),
    ],
)
def test_the_bind_address_is_the_one_str_would_give(
    host: str, port: int, expected: tuple[object, ...]
) -> None:
    assert sockaddr(ipaddress.ip_address(host), port) == expected
