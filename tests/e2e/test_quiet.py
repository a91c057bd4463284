"""Quiet relays give their threads back, end to end.

A relay direction that has moved nothing for the grace (0.25 s) parks its source socket in the
parking lot and its thread goes back to the pool; it resumes on the pool when the socket has
something.  These tests judge what the two ends saw (every byte, in order, half-closes), what
the daemon says (``/proc/<pid>/task/*/syscall``: which threads are blocked reading a
connection; the metrics; the log lines) and how it stops.
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import threading
import time

from daemon_runner import Daemon, StartDaemon
from netns import Backend, BackendConnection, ClientAddresses, Deadline, Net, recv_to_eof
from test_metrics_scrape import Samples, metrics_address, scrape_until, value
from test_reliability import connect, figure, is_msg, v1_header

GRACE = 0.25  # mmproxy.tcp.QUIET_GRACE
# The system calls a relay direction blocks in while it waits for its source on a thread.
READ_CALLS = {
    "x86_64": {"45", "275"},  # recvfrom, splice
    "aarch64": {"207", "76"},
}[platform.machine()]


def reading_threads(daemon: Daemon) -> int:
    """The daemon's threads blocked reading a connection (a relay direction holding a thread)."""
    task = f"/proc/{daemon.proc.pid}/task"
    count = 0
    for tid in os.listdir(task):
        try:
            with open(f"{task}/{tid}/syscall") as syscall:
                number = syscall.read().split(maxsplit=1)[0]
        except (OSError, IndexError):
            continue  # the thread ended meanwhile
        count += number in READ_CALLS
    return count


def wait_reading_threads(daemon: Daemon, expected: int, timeout: float = 15.0) -> int:
    deadline = Deadline(timeout)
    count = reading_threads(daemon)
    while count != expected and not deadline.expired():
        time.sleep(0.05)
        count = reading_threads(daemon)
    return count


def request(sock: socket.socket, message: bytes) -> None:
    """Send ``message`` to the echoing backend and check the echo, in order and whole."""
    sock.settimeout(10)
    sock.sendall(message)
    got = bytearray()
    while len(got) < len(message):
        chunk = sock.recv(len(message) - len(got))
        assert chunk, f"closed after {len(got)} bytes"
        got += chunk
    assert bytes(got) == message


def gauges(samples: Samples) -> tuple[float | None, float | None]:
    return (
        value(samples, "mmproxy_connections_active"),
        value(samples, "mmproxy_connections_parked"),
    )


def test_quiet_connections_hold_no_thread_and_resume_in_order(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """50 connections make a request each, then go quiet: after the grace none holds a thread
    (both gauges say 50), and each resumes with its bytes in order, several times over; at the
    end the byte counters are exact."""
    daemon = mmproxy("--metrics", "127.0.0.1:0", verbose=1)
    address = metrics_address(daemon)
    socks = [connect(net, daemon) for _ in range(50)]
    try:
        for number, sock in enumerate(socks):
            sock.sendall(v1_header(addresses.v4()))
            request(sock, b"hello %d\n" % number)
        started = time.monotonic()
        assert wait_reading_threads(daemon, 0) == 0
        parked_after = time.monotonic() - started
        samples = scrape_until(net, address, lambda s: gauges(s) == (50, 50))
        assert gauges(samples) == (50, 50)
        for round_ in range(3):
            for number, sock in enumerate(socks):
                request(sock, b"%d:%d " % (round_, number) * (1 + 100 * number))
            assert wait_reading_threads(daemon, 0) == 0
        up = sum(len(b"hello %d\n" % n) for n in range(50)) + sum(
            len(b"%d:%d " % (r, n) * (1 + 100 * n)) for r in range(3) for n in range(50)
        )
    finally:
        for sock in socks:
            sock.close()
    samples = scrape_until(net, address, lambda s: gauges(s) == (0, 0))
    assert gauges(samples) == (0, 0)
    assert value(samples, "mmproxy_relayed_bytes_total", direction="to_target") == up
    assert value(samples, "mmproxy_relayed_bytes_total", direction="to_client") == up
    figure("quiet connections: last relay thread gone after", f"{parked_after:.2f}s")


def stream_until_told(conn: BackendConnection) -> None:
    """Send a numbered line every 20 ms until the client says ``stop``, then echo ``stop``."""
    number = 0
    while True:
        conn.sock.settimeout(0.02)  # send() sets its own
        try:
            data = conn.sock.recv(16)
        except TimeoutError:
            conn.send(b"%08d\n" % number)
            number += 1
            continue
        assert data == b"stop", data
        conn.send(b"stop")
        conn.shut_wr()
        return


def test_a_stream_of_small_messages_holds_no_thread(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """The backend streams small lines; the client is silent: the parking lot moves the lines
    itself, so neither direction holds a thread, and every line arrives in order; the
    client's later word goes through too."""
    backend4.handler = stream_until_told
    daemon = mmproxy(verbose=2)
    with connect(net, daemon) as sock:
        sock.sendall(v1_header(addresses.v4()))
        sock.settimeout(10)
        received = bytearray()
        deadline = Deadline(15)
        while received.count(b"\n") < 100 and not deadline.expired():  # 2 s of lines
            received += sock.recv(4096)
        seen = []
        for _ in range(40):
            seen.append(reading_threads(daemon))
            received += sock.recv(4096)
        assert max(seen) == 0, f"no direction holds a thread: {seen}"
        sock.sendall(b"stop")
        received += recv_to_eof(sock, Deadline(10))
    assert received.endswith(b"stop")
    lines = bytes(received[:-4]).split(b"\n")
    assert lines[-1] == b""
    assert [int(line) for line in lines[:-1]] == list(range(len(lines) - 1))
    (closed,) = daemon.wait_for(is_msg("connection closing"), timeout=10)
    assert closed["bytesToTarget"] == 4
    assert closed["bytesToClient"] == len(received)


def test_half_close_of_a_parked_connection_is_relayed(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """A parked connection's client half-closes: the backend sees the end, its reply (it
    echoes, then half-closes) comes back whole."""
    daemon = mmproxy(verbose=2)
    with connect(net, daemon) as sock:
        sock.sendall(v1_header(addresses.v4()))
        request(sock, b"first")
        assert wait_reading_threads(daemon, 0) == 0
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)
        assert recv_to_eof(sock, Deadline(10)) == b"last words"
    (closed,) = daemon.wait_for(is_msg("connection closing"), timeout=10)
    assert (closed["bytesToTarget"], closed["bytesToClient"]) == (15, 15)
    assert backend4.wait_done(timeout=5)[0].eof


def test_idle_timeout_counts_from_the_last_byte_across_parking(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """--idle-timeout 3: a connection quiet for longer than the grace, but less than the
    timeout, is parked and still open; quiet for the whole timeout it is closed, about 3 s
    after its last byte, as idle, with its byte counts."""
    daemon = mmproxy("--idle-timeout", "3", verbose=1)
    with connect(net, daemon) as sock:
        sock.sendall(v1_header(addresses.v4()))
        request(sock, b"one")
        assert wait_reading_threads(daemon, 0) == 0
        time.sleep(1.5)  # parked, 1.5 s or more into the timeout: not ended
        request(sock, b"two")
        last = time.monotonic()
        sock.settimeout(10)
        assert sock.recv(1) == b""
        elapsed = time.monotonic() - last
    assert 2.5 <= elapsed < 6, elapsed
    (line,) = daemon.wait_for(lambda line: line.get("reason") == "idle_timeout", timeout=10)
    assert (line["bytesToTarget"], line["bytesToClient"]) == (6, 6)
    figure("idle timeout 3 s across parking: closed after the last byte", f"{elapsed:.2f}s")


def say_bye(sock: socket.socket) -> None:
    request(sock, b"bye")
    sock.shutdown(socket.SHUT_WR)


def test_sigterm_drains_parked_connections_and_wakes_the_rest(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """SIGTERM with 20 parked connections: they count as live; the 10 that finish during the
    drain are relayed to the end, the 10 that stay quiet are woken and closed when the drain
    ends, each logged once, and the daemon exits 0 without waiting out the abort grace."""
    drain = 3.0
    daemon = mmproxy(drain_timeout=drain, verbose=2)
    socks = [connect(net, daemon) for _ in range(20)]
    try:
        for sock in socks:
            sock.sendall(v1_header(addresses.v4()))
            request(sock, b"hi")
        assert wait_reading_threads(daemon, 0) == 0
        daemon.signal(signal.SIGTERM)
        signalled = time.monotonic()
        (stopping,) = daemon.wait_for(
            is_msg("stopping: no longer accepting, draining live connections")
        )
        assert stopping["liveConnections"] == 20
        finishers = [threading.Thread(target=say_bye, args=(sock,)) for sock in socks[:10]]
        for thread in finishers:
            thread.start()
        for thread in finishers:
            thread.join(10)
        for sock in socks:
            assert recv_to_eof(sock, Deadline(drain + 10)) == b""
        code = daemon.wait(drain + 5)
        took = time.monotonic() - signalled
    finally:
        for sock in socks:
            sock.close()
    assert code == 0, daemon.describe()
    assert took < drain + 2.5, took
    closed = daemon.wait_for(is_msg("connection closing"), 20, timeout=5)
    assert sorted(line["bytesToTarget"] for line in closed) == [2] * 10 + [5] * 10
    assert daemon.wait_for(lambda line: "drain ended" in str(line.get("msg")), timeout=5)
