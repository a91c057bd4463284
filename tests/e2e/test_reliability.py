"""Reliability end to end: hostile peers, faulty backends, load, leaks, reload, stop, soak.

Each test drives the real daemon in the session's namespace (or one of its own) and judges what
the two ends and ``/proc/<pid>`` observe: bytes verified by sha256, connections closed or
served, descriptors, threads and resident memory.  Every loop is bounded in count and time.

The full sizes run in CI where they fit the time budget; the ones that do not run a scaled
version here and the full one under ``-m slow`` (CONTRIBUTING.md, "Reliability").  Figures
worth quoting are printed (``pytest -s``) as ``FIGURE name: value``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemon_runner import (
    Daemon,
    LogLine,
    StartDaemon,
    each_relay,  # noqa: F401 - every daemon here runs once per --relay
)
from netns import (
    Backend,
    BackendConnection,
    ClientAddresses,
    Deadline,
    Net,
    NetNamespace,
    Peer,
    exchange,
    namespace,
    recv_to_eof,
    sink_then_digest,
    wait_accept_queue,
    wait_closed,
)

MIB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------- helpers


def v1_header(source: Peer, port: int = 443) -> bytes:
    family = "TCP6" if ":" in source[0] else "TCP4"
    destination = "2001:db8::443" if family == "TCP6" else "203.0.113.1"
    return f"PROXY {family} {source[0]} {destination} {source[1]} {port}\r\n".encode()


def connect(net: Net, daemon: Daemon, timeout: float = 10.0) -> socket.socket:
    return net.sockets.connect((daemon.host, daemon.port), timeout)


@dataclass(frozen=True)
class Usage:
    """What the daemon holds, from /proc/<pid>."""

    fds: int
    threads: int
    rss: int  # bytes

    @classmethod
    def of(cls, daemon: Daemon) -> Usage:
        pid = daemon.proc.pid  # ``ip netns exec`` execs: this is mmproxy's own pid
        with open(f"/proc/{pid}/statm") as statm:
            rss_pages = int(statm.read().split()[1])
        return cls(
            fds=len(os.listdir(f"/proc/{pid}/fd")),
            threads=len(os.listdir(f"/proc/{pid}/task")),
            rss=rss_pages * PAGE,
        )


def cpu_seconds(daemon: Daemon) -> float:
    """User plus system CPU time the daemon has used so far."""
    with open(f"/proc/{daemon.proc.pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(read: Callable[[], int], at_most: int, timeout: float = 10.0) -> int:
    """Poll ``read()`` until it is at most ``at_most`` (bounded); return the last value."""
    deadline = Deadline(timeout)
    value = read()
    while value > at_most and not deadline.expired():
        time.sleep(0.05)
        value = read()
    return value


# Idle pool workers retire after 5 s (mmproxy.pool): a thread count above the expected level
# must come down well within this, or the threads are stuck, not idle.
THREADS_SETTLE = 40.0


def settled_threads(daemon: Daemon, at_most: int) -> int:
    """The daemon's thread count once it is at most ``at_most``, or after THREADS_SETTLE."""
    return settle(lambda: Usage.of(daemon).threads, at_most, THREADS_SETTLE)


def figure(name: str, value: object) -> None:
    print(f"FIGURE {name}: {value}")


def short_connection(net: Net, daemon: Daemon, source: Peer, deadline: Deadline) -> str | None:
    """One short relayed connection: header, a few bytes, half-close, the echo, close.
    Returns None when the echo came back intact, else what went wrong."""
    port = 0  # the client's, which the daemon logs as remoteAddr
    try:
        with connect(net, daemon, timeout=max(0.1, deadline.remaining())) as sock:
            port = sock.getsockname()[1]
            sock.sendall(v1_header(source) + b"ping")
            sock.shutdown(socket.SHUT_WR)
            echo = recv_to_eof(sock, deadline)
    except OSError as error:
        return f"from port {port}: {type(error).__name__}: {error}"
    return None if echo == b"ping" else f"from port {port}: echo {echo!r}"


def run_short_connections(
    net: Net, daemon: Daemon, count: int, workers: int, seconds: float
) -> list[str]:
    """``count`` short connections from ``workers`` threads (source port 0: any port of a
    documentation address); returns what went wrong, one entry per connection that did not
    come back intact (one that did not run before the deadline counts too).  Bounded by
    ``seconds``."""
    deadline = Deadline(seconds)
    wrong: list[list[str]] = [[] for _ in range(workers)]

    def work(worker: int) -> None:
        for i in range(worker, count, workers):
            if deadline.expired():
                wrong[worker].append(f"connection {i}: not run before the deadline")
                continue
            source = (f"198.51.100.{1 + i % 250}", 0)
            fault = short_connection(net, daemon, source, Deadline(min(10, deadline.remaining())))
            if fault is not None:
                wrong[worker].append(f"connection {i}: {fault}")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(work, w) for w in range(workers)]:
            future.result(timeout=seconds + 30)
    return [fault for faults in wrong for fault in faults]


