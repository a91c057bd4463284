"""End-to-end: how the upstream socket is bound, and what one connection costs the daemon.

These cover the corners of the upstream connection the peers get wrong or leave out (source
port 0, a client port already taken on this host, IPv4-mapped addresses, a UDP header on the
TCP listener) and the resource promise the README makes: an idle connection holds 2 descriptors
and 1 thread, an active one 6 descriptors and 2 threads, and everything comes back when they
close.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from contextlib import ExitStack

from daemon_runner import Daemon, StartDaemon, run_to_exit
from netns import (
    Backend,
    ClientAddresses,
    Deadline,
    Net,
    exchange,
    namespace,
    wait_accept_queue,
    wait_closed,
)

from mmproxy.protocol import InetAddress, ProxyHeader, Transport, encode


def connect(net: Net, daemon: Daemon) -> socket.socket:
    return net.sockets.connect((daemon.host, daemon.port), 10.0)


def daemon_fds(daemon: Daemon) -> int:
    # ``ip netns exec`` execs the command, so the child's pid is mmproxy's own.
    return len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))


def daemon_threads(daemon: Daemon) -> int:
    return len(os.listdir(f"/proc/{daemon.proc.pid}/task"))


def wait_value(read: Callable[[], int], wanted: int, timeout: float = 5.0) -> int:
    """Poll ``read()`` until it returns ``wanted`` (bounded); return the last value seen."""
    deadline = Deadline(timeout)
    value = read()
    while value != wanted and not deadline.expired():
        time.sleep(0.02)
        value = read()
    return value


def test_source_port_zero_binds_the_address_only(
    net: Net, mmproxy: StartDaemon, backend4: Backend, backend6: Backend
) -> None:
    """Port 0 in the header: the backend sees the client's address with an ephemeral port."""
    daemon = mmproxy()
    for host, dest, backend in (
        ("198.51.100.200", "203.0.113.1", backend4),
        ("2001:db8::200", "2001:db8::443", backend6),
    ):
        wire = f"PROXY TCP{6 if ':' in host else 4} {host} {dest} 0 443\r\n".encode()
        with connect(net, daemon) as sock:
            sock.sendall(wire)
            assert exchange(sock, b"zero", Deadline(10)) == b"zero"
        ((seen_host, seen_port),) = backend.peers()
        assert seen_host == host
        assert seen_port != 0


def test_client_port_in_use_falls_back_to_an_ephemeral_port(
    net: Net, mmproxy: StartDaemon, backend4: Backend
) -> None:
    """A header naming an address:port already bound here (client and mmproxy on one host)
    is relayed from an ephemeral port of the same address, and logged at -v 1."""
    daemon = mmproxy(verbose=1)
    # A transparent listener holds a client's address:port here (loopback sources are refused).
    holder = net.sockets.server("198.51.100.254", 0, transparent=True)
    taken = holder.getsockname()[:2]
    wire = f"PROXY TCP4 {taken[0]} 127.0.0.1 {taken[1]} 443\r\n".encode()
    try:
        with connect(net, daemon) as sock:
            sock.sendall(wire)
            assert exchange(sock, b"fallback", Deadline(10)) == b"fallback"
    finally:
        holder.close()
    ((seen_host, seen_port),) = backend4.peers()
    assert seen_host == taken[0]
    assert seen_port != taken[1]
    assert daemon.wait_for(lambda line: "ephemeral port" in str(line.get("msg"))), daemon.describe()


def test_ipv4_mapped_source_is_relayed_as_ipv4(
    net: Net, mmproxy: StartDaemon, backend4: Backend, backend6: Backend, addresses: ClientAddresses
) -> None:
    """``::ffff:198.51.100.x`` in a TCP6 header is an IPv4 client: the ``-4`` backend sees it."""
    host, port = addresses.v4()
    wire = f"PROXY TCP6 ::ffff:{host} ::ffff:203.0.113.1 {port} 443\r\n".encode()
    daemon = mmproxy()
    with connect(net, daemon) as sock:
        sock.sendall(wire)
        assert exchange(sock, b"mapped", Deadline(10)) == b"mapped"
    assert backend4.peers() == [(host, port)]
    assert backend6.peers() == []


