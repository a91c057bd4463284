"""End-to-end tests of the TCP relay: a client in the namespace, mmproxy, a recording backend.

Every test checks what the two ends observe: the backend records the address each connection
came from and what it received; the client checks what came back.  Log lines are used only to
learn the listening port and, as a second opinion, where a test says so.

Fake client addresses come from the documentation ranges (RFC 5737, RFC 3849) and are never
reused within a session (see ``ClientAddresses``).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import random
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from daemon_runner import (
    HEADER_TIMEOUT,
    Daemon,
    LogLine,
    StartDaemon,
    each_relay,  # noqa: F401 - every daemon here runs once per --relay
)
from netns import (
    LINGER_ZERO,
    Backend,
    ClientAddresses,
    Deadline,
    Net,
    Peer,
    exchange,
    greet_then_echo,
    namespace,
    recv_to_eof,
    reset_after_first_read,
    send_then_sink,
    sink_then_digest,
    sink_then_send,
    wait_closed,
)

from mmproxy.protocol import InetAddress, ProxyHeader, encode
from mmproxy.tlv import Alpn, Authority, Crc32c, Noop, UniqueId

MIB = 1 << 20


# ----------------------------------------------------------------------------- helpers


def header(source: Peer, destination: Peer, version: int) -> bytes:
    """A PROXY header (TCP over IPv4 or IPv6, by the source's family)."""
    return encode(
        ProxyHeader.proxy(InetAddress.of(*source), InetAddress.of(*destination), version=version)
    )


def destination_for(source: Peer) -> Peer:
    """The header's destination: what the load balancer's client connected to."""
    return ("2001:db8::443", 443) if ":" in source[0] else ("203.0.113.1", 443)


def connect(net: Net, daemon: Daemon, timeout: float = 10.0) -> socket.socket:
    """A load balancer's connection to mmproxy, from inside the namespace."""
    return net.sockets.connect((daemon.host, daemon.port), timeout)


def send_allowing_reset(sock: socket.socket, data: bytes) -> None:
    """Send, tolerating that mmproxy already closed (tests of refusals judge the close itself)."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


def is_closed_line(line: LogLine) -> bool:
    """The last log line of a relayed connection (-v 2)."""
    return line.get("msg") == "connection closing"


# ------------------------------------------------------------ addresses are preserved


@pytest.mark.parametrize(
    ("version", "family"),
    [(1, "TCP4"), (1, "TCP6"), (2, "INET"), (2, "INET6")],
)
def test_backend_sees_the_header_source(
    net: Net,
    mmproxy: StartDaemon,
    backend4: Backend,
    backend6: Backend,
    addresses: ClientAddresses,
    version: int,
    family: str,
) -> None:
    """The whole point of mmproxy: the backend sees the client from the header, port included.

    IPv4 clients go to the ``-4`` backend, IPv6 clients to the ``-6`` one, and the other
    backend sees nothing.
    """
    daemon = mmproxy()
    v6 = family in ("TCP6", "INET6")
    source = addresses.v6() if v6 else addresses.v4()
    with connect(net, daemon) as sock:
        sock.sendall(header(source, destination_for(source), version) + b"hello")
        assert exchange(sock, b" world", Deadline(10)) == b"hello world"
    used, unused = (backend6, backend4) if v6 else (backend4, backend6)
    assert used.peers() == [source]
    assert unused.peers() == []
    (conn,) = used.wait_done()
    assert bytes(conn.head) == b"hello world"


def test_ipv6_listener_relays_ipv4_clients(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """The family of the header, not of the load balancer's connection, picks the backend."""
    daemon = mmproxy(listen="[::1]:0")
    source = addresses.v4()
    with connect(net, daemon) as sock:
        sock.sendall(header(source, ("203.0.113.1", 443), 1))
        assert exchange(sock, b"via v6", Deadline(10)) == b"via v6"
    assert backend4.peers() == [source]


def test_closed_log_line_reports_the_connection(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """At -v 2 the last line of a connection names both ends and counts the bytes (go-style)."""
    daemon = mmproxy()
    source = addresses.v4()
    backend4.handler = sink_then_send(b"x" * 1000)
    with connect(net, daemon) as sock:
        sock.sendall(header(source, ("203.0.113.1", 443), 2))
        assert exchange(sock, b"y" * 300, Deadline(10)) == b"x" * 1000
    lines = daemon.wait_for(is_closed_line, timeout=5)
    assert len(lines) == 1, daemon.describe()
    line = lines[0]
    assert line["clientAddr"] == f"{source[0]}:{source[1]}"
    assert line["targetAddr"] == backend4.target()
    assert line["listenerNum"] == 0
    assert line["bytesToTarget"] == 300
    assert line["bytesToClient"] == 1000
    assert 0 <= line["durationSeconds"] < 10


# ------------------------------------------------------------------ header framing


@pytest.mark.parametrize("version", [1, 2])
def test_header_split_over_several_writes(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses, version: int
) -> None:
    """A header that arrives in pieces (4 writes, 50 ms apart) is reassembled."""
    daemon = mmproxy()
    source = addresses.v4()
    wire = header(source, ("203.0.113.1", 443), version)
    cuts = sorted(random.sample(range(1, len(wire)), 3))
    with connect(net, daemon) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
            sock.sendall(wire[start:end])
            time.sleep(0.05)
        assert exchange(sock, b"after the pieces", Deadline(10)) == b"after the pieces"
    assert backend4.peers() == [source]


@pytest.mark.parametrize("version", [1, 2])
def test_payload_sent_with_the_header_arrives_first_and_intact(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses, version: int
) -> None:
    """Bytes in the header's own segment are the client's: first in line at the backend."""
    daemon = mmproxy()
    source = addresses.v4()
    payload = os.urandom(100_000)
    backend4.handler = sink_then_digest
    with connect(net, daemon) as sock:
        sock.sendall(header(source, ("203.0.113.1", 443), version) + payload)
        sock.shutdown(socket.SHUT_WR)
        assert recv_to_eof(sock, Deadline(10)) == hashlib.sha256(payload).digest()
    (conn,) = backend4.wait_done()
    assert conn.peer == source
    assert bytes(conn.head) == payload[: len(conn.head)]
    assert conn.received == len(payload)


def test_backend_speaks_first(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """A header with no payload still opens the upstream; the backend's greeting reaches us."""
    daemon = mmproxy()
    source = addresses.v4()
    greeting = b"220 mail.example ESMTP\r\n"
    backend4.handler = greet_then_echo(greeting)
    with connect(net, daemon) as sock:
        sock.sendall(header(source, ("203.0.113.1", 25), 1))
        received = b""
        deadline = Deadline(10)
        while len(received) < len(greeting) and not deadline.expired():
            sock.settimeout(deadline.remaining())
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
        assert received == greeting
        assert exchange(sock, b"EHLO client\r\n", Deadline(10)) == b"EHLO client\r\n"
    assert backend4.peers() == [source]


# ------------------------------------------------------------------------ half-close


def test_client_half_closes_first(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """Client sends 1 MiB and SHUT_WR; the backend reads to EOF, then answers 1 MiB and closes.

    mmproxy must pass the client's FIN on without closing the other direction.
    """
    daemon = mmproxy()
    source = addresses.v4()
    upload, download = os.urandom(MIB), os.urandom(MIB)
    backend4.handler = sink_then_send(download)
    with connect(net, daemon) as sock:
        sock.sendall(header(source, ("203.0.113.1", 443), 2) + upload)
        sock.shutdown(socket.SHUT_WR)
        received = recv_to_eof(sock, Deadline(20))
    assert hashlib.sha256(received).digest() == hashlib.sha256(download).digest()
    (conn,) = backend4.wait_done()
    assert conn.error is None
    assert conn.peer == source
    assert conn.digest.digest() == hashlib.sha256(upload).digest()
    assert conn.sent == MIB


def test_backend_half_closes_first(
    net: Net, mmproxy: StartDaemon, backend6: Backend, addresses: ClientAddresses
) -> None:
    """The backend sends 1 MiB and SHUT_WR at once; the client reads to EOF, then uploads 1 MiB.

    The backend's FIN reaches the client while the client's direction stays open.
    """
    daemon = mmproxy()
    source = addresses.v6()
    upload, download = os.urandom(MIB), os.urandom(MIB)
    backend6.handler = send_then_sink(download)
    with connect(net, daemon) as sock:
        sock.sendall(header(source, ("2001:db8::443", 443), 1))
        received = recv_to_eof(sock, Deadline(20))
        assert hashlib.sha256(received).digest() == hashlib.sha256(download).digest()
        sock.sendall(upload)
        sock.shutdown(socket.SHUT_WR)
        (conn,) = backend6.wait_done(timeout=20)
        assert wait_closed(sock, 10) >= 0  # and mmproxy then closes the client side too
    assert conn.error is None
    assert conn.peer == source
    assert conn.received == MIB
    assert conn.digest.digest() == hashlib.sha256(upload).digest()


# ------------------------------------------------------------------------- resets


def test_client_reset_ends_the_upstream(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """A client that vanishes with a RST mid-connection does not leave the backend hanging."""
    daemon = mmproxy()
    backend4.handler = sink_then_digest
    with connect(net, daemon) as sock:
        sock.sendall(header(addresses.v4(), ("203.0.113.1", 443), 2) + b"partial")
        (conn,) = backend4.wait_connections(1)
        deadline = Deadline(5)
        while conn.received < len(b"partial") and not deadline.expired():
            time.sleep(0.01)
        assert conn.received == len(b"partial")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
    assert conn.done.wait(5), "the backend connection outlived the client's reset by 5 s"


def test_backend_reset_ends_the_client_connection(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """A backend that aborts (RST) makes mmproxy close the client side promptly."""

    daemon = mmproxy()
    backend4.handler = reset_after_first_read
    with connect(net, daemon) as sock:
        sock.sendall(header(addresses.v4(), ("203.0.113.1", 443), 1) + b"anyone?")
        assert wait_closed(sock, 5) < 5
    (conn,) = backend4.wait_done()
    assert bytes(conn.head) == b"anyone?"


# --------------------------------------------------- LOCAL, UNKNOWN, TLVs, destinations


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(encode(ProxyHeader.local()), id="v2-local"),
        pytest.param(b"PROXY UNKNOWN\r\n", id="v1-unknown"),
        pytest.param(b"PROXY UNKNOWN 198.51.100.1 203.0.113.1 1234 443\r\n", id="v1-unknown-addrs"),
    ],
)
def test_headers_without_a_client_use_the_real_endpoints(
    net: Net, mmproxy: StartDaemon, backend4: Backend, wire: bytes
) -> None:
    """LOCAL (health checks) and UNKNOWN impersonate nobody: the backend sees mmproxy itself."""
    daemon = mmproxy()
    with connect(net, daemon) as sock:
        sock.sendall(wire + b"health?")
        assert exchange(sock, b"", Deadline(10)) == b"health?"
    (peer,) = backend4.peers()
    assert is_loopback(peer[0]), peer


def test_v2_tlvs_are_accepted_and_stripped(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """TLVs (ALPN, AUTHORITY, UNIQUE_ID, NOOP, a valid CRC32C) are header, not client data."""
    daemon = mmproxy()
    source = addresses.v4()
    wire = encode(
        ProxyHeader.proxy(
            InetAddress.of(*source),
            InetAddress.of("203.0.113.1", 443),
            tlvs=(
                Alpn(b"h2"),
                Authority("www.example.com"),
                UniqueId(os.urandom(32)),
                Noop(b"\0" * 5),
                Crc32c(),
            ),
        )
    )
    with connect(net, daemon) as sock:
        sock.sendall(wire + b"GET / HTTP/1.1\r\n\r\n")
        assert exchange(sock, b"", Deadline(10)) == b"GET / HTTP/1.1\r\n\r\n"
    assert backend4.peers() == [source]
    (conn,) = backend4.wait_done()
    assert bytes(conn.head) == b"GET / HTTP/1.1\r\n\r\n"


def test_largest_v2_header_is_accepted(
    net: Net, mmproxy: StartDaemon, backend6: Backend, addresses: ClientAddresses
) -> None:
    """A v2 header close to its 64 KiB maximum (NOOP padding) spans many reads and still works."""
    daemon = mmproxy()
    source = addresses.v6()
    wire = encode(
        ProxyHeader.proxy(
            InetAddress.of(*source),
            InetAddress.of("2001:db8::443", 443),
            tlvs=(Noop(bytes(65000)), Crc32c()),
        )
    )
    assert len(wire) > 65000
    with connect(net, daemon) as sock:
        sock.sendall(wire + b"after a big header")
        assert exchange(sock, b"", Deadline(10)) == b"after a big header"
    assert backend6.peers() == [source]


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_dynamic_destination_connects_to_the_header_destination(
    net: Net,
    mmproxy: StartDaemon,
    backend4: Backend,
    backend6: Backend,
    addresses: ClientAddresses,
    v6: bool,
    tmp_path: Path,
) -> None:
    """With -dynamic-destination the header's destination wins over -4/-6 (here an address of
    this host, which is all it may be without --allowed-destinations)."""
    other = Backend(net.sockets, "::1" if v6 else "127.0.0.2")
    subnets = tmp_path / "subnets"
    subnets.write_text("127.0.0.0/8\n")
    try:
        daemon = mmproxy("-dynamic-destination", "-allowed-subnets", str(subnets))
        source = addresses.v6() if v6 else addresses.v4()
        with connect(net, daemon) as sock:
            sock.sendall(header(source, other.address, 2))
            assert exchange(sock, b"dynamic", Deadline(10)) == b"dynamic"
        assert other.peers() == [source]
        assert backend4.peers() == []
        assert backend6.peers() == []
    finally:
        other.close()


# ---------------------------------------------------------------------------- -mark


MARK_TARGET = "203.0.113.250"


def test_mark_routes_upstream_packets(mmproxy: StartDaemon, addresses: ClientAddresses) -> None:
    """-mark sets SO_MARK on the upstream socket: only marked packets have a route to the target.

    In a namespace of its own, 203.0.113.250 is local only in table 124, which only packets
    with fwmark 42 consult.  With ``-mark 42`` the backend (a transparent listener on 0.0.0.0)
    sees the header's client; without it the connect has no route and the client is closed.
    """
    with namespace(f"mmproxy-mark-{os.getpid()}") as (ns, sockets):
        ns.ip("rule", "add", "fwmark", "42", "lookup", "124")
        ns.ip("route", "add", "local", MARK_TARGET, "dev", "lo", "table", "124")
        ns.ip("rule", "add", "from", MARK_TARGET, "iif", "lo", "lookup", "123")
        backend = Backend(sockets, "0.0.0.0", transparent=True)
        daemons: list[Daemon] = []
        try:
            target = f"{MARK_TARGET}:{backend.port}"
            marked = mmproxy("-mark", "42", target4=target, ns=ns)
            daemons.append(marked)
            source = addresses.v4()
            with sockets.connect((marked.host, marked.port)) as sock:
                sock.sendall(header(source, (MARK_TARGET, backend.port), 1))
                assert exchange(sock, b"marked", Deadline(10)) == b"marked"
            assert backend.peers() == [source]

            unmarked = mmproxy(target4=target, ns=ns)
            daemons.append(unmarked)
            with sockets.connect((unmarked.host, unmarked.port)) as sock:
                send_allowing_reset(sock, header(addresses.v4(), (MARK_TARGET, backend.port), 1))
                assert wait_closed(sock, 10) < 8
            assert backend.peers() == [source]  # nothing new
            assert [daemon.stop() for daemon in daemons] == [0, 0]
        finally:
            for daemon in daemons:  # before the namespace goes
                daemon.stop()
            backend.close()


# ----------------------------------------------------------------------- -listeners


def test_two_listeners_share_the_port_and_both_serve(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """-listeners 2 opens two SO_REUSEPORT sockets on one port; both accept connections.

    The kernel spreads connections by a hash of the 4-tuple, so 40 connections from different
    source ports all landing on one listener has a probability of about 2**-39.
    """
    daemon = mmproxy(listeners=2)
    assert len(daemon.listening) == 2
    assert {line["listenAddr"] for line in daemon.listening} == {f"127.0.0.1:{daemon.port}"}
    assert sorted(line["listenerNum"] for line in daemon.listening) == [0, 1]
    sources = [addresses.v4() for _ in range(40)]

    def one(source: Peer) -> bytes:
        with connect(net, daemon) as sock:
            sock.sendall(header(source, ("203.0.113.1", 443), 2))
            return exchange(sock, source[0].encode(), Deadline(20))

    with ThreadPoolExecutor(max_workers=10) as pool:
        replies = list(pool.map(one, sources))
    assert replies == [s[0].encode() for s in sources]
    assert sorted(backend4.peers()) == sorted(sources)
    lines = daemon.wait_for(is_closed_line, count=40, timeout=5)
    assert {line["listenerNum"] for line in lines} == {0, 1}, daemon.describe()


# ------------------------------------------------------------------- allowed subnets


def test_peer_outside_allowed_subnets_is_refused(
    net: Net,
    mmproxy: StartDaemon,
    backend4: Backend,
    addresses: ClientAddresses,
    tmp_path: Path,
) -> None:
    """Only listed load balancers may send headers: 127.0.0.1 is not in 192.0.2.0/24."""
    subnets = tmp_path / "allowed-subnets.txt"
    subnets.write_text("# load balancers\n192.0.2.0/24\n")
    daemon = mmproxy("-allowed-subnets", str(subnets), verbose=1)
    with connect(net, daemon) as sock:
        send_allowing_reset(sock, header(addresses.v4(), ("203.0.113.1", 443), 1) + b"data")
        elapsed = wait_closed(sock, HEADER_TIMEOUT + 3)
    assert elapsed < HEADER_TIMEOUT * 0.75, "closed by the header timeout, not the subnet check"
    # Refused at admission: logged before the socket is closed, and no connection exists to
    # go upstream, so once the line is there the backend can never see this client.
    refused = daemon.wait_for(lambda line: line.get("reason") == "not_allowed", timeout=5)
    assert refused, daemon.describe()
    assert backend4.peers() == []
    assert refused[0]["msg"] == "connection origin not in allowed subnets"
    assert refused[0].get("dropConnection") is True


def test_peer_inside_allowed_subnets_is_served(
    net: Net,
    mmproxy: StartDaemon,
    backend4: Backend,
    addresses: ClientAddresses,
    tmp_path: Path,
) -> None:
    """The same daemon setup with 127.0.0.0/8 listed relays normally."""
    subnets = tmp_path / "allowed-subnets.txt"
    subnets.write_text("192.0.2.0/24\n127.0.0.0/8\n")
    daemon = mmproxy("-allowed-subnets", str(subnets))
    source = addresses.v4()
    with connect(net, daemon) as sock:
        sock.sendall(header(source, ("203.0.113.1", 443), 1))
        assert exchange(sock, b"allowed", Deadline(10)) == b"allowed"
    assert backend4.peers() == [source]


# ------------------------------------------------------------------ malformed headers


def _v2(mutate: Callable[[bytes], bytes], *, crc: bool = False) -> bytes:
    good = encode(
        ProxyHeader.proxy(
            InetAddress.of("198.51.100.200", 40000),
            InetAddress.of("203.0.113.1", 443),
            tlvs=(Crc32c(),) if crc else (),
        )
    )
    return mutate(good)


# (wire bytes, half-close after sending, reason code the README documents)
MALFORMED: dict[str, tuple[bytes, bool, str]] = {
    "garbage": (b"\x00\x01\x02\x03garbage\r\n", False, "not_proxy_protocol"),
    "http": (b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", False, "not_proxy_protocol"),
    "v1-lowercase": (
        b"proxy TCP4 198.51.100.7 203.0.113.1 40001 443\r\n",
        False,
        "not_proxy_protocol",
    ),
    "v1-bad-address": (
        b"PROXY TCP4 198.51.100.300 203.0.113.1 40001 443\r\n",
        False,
        "v1_bad_address",
    ),
    "v1-family-mismatch": (
        b"PROXY TCP4 2001:db8::7 203.0.113.1 40001 443\r\n",
        False,
        "v1_bad_address",
    ),
    "v1-bad-port": (b"PROXY TCP4 198.51.100.7 203.0.113.1 70000 443\r\n", False, "v1_bad_port"),
    "v1-bad-protocol": (
        b"PROXY TCP5 198.51.100.7 203.0.113.1 40001 443\r\n",
        False,
        "v1_bad_protocol",
    ),
    "v1-bare-lf": (b"PROXY TCP4 198.51.100.7 203.0.113.1 40001 443\n", False, "v1_bad_syntax"),
    "v1-too-long": (b"PROXY UNKNOWN " + b"x" * 120, False, "v1_too_long"),
    "v2-bad-version": (_v2(lambda h: h[:12] + b"\x11" + h[13:]), False, "v2_bad_version"),
    "v2-bad-command": (_v2(lambda h: h[:12] + b"\x2f" + h[13:]), False, "v2_bad_command"),
    "v2-bad-family": (_v2(lambda h: h[:13] + b"\x41" + h[14:]), False, "v2_bad_family"),
    "v2-short-address": (
        _v2(lambda h: h[:14] + (4).to_bytes(2, "big") + h[16:20]),
        False,
        "v2_short_address",
    ),
    "v2-bad-crc": (_v2(lambda h: h[:-1] + bytes([h[-1] ^ 0xFF]), crc=True), False, "v2_bad_crc"),
    "v2-truncated-then-eof": (_v2(lambda h: h[:20]), True, "incomplete"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_header_is_refused_and_the_next_client_served(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses, case: str
) -> None:
    """A bad header closes that connection early (well within the header timeout) and the
    backend never hears of it; the daemon goes on serving the next, valid, connection.
    """
    wire, half_close, reason = MALFORMED[case]
    daemon = mmproxy(verbose=1)
    with connect(net, daemon) as sock:
        send_allowing_reset(sock, wire)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        elapsed = wait_closed(sock, HEADER_TIMEOUT + 3)
    assert elapsed < HEADER_TIMEOUT * 0.75, f"{case}: closed after {elapsed:.2f}s, by the timeout"
    assert backend4.peers() == []

    source = addresses.v4()
    with connect(net, daemon) as sock:
        sock.sendall(header(source, ("203.0.113.1", 443), 2))
        assert exchange(sock, b"next", Deadline(10)) == b"next"
    assert backend4.peers() == [source]

    drops = daemon.wait_for(lambda line: line.get("dropConnection") is True, timeout=2)
    assert drops, daemon.describe()
    assert {line.get("reason") for line in drops} == {reason}, daemon.describe()


def test_silent_client_is_closed_at_the_header_timeout(
    net: Net, mmproxy: StartDaemon, backend4: Backend
) -> None:
    """A peer that connects and sends nothing is dropped when --header-timeout expires."""
    daemon = mmproxy(verbose=1)
    with connect(net, daemon) as sock:
        elapsed = wait_closed(sock, HEADER_TIMEOUT + 5)
    assert HEADER_TIMEOUT * 0.8 <= elapsed < HEADER_TIMEOUT + 3
    assert backend4.peers() == []
    assert daemon.wait_for(lambda line: line.get("reason") == "header_timeout"), daemon.describe()


def test_slow_partial_header_is_closed_at_the_header_timeout(
    net: Net, mmproxy: StartDaemon, backend4: Backend
) -> None:
    """The timeout covers the whole header, not each read: a trickle does not keep it alive.

    One byte every 150 ms for up to 4.5 s: a timer restarted by every read would never fire.
    """
    daemon = mmproxy(verbose=1)
    wire = b"PROXY TCP4 198.51.100.7 203.0.113.1 40001 443\r\n"
    with connect(net, daemon) as sock:
        start = time.monotonic()
        elapsed = None
        for byte in wire[:30]:  # a valid beginning, never complete
            send_allowing_reset(sock, bytes([byte]))
            readable, _, _ = select.select([sock], [], [], 0.15)
            if readable:  # mmproxy closed (EOF or reset): it never sends anything here
                elapsed = time.monotonic() - start
                break
        if elapsed is None:
            elapsed = time.monotonic() - start + wait_closed(sock, 5)
    assert HEADER_TIMEOUT * 0.8 <= elapsed < HEADER_TIMEOUT + 1, f"closed after {elapsed:.2f}s"
    assert backend4.peers() == []


def test_unreachable_backend_closes_the_client(
    net: Net, mmproxy: StartDaemon, addresses: ClientAddresses, closed_port: int
) -> None:
    """If the backend refuses the connection, mmproxy closes the client and keeps running."""
    daemon = mmproxy(target4=f"127.0.0.1:{closed_port}", verbose=1)
    with connect(net, daemon) as sock:
        send_allowing_reset(sock, header(addresses.v4(), ("203.0.113.1", 443), 1) + b"x")
        assert wait_closed(sock, 10) < 5
    assert daemon.proc.poll() is None
    assert daemon.wait_for(lambda line: line.get("dropConnection") is True), daemon.describe()


# ------------------------------------------------------------------------------ load


def test_200_concurrent_connections(
    net: Net,
    mmproxy: StartDaemon,
    backend4: Backend,
    backend6: Backend,
    addresses: ClientAddresses,
) -> None:
    """200 connections at once (50 in flight), v1/v2 and IPv4/IPv6 mixed, 0-256 KiB each:
    every byte comes back and every connection reaches the backend from its own client.
    """
    daemon = mmproxy(verbose=0)
    rng = random.Random(os.getpid())
    jobs = []
    for i in range(200):
        source = addresses.v6() if i % 2 else addresses.v4()
        jobs.append((source, 1 + (i // 2) % 2, rng.randbytes(rng.randrange(256 * 1024 + 1))))

    def one(job: tuple[Peer, int, bytes]) -> bool:
        source, version, payload = job
        with connect(net, daemon, timeout=30) as sock:
            sock.sendall(header(source, destination_for(source), version))
            return exchange(sock, payload, Deadline(60)) == payload

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(one, jobs))
    assert results.count(True) == 200
    expected4 = sorted(j[0] for j in jobs if ":" not in j[0][0])
    expected6 = sorted(j[0] for j in jobs if ":" in j[0][0])
    assert sorted(backend4.peers()) == expected4
    assert sorted(backend6.peers()) == expected6
    conns = backend4.wait_done() + backend6.wait_done()
    by_peer = {conn.peer: conn for conn in conns}
    for source, _, payload in jobs:
        conn = by_peer[source]
        assert conn.error is None, conn.error
        assert conn.digest.digest() == hashlib.sha256(payload).digest()


# ---------------------------------------------------------------------- graceful stop


def test_sigterm_drains_live_transfers(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """SIGTERM closes the listener at once, lets running transfers finish, then exits 0.

    10 uploads of 4 MiB, each paced over about 1.6 s; SIGTERM arrives once all of them are
    under way.  A new connection is refused while they still run; each upload arrives intact.
    """
    daemon = mmproxy(drain_timeout=10, verbose=1)
    backend4.handler = sink_then_digest
    chunk_size, chunks = 128 * 1024, 32
    payloads = [os.urandom(chunk_size * chunks) for _ in range(10)]
    finished = threading.Semaphore(0)
    running = [len(payloads)]
    lock = threading.Lock()

    def upload(payload: bytes) -> bytes:
        try:
            with connect(net, daemon, timeout=30) as sock:
                sock.sendall(header(addresses.v4(), ("203.0.113.1", 443), 2))
                for start in range(0, len(payload), chunk_size):
                    sock.sendall(payload[start : start + chunk_size])
                    time.sleep(0.05)
                sock.shutdown(socket.SHUT_WR)
                return recv_to_eof(sock, Deadline(30))
        finally:
            with lock:
                running[0] -= 1
            finished.release()

    with ThreadPoolExecutor(max_workers=10) as pool:
        futures = [pool.submit(upload, p) for p in payloads]
        conns = backend4.wait_connections(10)
        deadline = Deadline(10)
        while not all(c.received > 0 for c in conns) and not deadline.expired():
            time.sleep(0.01)
        assert all(c.received > 0 for c in conns)
        daemon.signal(signal.SIGTERM)
        signalled = time.monotonic()

        refused_while_running = None
        deadline = Deadline(3)
        while not deadline.expired():
            try:
                probe = connect(net, daemon, timeout=1)
            except ConnectionResetError:
                # The handshake raced the listener's close: the kernel resets it.  Ask again; the
                # next SYN finds no listener and gets the plain refusal this test waits for.
                time.sleep(0.02)
                continue
            except ConnectionRefusedError:
                with lock:
                    refused_while_running = running[0] > 0 and daemon.proc.poll() is None
                break
            probe.close()
            time.sleep(0.02)
        digests = [f.result(timeout=30) for f in futures]

    assert refused_while_running is True, "new connections were not refused during the drain"
    assert digests == [hashlib.sha256(p).digest() for p in payloads]
    code = daemon.wait(10)
    assert code == 0, daemon.describe()
    assert time.monotonic() - signalled < 10
    assert len(backend4.peers()) == 10


def test_drain_timeout_closes_idle_connections(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """After --drain-timeout a connection that does not finish is closed, and mmproxy exits 0."""
    daemon = mmproxy(drain_timeout=1)
    with connect(net, daemon) as sock:
        sock.sendall(header(addresses.v4(), ("203.0.113.1", 443), 1) + b"hold")
        backend4.wait_connections(1)
        deadline = Deadline(5)
        got = b""
        while len(got) < 4 and not deadline.expired():
            sock.settimeout(deadline.remaining())
            got += sock.recv(4)
        assert got == b"hold"
        daemon.signal(signal.SIGTERM)
        elapsed = wait_closed(sock, 8)
    assert 0.8 <= elapsed < 5
    assert daemon.wait(5) == 0, daemon.describe()


def test_sigint_stops_an_idle_daemon(mmproxy: StartDaemon, net: Net) -> None:
    """SIGINT (Ctrl-C) is a clean stop too: exit 0, no traceback, listener gone."""
    daemon = mmproxy()
    daemon.signal(signal.SIGINT)
    assert daemon.wait(5) == 0, daemon.describe()
    with pytest.raises(ConnectionRefusedError):
        connect(net, daemon, timeout=2).close()