# ---------------------------------------------------------- 2. slow and silent clients


def test_slow_clients_are_closed_at_the_header_timeout_while_others_are_served(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """500 peers send half a header and stall; all are closed at --header-timeout, while 50
    well-behaved clients, spread over the whole stall, are each served without error."""
    header_timeout = 3.0
    daemon = mmproxy(header_timeout=header_timeout, verbose=0)
    before = Usage.of(daemon)
    slow: list[socket.socket] = []
    opened: list[float] = []
    try:
        for i in range(500):
            sock = connect(net, daemon)
            slow.append(sock)
            opened.append(time.monotonic())
            sock.sendall(b"PROXY TCP4 198.51.100.7 203.0.113.1 400" if i % 2 else b"\r\n\r\n\0")

        mid_stall: list[Usage] = []

        def good(number: int) -> bool:
            if number == 20:  # about 1 s into the stall
                mid_stall.append(Usage.of(daemon))
            source = addresses.v4()
            with connect(net, daemon) as sock:
                sock.sendall(v1_header(source))
                ok = exchange(sock, source[0].encode() * 100, Deadline(20)) == (
                    source[0].encode() * 100
                )
            time.sleep(header_timeout / 12)  # 50 clients in 5 threads: spread over the stall
            return ok

        with ThreadPoolExecutor(max_workers=5) as pool:
            served = list(pool.map(good, range(50)))
        (stalled,) = mid_stall
        assert served.count(True) == 50
        # A stalled header waits in the parking lot, not on a thread (a thread each would be
        # 500 more); how many pool workers the burst of first reads needs depends on the
        # machine's load (58-117 seen), so this is a reported figure, not a bound.

        closed_at = [time.monotonic() + wait_closed(sock, header_timeout + 10) for sock in slow]
    finally:
        for sock in slow:
            sock.close()
    lifetimes = [closed - start for closed, start in zip(closed_at, opened, strict=True)]
    assert min(lifetimes) >= header_timeout * 0.8
    assert max(lifetimes) < header_timeout + 10  # wait_closed would have raised anyway
    assert len(backend4.peers()) == 50  # no slow client ever reached the backend
    figure("500 slow clients: opened in", f"{opened[-1] - opened[0]:.2f}s")
    figure("500 slow clients: daemon during the stall", stalled)
    figure(
        "500 slow clients: shortest/longest life", f"{min(lifetimes):.2f}s/{max(lifetimes):.2f}s"
    )
    assert settle(lambda: Usage.of(daemon).fds, before.fds) == before.fds


# ----------------------------------------------------------- 3. descriptor exhaustion


def hold_relayed(net: Net, daemon: Daemon, source: Peer) -> socket.socket:
    """A connection that is relayed and holds its pipes (data went both ways once)."""
    sock = connect(net, daemon)
    try:
        sock.sendall(v1_header(source) + b"hi")
        sock.settimeout(10)
        assert sock.recv(2) == b"hi"
    except BaseException:
        sock.close()
        raise
    return sock


def refused_promptly(net: Net, daemon: Daemon, source: Peer) -> bool:
    """True when mmproxy closes a new connection at once instead of relaying it."""
    with connect(net, daemon) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(v1_header(source) + b"hi")
        sock.settimeout(5)
        try:
            return sock.recv(2) == b""
        except ConnectionResetError:
            return True


def test_ulimit_256_pauses_accepting_at_the_cap_and_recovers(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """Under ``ulimit -n 256`` mmproxy takes connections up to the cap its descriptors allow,
    then stops accepting: 50 more wait in the kernel's backlog (one warning, not one per
    connection); when the held ones close, every waiting one is relayed."""
    daemon = mmproxy(nofile=256, verbose=0)
    (ready,) = daemon.wait_for(lambda line: line.get("msg") == "ready")
    assert ready["descriptorLimit"] == 256
    cap = int(ready["maxConnections"])
    held: list[socket.socket] = []
    waiting: list[socket.socket] = []
    try:
        held.extend(hold_relayed(net, daemon, addresses.v4()) for _ in range(cap))
        peak = Usage.of(daemon)
        assert peak.fds <= 256
        for _ in range(50):
            sock = connect(net, daemon)
            waiting.append(sock)
            sock.sendall(v1_header(addresses.v4()) + b"hi")
        assert wait_accept_queue(net.ns, daemon.port, 50) == 50
        warnings = daemon.wait_for(lambda line: "connection limit" in str(line.get("msg")))
        assert len(warnings) == 1, daemon.describe()
        assert Usage.of(daemon).fds <= 256
        for sock in held:
            sock.close()
        held.clear()
        for sock in waiting:
            sock.settimeout(20)
            assert sock.recv(2) == b"hi"
        assert len(backend4.peers()) == cap + 50
    finally:
        for sock in held + waiting:
            sock.close()
    figure("ulimit -n 256: connection cap", cap)
    figure("ulimit -n 256: descriptors at the cap", peak.fds)


def prlimit_nofile(pid: int, soft: int | None) -> None:
    """Set another process's soft descriptor limit (None: back up to its hard limit)."""
    if soft is None:
        with open(f"/proc/{pid}/limits") as limits:
            line = next(line for line in limits if line.startswith("Max open files"))
        soft = int(line.split()[4])  # the hard limit's column
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={soft}:"], check=True, timeout=10)


def test_running_out_of_descriptors_at_accept_is_logged_and_survived(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """The limit lowered under a running daemon (below what its cap assumed): accept() fails
    with EMFILE.  The lot's thread logs it (rate-limited), pauses and retries without dying;
    the connections waiting in the backlog are served once descriptors are available again,
    and so are the ones after it."""
    daemon = mmproxy(verbose=1)
    ready = daemon.wait_for(lambda line: line.get("msg") == "ready")
    assert ready, daemon.describe()
    base = Usage.of(daemon).fds
    held = [connect(net, daemon) for _ in range(3)]
    waiting: socket.socket | None = None
    first: socket.socket | None = None
    try:
        for sock in held:  # idle relayed connections: 2 descriptors each
            sock.sendall(v1_header(addresses.v4()))
        backend4.wait_connections(3)
        deadline = Deadline(10)
        while Usage.of(daemon).fds < base + 6 and not deadline.expired():
            time.sleep(0.02)  # the last upstream socket is made just after the backend saw it
        assert Usage.of(daemon).fds == base + 6
        # Descriptors 0-3 are stdio and the listener: with the soft limit at 4, no new
        # descriptor fits (those above it stay valid), so accept() fails with EMFILE.
        prlimit_nofile(daemon.proc.pid, 4)
        first = connect(net, daemon)
        first_source = addresses.v4()
        first.sendall(v1_header(first_source) + b"first")
        waiting = connect(net, daemon)  # the kernel completes the handshake; accept() cannot
        source = addresses.v4()
        waiting.sendall(v1_header(source) + b"queued")
        warned = daemon.wait_for(lambda line: line.get("msg") == "failed to accept new connection")
        assert warned, daemon.describe()
        assert "EMFILE" in warned[0]["error"]
        assert warned[0]["level"] == "WARN"
        time.sleep(0.5)  # several retries, all failing
        assert source not in backend4.peers()
        assert daemon.proc.poll() is None
        # Descriptors come back (the limit, here: closing connections could race the retry,
        # which then meets EMFILE on the upstream socket instead and refuses the client).
        prlimit_nofile(daemon.proc.pid, None)
        assert exchange(waiting, b" and served", Deadline(10)) == b"queued and served"
        assert source in backend4.peers()
        # The first waited in the backlog too (nothing blocks in accept() holding a number
        # for it), and is served now.
        assert exchange(first, b" too", Deadline(10)) == b"first too"
        assert first_source in backend4.peers()
        for sock in held:  # the connections held all along still relay
            sock.settimeout(10)
            sock.sendall(b"still")
            assert sock.recv(5) == b"still"
        after = addresses.v4()
        with connect(net, daemon) as sock:
            sock.sendall(v1_header(after))
            assert exchange(sock, b"next", Deadline(10)) == b"next"
    finally:
        for sock in held:
            sock.close()
        if waiting is not None:
            waiting.close()
        if first is not None:
            first.close()
    assert not daemon.wait_for(lambda line: "accepting a connection failed" in str(line), 1, 0.1)


# ---------------------------------------------------------------- 4. backend faults


def test_backend_not_listening_closes_each_client_promptly_and_leaks_nothing(
    net: Net, mmproxy: StartDaemon, addresses: ClientAddresses, closed_port: int
) -> None:
    daemon = mmproxy(target4=f"127.0.0.1:{closed_port}", verbose=0)
    before = Usage.of(daemon)
    slowest = 0.0
    for _ in range(100):
        with connect(net, daemon) as sock:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(v1_header(addresses.v4()) + b"anyone?")
            slowest = max(slowest, wait_closed(sock, 10))
    assert slowest < 5
    assert settle(lambda: Usage.of(daemon).fds, before.fds) == before.fds
    # One connection at a time: the pool needs one worker, reused, never a thread each.
    assert settled_threads(daemon, before.threads + 6) <= before.threads + 6
    figure("backend not listening: slowest close of 100", f"{slowest * 1000:.1f}ms")


def test_backend_reset_mid_transfer_ends_promptly_without_leaks(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """20 transfers at once, each reset by the backend after its first 256 KiB while both sides
    are sending: every client sees the reset or EOF within seconds; descriptors and threads
    come back (after a warm-up round, so the pool's idle workers are already counted)."""

    def reset_after(conn: BackendConnection) -> None:
        while conn.received < 256 * 1024:
            conn.recv()
            conn.send(b"r" * 4096)
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")

    backend4.handler = reset_after
    daemon = mmproxy(verbose=0)

    def transfer(_: int) -> float:
        start = time.monotonic()
        with connect(net, daemon) as sock:
            sock.sendall(v1_header(addresses.v4()))
            try:
                exchange(sock, os.urandom(8 * MIB), Deadline(15))
            except OSError as error:  # the reset, seen by send, recv or the final shutdown
                if error.errno not in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
                    raise
            except AssertionError as unfinished:  # EOF before everything was sent is fine
                if "EOF after sending" not in str(unfinished):
                    raise
        return time.monotonic() - start

    def round_of(count: int) -> list[float]:
        with ThreadPoolExecutor(max_workers=count) as pool:
            return list(pool.map(transfer, range(count)))

    idle_fds = Usage.of(daemon).fds
    round_of(20)  # warm-up: the pool grows to what 20 connections need
    settle(lambda: Usage.of(daemon).fds, idle_fds)  # a client may see its end before the close
    before = Usage.of(daemon)
    for _ in range(3):
        times = round_of(20)
        assert max(times) < 10
    after_fds = settle(lambda: Usage.of(daemon).fds, before.fds)
    assert after_fds == before.fds
    assert settled_threads(daemon, before.threads + 4) <= before.threads + 4
    figure("backend reset: slowest of 60 transfers to end", f"{max(times):.2f}s")


def test_backend_that_never_reads_gets_backpressure_not_buffering(
    net: Net,
    mmproxy: StartDaemon,
    backend4: Backend,
    addresses: ClientAddresses,
    relay: str,
    request: pytest.FixtureRequest,
) -> None:
    """A client pushing at a backend that does not read is stopped by TCP flow control: mmproxy
    holds at most a pipe's worth, its memory stays flat, and when the backend reads at last
    every byte arrives, in order."""
    if relay == "sockmap":
        # Known and measured on 6.18: the verdict takes every skb off the client's receive
        # queue and queues it for the backend socket without a bound, so the client's window
        # never closes (256 MiB went into kernel memory).  The pair is handed over before the
        # push (below), so this fails every time; strict, so a fix shows up here as XPASS.
        request.applymarker(
            pytest.mark.xfail(strict=True, reason="sockmap's redirect queue has no bound")
        )
    go = threading.Event()

    def late_reader(conn: BackendConnection) -> None:
        go.wait(30)
        conn.recv_to_eof()
        conn.send(conn.digest.digest())

    backend4.handler = late_reader
    daemon = mmproxy(verbose=2)
    rss_before = Usage.of(daemon).rss
    sent = hashlib.sha256()
    total = 0
    with connect(net, daemon) as sock:
        sock.sendall(v1_header(addresses.v4()))
        if relay == "sockmap":  # in the kernel before the push (else it is drained to splice)
            first = b"first"
            sock.sendall(first)
            sent.update(first)
            total += len(first)
            assert daemon.wait_for(lambda line: line.get("msg") == "relayed in the kernel")
        sock.settimeout(0.5)
        deadline = Deadline(4)
        block = os.urandom(MIB)
        stalled = 0
        while not deadline.expired() and total < 256 * MIB:
            try:
                n = sock.send(block)
            except TimeoutError:
                stalled += 1
                if stalled >= 3:
                    break  # blocked for 1.5 s: the window is shut
                continue
            sent.update(block[:n])
            total += n
            block = block[n:] + block[:n]  # keep the stream a rotating, verifiable sequence
        rss_blocked = Usage.of(daemon).rss
        assert stalled >= 3, f"the client could write {total} bytes and never blocked"
        go.set()
        sock.shutdown(socket.SHUT_WR)
        assert recv_to_eof(sock, Deadline(30)) == sent.digest()
    (conn,) = backend4.wait_done()
    assert conn.received == total
    growth = rss_blocked - rss_before
    assert total < 64 * MIB  # kernel buffers plus one pipe, not an unbounded queue
    assert growth < 16 * MIB, f"RSS grew by {growth} bytes while blocked"
    figure(
        "never-reading backend: bytes accepted before the client blocked", f"{total / MIB:.1f} MiB"
    )
    figure("never-reading backend: daemon RSS growth while blocked", f"{growth / 1024:.0f} KiB")


# ------------------------------------------------------------------------ 5. leak check

LEAK_CONNECTIONS = 20_000
LEAK_CONNECTIONS_CI = int(os.environ.get("MMPROXY_LEAK_CONNECTIONS", LEAK_CONNECTIONS))


@pytest.mark.timeout(300)  # bounded by its own deadlines; 45 s here, more on a busy machine
def test_no_leak_after_many_short_connections(
    net: Net, mmproxy: StartDaemon, backend4: Backend
) -> None:
    """20,000 short connections (8 client threads): afterwards the daemon's descriptors are
    exactly what they were, threads within the pool's idle workers, RSS within 8 MiB.

    "Before" is measured after a warm-up of 1,000 connections, so that what stays by design
    (the pool's idle workers, the allocator's arenas, the allow-list cache) is in it."""
    daemon = mmproxy(verbose=1)  # -v 1: quiet, but a connection that fails says why
    workers = 8
    idle_fds = Usage.of(daemon).fds
    assert run_short_connections(net, daemon, 1000, workers, 60) == []
    # A client has its answer and end before the daemon closes: let the last ones close.
    settle(lambda: Usage.of(daemon).fds, idle_fds)
    before = Usage.of(daemon)
    start = time.monotonic()
    count = LEAK_CONNECTIONS_CI
    wrong = run_short_connections(net, daemon, count, workers, 150)
    if wrong:
        complaints = daemon.wait_for(lambda line: line.get("level") != "INFO", 5, 1)
        pytest.fail(f"{len(wrong)} of {count} went wrong: {wrong[:5]}; daemon: {complaints[:5]}")
    elapsed = time.monotonic() - start
    fds = settle(lambda: Usage.of(daemon).fds, before.fds)
    # RSS is compared once the burst's extra pool workers have retired: on free-threaded
    # CPython each live thread holds allocator pages of its own, which are not a leak.
    threads = settled_threads(daemon, before.threads)
    after = Usage.of(daemon)
    assert fds == before.fds
    assert threads <= before.threads + 2 * workers
    assert after.rss - before.rss < 8 * MIB, (before, after)
    assert len(backend4.peers()) == count + 1000
    figure(f"{count} short connections: took", f"{elapsed:.1f}s")
    figure("leak check: before", before)
    figure("leak check: after", after)


# ------------------------------------------------------------------------- 6. reload


def is_msg(text: str) -> Callable[[LogLine], bool]:
    return lambda line: line.get("msg") == text


def test_sighup_reloads_the_allowed_subnets_and_spares_open_connections(
    net: Net,
    mmproxy: StartDaemon,
    backend4: Backend,
    addresses: ClientAddresses,
    tmp_path: Path,
) -> None:
    """SIGHUP swaps in the re-read file for new connections; a connection already open from a
    subnet the reload removed keeps relaying; a file with an error keeps the old list and is
    logged with ``file:line: reason``; fixing the file and reloading again lets peers back in."""
    subnets = tmp_path / "allowed-subnets.txt"
    subnets.write_text("127.0.0.0/8\n")
    daemon = mmproxy("-allowed-subnets", str(subnets), verbose=1)
    with connect(net, daemon) as open_before:
        open_before.sendall(v1_header(addresses.v4()) + b"before")
        open_before.settimeout(10)
        assert open_before.recv(6) == b"before"

        subnets.write_text("# 127.0.0.0/8 removed\n192.0.2.0/24\n2001:db8::/32\n")
        daemon.hup()
        (reloaded,) = daemon.wait_for(is_msg("allowed subnets reloaded"))
        assert reloaded["count"] == 2
        assert reloaded["path"] == str(subnets)
        assert refused_promptly(net, daemon, addresses.v4())
        assert daemon.wait_for(lambda line: line.get("reason") == "not_allowed")

        subnets.write_text("127.0.0.0/8\n127.0.0.1/33\n")
        daemon.hup()
        (kept,) = daemon.wait_for(is_msg("allowed subnets not reloaded: keeping the previous list"))
        assert kept["level"] == "WARN"
        assert kept["error"].startswith(f"{subnets}:2: ")
        assert "out of range" in kept["error"]
        assert refused_promptly(net, daemon, addresses.v4())  # still the 192.0.2.0/24 list

        open_before.sendall(b"still relayed")  # the open connection never noticed
        assert open_before.recv(13) == b"still relayed"

        subnets.write_text("127.0.0.1\n")
        daemon.hup()
        assert len(daemon.wait_for(is_msg("allowed subnets reloaded"), count=2)) == 2
        source = addresses.v4()
        with connect(net, daemon) as sock:
            sock.sendall(v1_header(source))
            assert exchange(sock, b"welcome back", Deadline(10)) == b"welcome back"
        assert source in backend4.peers()
        open_before.shutdown(socket.SHUT_WR)
        assert recv_to_eof(open_before, Deadline(10)) == b""
    assert len(backend4.peers()) == 2


def test_sighup_without_allowed_subnets_has_nothing_to_reload(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    daemon = mmproxy()
    daemon.hup()
    (line,) = daemon.wait_for(lambda line: "nothing to reload" in str(line.get("msg")))
    assert line["level"] == "INFO"
    with connect(net, daemon) as sock:
        sock.sendall(v1_header(addresses.v4()))
        assert exchange(sock, b"still serving", Deadline(10)) == b"still serving"


# ------------------------------------------------------------- 7. graceful stop under load


def test_sigterm_during_100_transfers_completes_them_all(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """SIGTERM while 100 transfers (1 MiB up, each paced over about 1 s) are under way: every
    one completes within the drain timeout, its sha256 verified at both ends; exit code 0."""
    drain = 30.0
    daemon = mmproxy(drain_timeout=drain, verbose=1)
    backend4.handler = sink_then_digest
    chunk, chunks = 64 * 1024, 16
    started = threading.Barrier(101, timeout=60)

    def upload(seed: int) -> bool:
        payload = random.Random(seed).randbytes(chunk * chunks)
        with connect(net, daemon, timeout=30) as sock:
            sock.sendall(v1_header(addresses.v4()) + payload[:chunk])
            started.wait()
            for start in range(chunk, len(payload), chunk):
                time.sleep(0.06)
                sock.sendall(payload[start : start + chunk])
            sock.shutdown(socket.SHUT_WR)
            return recv_to_eof(sock, Deadline(drain + 10)) == hashlib.sha256(payload).digest()

    with ThreadPoolExecutor(max_workers=100) as pool:
        futures = [pool.submit(upload, seed) for seed in range(100)]
        started.wait()
        backend4.wait_connections(100)
        daemon.signal(signal.SIGTERM)
        signalled = time.monotonic()
        results = [future.result(timeout=drain + 30) for future in futures]
    assert results.count(True) == 100
    code = daemon.wait(drain + 5)
    took = time.monotonic() - signalled
    assert code == 0, daemon.describe()
    assert took < drain
    conns = backend4.wait_done()
    assert len(conns) == 100
    assert all(conn.error is None and conn.received == chunk * chunks for conn in conns)
    (stopping,) = daemon.wait_for(
        is_msg("stopping: no longer accepting, draining live connections")
    )
    assert stopping["liveConnections"] == 100
    assert not daemon.wait_for(lambda line: "drain ended" in str(line.get("msg")), 1, 0.1)
    figure("SIGTERM during 100 transfers: exit after the signal", f"{took:.2f}s")


def open_echoed(
    net: Net, daemon: Daemon, addresses: ClientAddresses, count: int, into: list[socket.socket]
) -> None:
    """Open ``count`` connections into ``into``, each of which got one byte echoed."""
    for _ in range(count):
        sock = connect(net, daemon)
        into.append(sock)
        sock.sendall(v1_header(addresses.v4()) + b"x")
        sock.settimeout(10)
        assert sock.recv(1) == b"x"


def test_second_sigterm_stops_at_once(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """With a 60 s drain and 20 connections that will not finish, the first SIGTERM waits; the
    second ends the wait: every client is closed and mmproxy exits 0 within seconds."""
    daemon = mmproxy(drain_timeout=60, verbose=0)
    clients: list[socket.socket] = []
    try:
        open_echoed(net, daemon, addresses, 20, clients)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(1.0) is None  # draining: it waits for the 20
        daemon.signal(signal.SIGTERM)
        second = time.monotonic()
        assert daemon.wait(10) == 0, daemon.describe()
        took = time.monotonic() - second
        for sock in clients:
            wait_closed(sock, 5)
    finally:
        for sock in clients:
            sock.close()
    assert daemon.wait_for(is_msg("second stop signal: not waiting any longer"))
    figure("second SIGTERM with 20 open connections: exit after", f"{took:.2f}s")


# -------------------------------------------------------------------------------- 8. soak

SOAK_CONNECTIONS = 1000  # the size, in every run
SOAK_CONNECTIONS_LONG = 5000  # pytest -m slow
SOAK_MAX_SIZE = 4 * MIB
SOAK_WAVE = 25


@dataclass(frozen=True)
class SoakJob:
    """One soak connection: sizes, who half-closes first, and the seed of both payloads."""

    number: int
    source: Peer
    up: int
    down: int
    pattern: str  # "client_first", "backend_first" or "both"

    def payload(self, direction: str) -> bytes:
        size = self.up if direction == "up" else self.down
        return random.Random(f"{self.number}-{direction}").randbytes(size)


def soak_backend(jobs: dict[Peer, SoakJob]) -> Callable[[BackendConnection], None]:
    """The backend side of every pattern: it looks the job up by the client's address."""

    def handler(conn: BackendConnection) -> None:
        job = jobs[conn.peer]
        down = job.payload("down")
        if job.pattern == "client_first":
            conn.recv_to_eof()
            conn.send(down)
        elif job.pattern == "backend_first":
            conn.send(down)
            conn.shut_wr()
            conn.recv_to_eof()
            return
        else:  # both at once: a writer thread while this one reads
            writer = threading.Thread(target=conn.send, args=(down,))
            writer.start()
            conn.recv_to_eof()
            writer.join(conn.deadline.remaining())
        conn.shut_wr()

    return handler


def soak_client(net: Net, daemon: Daemon, job: SoakJob) -> None:
    up, down = job.payload("up"), job.payload("down")
    deadline = Deadline(120)
    with connect(net, daemon, timeout=30) as sock:
        sock.sendall(v1_header(job.source))
        if job.pattern == "backend_first":
            received = recv_to_eof(sock, deadline)
            sock.sendall(up)
            sock.shutdown(socket.SHUT_WR)
            assert recv_to_eof(sock, deadline) == b""
        else:  # interleaved send and receive; the client half-closes when its data is out
            received = exchange(sock, up, deadline)
    assert hashlib.sha256(received).digest() == hashlib.sha256(down).digest(), job


def run_soak(
    net: Net, daemon: Daemon, backend: Backend, addresses: ClientAddresses, count: int
) -> list[SoakJob]:
    rng = random.Random(os.getpid())
    patterns = ("client_first", "backend_first", "both")
    jobs = [
        SoakJob(
            number,
            addresses.v4(),
            rng.randrange(SOAK_MAX_SIZE + 1),
            rng.randrange(SOAK_MAX_SIZE + 1),
            rng.choice(patterns),
        )
        for number in range(count)
    ]
    by_source = {job.source: job for job in jobs}
    backend.handler = soak_backend(by_source)
    deadline = Deadline(600)
    with ThreadPoolExecutor(max_workers=SOAK_WAVE) as pool:
        for start in range(0, count, SOAK_WAVE):  # waves, each bounded by the deadline
            assert not deadline.expired()
            wave = [
                pool.submit(soak_client, net, daemon, job)
                for job in jobs[start : start + SOAK_WAVE]
            ]
            for future in wave:
                future.result(timeout=max(1.0, deadline.remaining()))
    conns = backend.wait_done(timeout=60)
    assert len(conns) == count
    for conn in conns:
        job = by_source[conn.peer]
        assert conn.error is None, (job, conn.error)
        assert conn.received == job.up, job
        assert conn.digest.digest() == hashlib.sha256(job.payload("up")).digest(), job
    return jobs


def soak(
    net: Net, mmproxy: StartDaemon, backend: Backend, addresses: ClientAddresses, count: int
) -> None:
    daemon = mmproxy(verbose=2)
    start = time.monotonic()
    jobs = run_soak(net, daemon, backend, addresses, count)
    elapsed = time.monotonic() - start
    failures = daemon.wait_for(lambda line: line.get("dropConnection") is True, 1, 0.5)
    assert not failures, failures  # zero errors: not one connection ended badly
    closed = daemon.wait_for(is_msg("connection closing"), count, 10)
    assert len(closed) == count
    by_client = {line["clientAddr"]: line for line in closed}
    for job in jobs:  # mmproxy's own count agrees with both ends
        line = by_client[f"{job.source[0]}:{job.source[1]}"]
        assert (line["bytesToTarget"], line["bytesToClient"]) == (job.up, job.down), line
    verified = sum(job.up + job.down for job in jobs)
    figure(f"soak of {count}: bytes verified", f"{verified / MIB:.0f} MiB in {elapsed:.1f}s")


@pytest.mark.timeout(600)  # bounded by its own deadlines; about 70 s on a 2-core machine
def test_soak(
    net: Net,
    mmproxy: StartDaemon,
    backend4: Backend,
    addresses: ClientAddresses,
    relay: str,
    request: pytest.FixtureRequest,
) -> None:
    """1,000 connections of random sizes up to 4 MiB each way, half-closed from the client
    first, from the backend first, or both sending at once, 25 at a time: every byte
    verified at both ends, and mmproxy reports no failed connection."""
    if relay == "sockmap":
        # Seen once, free-threaded, with both ends sending at once: the backend got 53 bytes
        # more than the client sent.  A kernel fault (6.18): a retransmitted segment that
        # repeats received bytes is redirected whole (test_sockmap_handover.py reproduces
        # it); the relay now resets such a pair, which still fails this soak.  Rare here.
        request.applymarker(
            pytest.mark.xfail(strict=False, reason="sockmap: kernel redirects repeated bytes")
        )
    soak(net, mmproxy, backend4, addresses, SOAK_CONNECTIONS)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_soak_long(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """The same for 5,000 connections (``pytest -m slow``)."""
    soak(net, mmproxy, backend4, addresses, SOAK_CONNECTIONS_LONG)


# ---------------------------------------------------------- 9. connect and idle timeouts

BLACK_HOLE = "192.0.2.99"  # routed out of a veth whose frames nobody accepts


@contextlib.contextmanager
def black_hole_namespace() -> Iterator[tuple[NetNamespace, Net]]:
    """A namespace of its own where SYNs to BLACK_HOLE vanish without an answer: they leave by
    a veth pair for a MAC address that no interface has, so the peer end drops the frames, and
    no ICMP or RST ever comes back (a blackhole route would fail the connect at once)."""
    with namespace(f"mmproxy-hole-{os.getpid()}") as (ns, sockets):
        ns.ip("link", "add", "hole0", "type", "veth", "peer", "name", "hole1")
        ns.ip("link", "set", "hole0", "up")
        ns.ip("link", "set", "hole1", "up")
        ns.ip("route", "add", f"{BLACK_HOLE}/32", "dev", "hole0")
        ns.ip("neigh", "add", BLACK_HOLE, "lladdr", "02:00:00:00:00:99", "dev", "hole0")
        yield ns, Net(ns, sockets)


def test_connect_timeout_ends_a_connect_to_a_silent_backend(
    mmproxy: StartDaemon, addresses: ClientAddresses
) -> None:
    """--connect-timeout 1 against a target that never answers a SYN: the client is closed
    after about 1 s (not the kernel's minutes of SYN retries), logged as upstream_failed."""
    with black_hole_namespace() as (ns, net):
        daemon = mmproxy("--connect-timeout", "1", target4=f"{BLACK_HOLE}:443", verbose=1, ns=ns)
        try:
            with connect(net, daemon) as sock:
                sock.sendall(v1_header(addresses.v4()))
                elapsed = wait_closed(sock, 10)
            assert 0.9 <= elapsed < 5
            (failed,) = daemon.wait_for(lambda line: line.get("reason") == "upstream_failed")
            assert "timed out" in failed["error"], failed
            assert daemon.proc.poll() is None
        finally:
            daemon.stop()  # before its namespace goes
    figure("connect timeout 1 s: client closed after", f"{elapsed:.2f}s")


def test_default_connect_timeout_is_five_seconds(
    mmproxy: StartDaemon, addresses: ClientAddresses
) -> None:
    with black_hole_namespace() as (ns, net):
        daemon = mmproxy(target4=f"{BLACK_HOLE}:443", verbose=1, header_timeout=1, ns=ns)
        try:
            with connect(net, daemon) as sock:
                sock.sendall(v1_header(addresses.v4()))
                elapsed = wait_closed(sock, 15)
            assert 4.5 <= elapsed < 9
        finally:
            daemon.stop()


def sink(conn: BackendConnection) -> None:
    """Read to EOF and never answer: only the client -> backend direction carries data."""
    conn.recv_to_eof()


def test_idle_timeout_closes_connections_idle_both_ways(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """--idle-timeout 1: a connection with no data either way is closed after about 1 s (FIN to
    both ends, reason idle_timeout); one with data in one direction only, every 0.3 s for 3 s,
    stays open throughout; and while it lives the daemon sleeps rather than polls."""
    backend4.handler = sink
    daemon = mmproxy("--idle-timeout", "1", verbose=1)
    with connect(net, daemon) as idle:
        idle.sendall(v1_header(addresses.v4()) + b"one")
        elapsed = wait_closed(idle, 10)
    assert 0.9 <= elapsed < 4
    (line,) = daemon.wait_for(lambda line: line.get("reason") == "idle_timeout")
    assert line["bytesToTarget"] == 3
    assert line["msg"] == "idle timeout"
    assert backend4.wait_done(timeout=5)[0].eof  # the backend got a FIN

    busy = []
    try:
        for _ in range(20):
            sock = connect(net, daemon)
            busy.append(sock)
            sock.sendall(v1_header(addresses.v4()))
        cpu_before = cpu_seconds(daemon)
        for _ in range(10):
            for sock in busy:
                sock.sendall(b"tick")
            time.sleep(0.3)
        cpu = cpu_seconds(daemon) - cpu_before
        for sock in busy:  # none was closed: recv would return b"" at once if it had been
            sock.settimeout(0)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
        start = time.monotonic()
        for sock in busy:
            sock.settimeout(None)
            assert wait_closed(sock, 10) >= 0
        quiet_closed = time.monotonic() - start
    finally:
        for sock in busy:
            sock.close()
    # 20 connections for 3 s: spinning relay threads would burn seconds of CPU.
    assert cpu < 1.0, f"{cpu:.2f}s of CPU in 3 s"
    assert len(daemon.wait_for(lambda line: line.get("reason") == "idle_timeout", 21, 10)) == 21
    assert all(conn.received == 40 for conn in backend4.wait_done()[1:])
    figure("idle timeout 1 s: idle connection closed after", f"{elapsed:.2f}s")
    figure("idle timeout: daemon CPU for 20 one-way connections over 3 s", f"{cpu:.3f}s")
    figure("idle timeout: last of 20 closed after traffic stopped", f"{quiet_closed:.2f}s")


def test_idle_timeout_is_off_by_default(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    daemon = mmproxy(verbose=2)
    with connect(net, daemon) as sock:
        sock.sendall(v1_header(addresses.v4()) + b"wait")
        sock.settimeout(10)
        assert sock.recv(4) == b"wait"
        time.sleep(2.5)  # quiet for longer than the shortest idle timeout there is (1 s)
        sock.sendall(b" for me")
        assert exchange(sock, b"", Deadline(10)) == b" for me"  # still open: not timed out
    # The connection's last line says how it ended: by the client, not by a timeout.
    assert daemon.wait_for(lambda line: line.get("msg") == "connection closing", 1, 10)
    assert daemon.wait_for(lambda line: line.get("reason") == "idle_timeout", 1, 0) == []