def test_udp_header_on_the_tcp_listener_is_refused(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """A v2 header announcing DGRAM cannot describe this TCP connection: refused, logged."""
    source = InetAddress.of(*addresses.v4())
    wire = encode(
        ProxyHeader.proxy(source, InetAddress.of("203.0.113.1", 53), transport=Transport.DGRAM)
    )
    daemon = mmproxy(verbose=1)
    with connect(net, daemon) as sock:
        sock.sendall(wire + b"payload")
        assert wait_closed(sock, 5) < 2
    assert backend4.peers() == []
    assert daemon.wait_for(lambda line: line.get("reason") == "wrong_transport"), daemon.describe()


def test_descriptors_and_threads_per_connection(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """Idle (nothing after the header): 2 descriptors and no thread per connection, parked
    on the one parking thread.  Small messages both ways are moved by the parking lot itself:
    still 2 descriptors (no pipe) and no thread per connection.  Closed: the descriptors all
    come back."""
    count = 40
    daemon = mmproxy(verbose=0)
    base_fds = daemon_fds(daemon)
    base_threads = daemon_threads(daemon)  # main, acceptor, parking lot; no pool worker yet
    with ExitStack() as stack:
        clients = []
        for number in range(count):
            sock = stack.enter_context(connect(net, daemon))
            source = addresses.v4()
            sock.sendall(f"PROXY TCP4 {source[0]} 203.0.113.1 {source[1]} 443\r\n".encode())
            clients.append(sock)
            backend4.wait_connections(number + 1)  # one at a time: one worker serves them all
        assert wait_value(lambda: daemon_fds(daemon), base_fds + 2 * count) == base_fds + 2 * count
        # The workers that read the headers wait in the pool for the next job (workers retire
        # after 30 s idle); no thread is held per idle connection.  With a thread each this
        # would be base + 40.  A loaded machine may start a few workers (the next header can
        # arrive before the last worker is back in the pool), never one per connection.
        assert daemon_threads(daemon) <= base_threads + 8, daemon_threads(daemon) - base_threads
        for sock in clients:
            sock.settimeout(10)
            sock.sendall(b"ping")
            assert sock.recv(4) == b"ping"
        assert daemon_fds(daemon) == base_fds + 2 * count  # no pipe was made
        assert daemon_threads(daemon) <= base_threads + 8, daemon_threads(daemon) - base_threads
    assert wait_value(lambda: daemon_fds(daemon), base_fds) == base_fds


def test_connection_cap_follows_the_descriptor_limit(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """With few descriptors, mmproxy caps connections so each one it takes can get its 2
    sockets; at the cap it stops accepting (and says so): the next connection waits in the
    kernel's backlog and is served once a slot frees.  Pipes are not budgeted: when they run
    out, a direction copies instead."""
    daemon = mmproxy(nofile=100, verbose=0)
    (ready,) = daemon.wait_for(lambda line: line.get("msg") == "ready")
    cap = int(ready["maxConnections"])
    assert ready["descriptorLimit"] == 100
    assert 1 <= cap <= 100 // 2

    def open_one(stack: ExitStack) -> socket.socket:
        sock = stack.enter_context(connect(net, daemon))
        source = addresses.v4()
        sock.sendall(f"PROXY TCP4 {source[0]} 203.0.113.1 {source[1]} 443\r\n".encode())
        return sock

    with ExitStack() as stack:
        held = [open_one(stack) for _ in range(cap)]
        backend4.wait_connections(cap)
        # Every connection within the cap relays data: by splice while pipes can be had (17
        # connections both ways need 68 descriptors for pipes), then by copying.
        for sock in held:
            sock.settimeout(10)
            sock.sendall(b"ok")
            assert sock.recv(2) == b"ok"
        waiting = open_one(stack)  # at the cap: it waits in the kernel's backlog
        assert wait_accept_queue(net.ns, daemon.port, 1) == 1
        assert daemon.wait_for(lambda line: "connection limit" in str(line.get("msg")))
        held[0].shutdown(socket.SHUT_WR)
        assert wait_closed(held[0], 5) < 5  # the echo backend ends it; its slot frees
        assert exchange(waiting, b"again", Deadline(10)) == b"again"
    assert len(backend4.peers()) == cap + 1


TPROXY_ADDRESS = "203.0.113.251"


def test_listen_transparent_accepts_for_a_non_local_address(
    mmproxy: StartDaemon, addresses: ClientAddresses
) -> None:
    """``-listen-transparent`` lets mmproxy listen on an address this host does not own but
    routes to itself (as TPROXY setups do); without it that bind fails, and start-up stops
    with one log line and exit code 1, no traceback."""
    with namespace(f"mmproxy-tproxy-{os.getpid()}") as (ns, sockets):
        # Delivered locally by policy routing only: not in the local table, so not "ours".
        ns.ip("rule", "add", "to", TPROXY_ADDRESS, "lookup", "125")
        ns.ip("route", "add", "local", TPROXY_ADDRESS, "dev", "lo", "table", "125")
        backend = Backend(sockets, "127.0.0.1")
        try:
            flags = ["-l", f"{TPROXY_ADDRESS}:0", "-4", backend.target()]
            refused = run_to_exit(ns, *flags)
            assert refused.returncode == 1, refused
            assert "Traceback" not in refused.stderr
            (error,) = [line for line in refused.stdout.splitlines() if '"ERROR"' in line]
            assert f"cannot listen on {TPROXY_ADDRESS}:0" in error

            daemon = mmproxy(
                "-listen-transparent",
                listen=f"{TPROXY_ADDRESS}:0",
                target4=backend.target(),
                ns=ns,
            )
            try:
                assert daemon.host == TPROXY_ADDRESS
                source = addresses.v4()
                wire = f"PROXY TCP4 {source[0]} {TPROXY_ADDRESS} {source[1]} 443\r\n".encode()
                # A client that leaves the source to the kernel gets ENETUNREACH for an address
                # routed by a policy rule only; a real TPROXY client is remote anyway.
                with sockets.call(_loopback_client) as sock:
                    sock.settimeout(10)
                    sock.connect((daemon.host, daemon.port))
                    sock.sendall(wire)
                    assert exchange(sock, b"tproxy", Deadline(10)) == b"tproxy", daemon.describe()
                assert backend.peers() == [source]
            finally:
                daemon.stop()  # before the namespace goes
        finally:
            backend.close()


def _loopback_client() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock
