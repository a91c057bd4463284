"""UDP mode end to end: ``-p udp`` in the test namespace, with a UDP backend and fake balancers.

A "balancer" here is a UDP socket on loopback that sends PROXY v2 DGRAM datagrams to mmproxy
and receives the backend's replies, which mmproxy sends back without a header.  The backend
answers every datagram with ``<peer it saw>|<payload>``, so a reply names the flow it came from.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_runner import Daemon, StartDaemon
from netns import ClientAddresses, Deadline, Net, Peer
from test_metrics_scrape import metrics_address, scrape_until, value

from mmproxy.protocol import InetAddress, ProxyHeader, Transport, encode

MAX_DATAGRAM = 65507  # the largest UDP payload over IPv4

# ----------------------------------------------------------------------------- helpers


def dgram_header(
    source: Peer, destination: Peer | None = None, transport: Transport = Transport.DGRAM
) -> bytes:
    """A PROXY v2 header for a datagram from ``source``."""
    if destination is None:
        destination = ("2001:db8::53", 53) if ":" in source[0] else ("203.0.113.1", 53)
    return encode(
        ProxyHeader.proxy(
            InetAddress.of(*source), InetAddress.of(*destination), transport=transport
        )
    )


def show(peer: Peer) -> str:
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class UdpBackend:
    """A UDP server in the namespace that records (peer, payload) and answers ``peer|payload``.

    ``extra_replies`` makes it also send that many unsolicited replies, ``interval`` apart,
    after each datagram (traffic that only flows backend -> client).
    """

    def __init__(self, net: Net, host: str, *, extra_replies: int = 0, interval: float = 0.0):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = net.sockets.call(lambda: socket.socket(family, socket.SOCK_DGRAM))
        self.sock.bind((host, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.host = host
        self.port = int(self.sock.getsockname()[1])
        self.received: list[tuple[Peer, bytes]] = []
        self._extra = extra_replies
        self._interval = interval
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _loop(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(65536)
            except OSError:
                return
            if not data and peer is None:
                return  # shut down
            source = (str(peer[0]), int(peer[1]))
            with self._cond:
                self.received.append((source, data))
                self._cond.notify_all()
            answer = show(source).encode() + b"|" + data
            if data.startswith(b"BIG"):  # asks for the largest possible answer
                answer = (data * (MAX_DATAGRAM // len(data) + 1))[:MAX_DATAGRAM]
            try:
                self.sock.sendto(answer, peer)
                for number in range(self._extra):
                    time.sleep(self._interval)
                    self.sock.sendto(f"extra {number}".encode(), peer)
            except OSError:
                return

    def wait_count(self, count: int, timeout: float = 5.0) -> list[tuple[Peer, bytes]]:
        deadline = Deadline(timeout)
        with self._cond:
            while len(self.received) < count and not deadline.expired():
                self._cond.wait(min(0.05, deadline.remaining()))
            return list(self.received)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        self.sock.close()


class Balancer:
    """A load balancer's UDP socket: sends datagrams to mmproxy, receives the replies."""

    def __init__(self, net: Net, daemon: Daemon, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = net.sockets.call(lambda: socket.socket(family, socket.SOCK_DGRAM))
        self.sock.bind((host, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.settimeout(5)
        self.target = (daemon.host, daemon.port)

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.target)

    def recv(self, timeout: float = 5.0) -> bytes:
        self.sock.settimeout(timeout)
        data, peer = self.sock.recvfrom(65536)
        assert (str(peer[0]), int(peer[1])) == self.target, "the reply came from mmproxy's port"
        return data

    def recv_all(self, quiet: float = 0.5) -> list[bytes]:
        """Everything that arrives until nothing has for ``quiet`` seconds."""
        got = []
        while True:
            try:
                got.append(self.recv(quiet))
            except TimeoutError:
                return got

    def close(self) -> None:
        self.sock.close()


class UdpRig:
    """What every UDP test uses: the namespace, two backends, fake addresses, balancers."""

    def __init__(self, net: Net, mmproxy: StartDaemon, addresses: ClientAddresses) -> None:
        self.net = net
        self.addresses = addresses
        self._mmproxy = mmproxy
        self._backends: list[UdpBackend] = []
        self._balancers: list[Balancer] = []
        self.udp4 = self.backend("127.0.0.1")
        self.udp6 = self.backend("::1")

    def backend(self, host: str, *, extra_replies: int = 0, interval: float = 0.0) -> UdpBackend:
        backend = UdpBackend(self.net, host, extra_replies=extra_replies, interval=interval)
        self._backends.append(backend)
        return backend

    def start(self, *flags: str, udp4: UdpBackend | None = None, **options: Any) -> Daemon:
        """mmproxy -p udp with the two backends as -4/-6 (``udp4`` replaces the IPv4 one)."""
        target4 = (udp4 or self.udp4).target()
        target6 = self.udp6.target()
        return self._mmproxy("-p", "udp", *flags, target4=target4, target6=target6, **options)

    def balancer(self, daemon: Daemon, host: str = "127.0.0.1") -> Balancer:
        balancer = Balancer(self.net, daemon, host)
        self._balancers.append(balancer)
        return balancer

    def close(self) -> None:
        for balancer in self._balancers:
            balancer.close()
        for backend in self._backends:
            backend.close()


@pytest.fixture
def rig(net: Net, mmproxy: StartDaemon, addresses: ClientAddresses) -> Iterator[UdpRig]:
    made = UdpRig(net, mmproxy, addresses)
    yield made
    made.close()


def descriptors(daemon: Daemon) -> int:
    return len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))


def log_lines(daemon: Daemon, msg: str) -> list[dict[str, object]]:
    return [line for line in list(daemon.logs) if line.get("msg") == msg]


# ----------------------------------------------------------------------------- relaying


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_backend_sees_the_client_and_its_reply_reaches_the_balancer(
    rig: UdpRig, family: str
) -> None:
    daemon = rig.start()
    client = rig.addresses.v4() if family == "v4" else rig.addresses.v6()
    backend = rig.udp4 if family == "v4" else rig.udp6
    balancer = rig.balancer(daemon)
    balancer.send(dgram_header(client) + b"query-1")
    balancer.send(dgram_header(client) + b"query-2")
    assert balancer.recv() == show(client).encode() + b"|query-1"
    assert balancer.recv() == show(client).encode() + b"|query-2"
    assert backend.wait_count(2) == [(client, b"query-1"), (client, b"query-2")]
    started = daemon.wait_for(lambda line: line.get("msg") == "new connection")
    assert started[0]["clientAddr"] == show(client)
    assert started[0]["remoteAddr"] == show(balancer.sock.getsockname())
    assert len(log_lines(daemon, "new connection")) == 1, "both datagrams used one flow"


def test_ipv4_mapped_client_goes_to_the_ipv4_target(rig: UdpRig) -> None:
    daemon = rig.start()
    host, port = rig.addresses.v4()
    balancer = rig.balancer(daemon)
    balancer.send(dgram_header((f"::ffff:{host}", port)) + b"mapped")
    assert balancer.recv() == f"{host}:{port}|mapped".encode()
    assert rig.udp4.wait_count(1) == [((host, port), b"mapped")]


def test_two_clients_behind_one_balancer_get_two_flows(rig: UdpRig) -> None:
    """One balancer address, one client per balancer port (as balancers do): replies never mix.

    And the same balancer port speaking for two clients still gets two flows, so the backend
    sees each client as itself.
    """
    daemon = rig.start()
    alice, bob = rig.addresses.v4(), rig.addresses.v4()
    lb_alice, lb_bob = rig.balancer(daemon), rig.balancer(daemon)
    for round_number in range(5):
        lb_alice.send(dgram_header(alice) + f"a{round_number}".encode())
        lb_bob.send(dgram_header(bob) + f"b{round_number}".encode())
    alice_got = [lb_alice.recv() for _ in range(5)]
    bob_got = [lb_bob.recv() for _ in range(5)]
    assert alice_got == [show(alice).encode() + f"|a{n}".encode() for n in range(5)]
    assert bob_got == [show(bob).encode() + f"|b{n}".encode() for n in range(5)]
    assert lb_alice.recv_all(0.3) == []
    assert lb_bob.recv_all(0.3) == []

    carol, dave = rig.addresses.v4(), rig.addresses.v4()
    shared = rig.balancer(daemon)
    shared.send(dgram_header(carol) + b"c")
    shared.send(dgram_header(dave) + b"d")
    replies = sorted([shared.recv(), shared.recv()])
    assert replies == sorted([show(carol).encode() + b"|c", show(dave).encode() + b"|d"])
    peers = {peer for peer, _ in rig.udp4.wait_count(12)}
    assert {alice, bob, carol, dave} <= peers
    # The log line is read by another thread than the reply: wait for it, do not sample.
    started = daemon.wait_for(lambda line: line.get("msg") == "new connection", count=4)
    assert len(started) == 4, daemon.describe()


def test_local_header_is_forwarded_from_mmproxy_itself(rig: UdpRig) -> None:
    """A LOCAL header (the balancer's own traffic, e.g. a health check) is not impersonated."""
    daemon = rig.start()
    balancer = rig.balancer(daemon)
    balancer.send(encode(ProxyHeader.local()) + b"health")
    reply = balancer.recv()
    assert reply.endswith(b"|health")
    ((peer, payload),) = rig.udp4.wait_count(1)
    assert payload == b"health"
    assert peer[0] == "127.0.0.1"


def test_dynamic_destination_sends_to_the_header_destination(rig: UdpRig, tmp_path: Path) -> None:
    other = rig.backend("127.0.0.1")
    subnets = tmp_path / "subnets"
    subnets.write_text("127.0.0.0/8\n")
    daemon = rig.start("-dynamic-destination", "-allowed-subnets", str(subnets))
    client = rig.addresses.v4()
    balancer = rig.balancer(daemon)
    balancer.send(dgram_header(client, ("127.0.0.1", other.port)) + b"dyn")
    assert balancer.recv() == show(client).encode() + b"|dyn"
    assert other.wait_count(1) == [(client, b"dyn")]
    assert rig.udp4.received == []


def test_largest_datagrams_pass_both_ways(rig: UdpRig) -> None:
    """65,507 bytes (the IPv4 maximum) to the backend, header included, and back."""
    daemon = rig.start()
    client = rig.addresses.v4()
    head = dgram_header(client)
    balancer = rig.balancer(daemon)
    inbound = os.urandom(MAX_DATAGRAM - len(head))
    balancer.send(head + inbound)
    request = b"BIG" + os.urandom(100)
    balancer.send(head + request)
    assert rig.udp4.wait_count(2) == [(client, inbound), (client, request)]
    assert balancer.recv() == show(client).encode() + b"|" + inbound
    assert balancer.recv() == (request * 700)[:MAX_DATAGRAM]  # the largest datagram there is


def test_listeners_share_the_port(rig: UdpRig) -> None:
    daemon = rig.start(listeners=3)
    ports = {str(line.get("listenAddr")).rpartition(":")[2] for line in daemon.listening}
    assert len(daemon.listening) == 3
    assert len(ports) == 1
    clients = [rig.addresses.v4() for _ in range(12)]
    for client in clients:
        balancer = rig.balancer(daemon)
        balancer.send(dgram_header(client) + b"x")
        assert balancer.recv() == show(client).encode() + b"|x"
    assert {peer for peer, _ in rig.udp4.wait_count(12)} == set(clients)
    # the kernel spread the 12 balancer ports over the sockets (all on one: p = 3 * 3**-12),
    # each served by its dispatcher's thread, and nothing else holds a thread
    started = daemon.wait_for(lambda line: line.get("msg") == "new connection", count=12)
    assert len({line["listenerNum"] for line in started}) > 1
    with open(f"/proc/{daemon.proc.pid}/status") as status:
        threads = next(int(line.split()[1]) for line in status if line.startswith("Threads:"))
    assert threads == 1 + 3, "the main thread and one per listener"


# ----------------------------------------------------------------------------- expiry


def test_idle_flow_is_closed_and_a_new_datagram_opens_a_new_one(rig: UdpRig) -> None:
    daemon = rig.start("-close-after", "1")
    client = rig.addresses.v4()
    balancer = rig.balancer(daemon)
    idle_fds = descriptors(daemon)
    balancer.send(dgram_header(client) + b"one")
    assert balancer.recv() == show(client).encode() + b"|one"
    assert descriptors(daemon) == idle_fds + 1, "the flow holds one socket"
    closed = daemon.wait_for(lambda line: line.get("msg") == "flow closed", timeout=10)
    assert closed, daemon.describe()
    assert closed[0]["closeReason"] == "idle"
    assert closed[0]["datagramsToTarget"] == 1
    assert closed[0]["datagramsToClient"] == 1
    assert closed[0]["bytesToTarget"] == 3
    # Not before -close-after; the upper bound only says "expired, not kept" on a slow machine.
    assert 1.0 <= float(closed[0]["durationSeconds"]) < 10.0  # type: ignore[arg-type]
    deadline = Deadline(3)
    while descriptors(daemon) != idle_fds and not deadline.expired():
        time.sleep(0.05)
    assert descriptors(daemon) == idle_fds, "the flow's socket is closed"

    balancer.send(dgram_header(client) + b"two")
    assert balancer.recv() == show(client).encode() + b"|two"
    # The log line is read by another thread than the reply: wait for it, do not sample.
    started = daemon.wait_for(lambda line: line.get("msg") == "new connection", count=2)
    assert len(started) == 2, daemon.describe()
    assert rig.udp4.wait_count(2) == [(client, b"one"), (client, b"two")]


def test_replies_keep_a_flow_alive(rig: UdpRig) -> None:
    """Traffic from the backend alone counts as activity: the flow outlives -close-after."""
    chatty = rig.backend("127.0.0.1", extra_replies=8, interval=0.3)
    daemon = rig.start("-close-after", "1", udp4=chatty)
    client = rig.addresses.v4()
    balancer = rig.balancer(daemon)
    balancer.send(dgram_header(client) + b"subscribe")
    got = [balancer.recv() for _ in range(9)]  # the echo, then 8 more over 2.4 s
    assert got[0] == show(client).encode() + b"|subscribe"
    assert got[1:] == [f"extra {n}".encode() for n in range(8)]
    closed = daemon.wait_for(lambda line: line.get("msg") == "flow closed", timeout=10)
    assert closed, daemon.describe()
    assert float(closed[0]["durationSeconds"]) >= 3.0  # type: ignore[arg-type]
    assert len(log_lines(daemon, "new connection")) == 1


# ----------------------------------------------------------------------------- header modes


def test_header_first_mode(rig: UdpRig) -> None:
    """Header on the first datagram only, then 100 without: all arrive with the client's address.

    A header-only datagram announces the flow and is not forwarded itself.
    """
    daemon = rig.start("--udp-header", "first")
    alice, bob = rig.addresses.v4(), rig.addresses.v6()
    lb_alice, lb_bob = rig.balancer(daemon), rig.balancer(daemon)
    lb_alice.send(dgram_header(alice) + b"a-first")
    lb_bob.send(dgram_header(bob))  # header only
    assert lb_alice.recv() == show(alice).encode() + b"|a-first"
    time.sleep(0.1)
    for number in range(100):
        lb_alice.send(f"a{number}".encode())
        lb_bob.send(f"b{number}".encode())
        if number % 20 == 19:
            time.sleep(0.02)  # keep the burst inside socket buffers
    alice_seen = rig.udp4.wait_count(101)
    bob_seen = rig.udp6.wait_count(100)
    assert alice_seen == [(alice, b"a-first")] + [(alice, f"a{n}".encode()) for n in range(100)]
    assert bob_seen == [(bob, f"b{n}".encode()) for n in range(100)]
    assert len(lb_alice.recv_all(0.5)) == 100
    assert len(lb_bob.recv_all(0.5)) == 100


def test_header_first_mode_drops_headerless_datagrams_without_a_flow(rig: UdpRig) -> None:
    daemon = rig.start("--udp-header", "first", verbose=1)
    balancer = rig.balancer(daemon)
    balancer.send(b"orphan")
    dropped = daemon.wait_for(lambda line: line.get("reason") == "no_flow")
    assert dropped, daemon.describe()
    assert dropped[0]["dropDatagram"] is True
    assert rig.udp4.received == []
    assert rig.udp6.received == []


def test_bad_datagrams_are_dropped_and_serving_goes_on(rig: UdpRig) -> None:
    daemon = rig.start(verbose=1)
    balancer = rig.balancer(daemon)
    client = rig.addresses.v4()
    good = dgram_header(client)
    bad = {
        "headerless": b"hello, no header",
        "v1": b"PROXY TCP4 198.51.100.1 203.0.113.1 1000 53\r\npayload",
        "stream": dgram_header(client, transport=Transport.STREAM) + b"payload",
        "truncated": good[:20],
        "bad_family": good[:13] + b"\x55" + good[14:],
        "empty": b"",
    }
    for data in bad.values():
        balancer.send(data)
    balancer.send(good + b"after")
    assert balancer.recv() == show(client).encode() + b"|after"
    assert rig.udp4.wait_count(1) == [(client, b"after")]
    reasons = {
        line.get("reason")
        for line in daemon.wait_for(lambda line: line.get("dropDatagram") is True, count=6)
    }
    assert reasons == {
        "not_proxy_protocol",
        "wrong_version",
        "wrong_transport",
        "incomplete",
        "v2_bad_family",
    }, daemon.describe()


def test_peer_outside_allowed_subnets_is_dropped(rig: UdpRig, tmp_path: Path) -> None:
    allowed = tmp_path / "allowed.txt"
    allowed.write_text("127.0.0.2/32\n")
    daemon = rig.start("-allowed-subnets", str(allowed), verbose=1)
    refused, welcome = rig.balancer(daemon, "127.0.0.1"), rig.balancer(daemon, "127.0.0.2")
    client = rig.addresses.v4()
    refused.send(dgram_header(client) + b"no")
    welcome.send(dgram_header(client) + b"yes")
    assert welcome.recv() == show(client).encode() + b"|yes"
    assert rig.udp4.wait_count(1) == [(client, b"yes")]
    assert daemon.wait_for(lambda line: line.get("reason") == "not_allowed")
    assert refused.recv_all(0.3) == []


def test_flow_limit_drops_new_flows_and_keeps_old_ones(rig: UdpRig) -> None:
    daemon = rig.start("--max-udp-flows", "2")
    first, second, third = rig.addresses.v4(), rig.addresses.v4(), rig.addresses.v4()
    balancer = rig.balancer(daemon)
    for client in (first, second):
        balancer.send(dgram_header(client) + b"in")
        assert balancer.recv() == show(client).encode() + b"|in"
    balancer.send(dgram_header(third) + b"over")
    warned = daemon.wait_for(lambda line: line.get("msg", "").startswith("UDP flow limit"))
    assert warned, daemon.describe()
    assert warned[0]["maxUdpFlows"] == 2
    assert balancer.recv_all(0.3) == []
    balancer.send(dgram_header(first) + b"still")
    assert balancer.recv() == show(first).encode() + b"|still"
    assert third not in {peer for peer, _ in rig.udp4.received}


# ----------------------------------------------------------------------------- load and stop


def test_burst_of_10000_datagrams(rig: UdpRig) -> None:
    """10,000 datagrams from 20 clients as fast as one sender goes: count what arrived.

    UDP may lose datagrams under load, so the test reports the loss rather than hiding it, and
    fails only if it is large or if anything arrived changed, duplicated or from the wrong source.
    """
    daemon = rig.start(verbose=0)
    clients = [rig.addresses.v4() for _ in range(20)]
    heads = [dgram_header(client) for client in clients]
    balancer = rig.balancer(daemon)
    total = 10_000
    started = time.monotonic()
    for number in range(total):
        index = number % len(clients)
        balancer.send(heads[index] + number.to_bytes(4, "big"))
    sent_in = time.monotonic() - started
    seen = rig.udp4.wait_count(total, timeout=20)
    arrived = {int.from_bytes(payload, "big"): peer for peer, payload in seen}
    assert len(arrived) == len(seen), "no datagram arrived twice"
    assert all(peer == clients[n % len(clients)] for n, peer in arrived.items())
    loss = 1 - len(arrived) / total
    print(f"UDP burst: {len(arrived)}/{total} arrived ({loss:.2%} lost), sent in {sent_in:.2f}s")
    assert loss < 0.05, f"{total - len(arrived)} of {total} datagrams lost"
    assert descriptors(daemon) < 64


def test_sigterm_closes_flows_and_exits_cleanly(rig: UdpRig) -> None:
    daemon = rig.start()
    balancer = rig.balancer(daemon)
    for _ in range(5):
        client = rig.addresses.v4()
        balancer.send(dgram_header(client) + b"hi")
        assert balancer.recv() == show(client).encode() + b"|hi"
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(5) == 0, daemon.describe()
    closed = log_lines(daemon, "flow closed")
    assert len(closed) == 5
    assert {line["closeReason"] for line in closed} == {"stopping"}
    (totals,) = log_lines(daemon, "udp totals")
    assert totals["received"] == 5
    assert totals["forwarded"] == 5
    assert totals["replies"] == 5


def test_metrics_count_flows_and_datagrams(rig: UdpRig) -> None:
    """``--metrics`` in UDP mode: flows opened and open, datagrams each way, drops by reason."""
    daemon = rig.start("--metrics", "127.0.0.1:0")
    address = metrics_address(daemon)
    balancer = rig.balancer(daemon)
    clients = [rig.addresses.v4() for _ in range(3)]
    for client in clients:
        balancer.send(dgram_header(client) + b"m")
        assert balancer.recv() == show(client).encode() + b"|m"
    balancer.send(b"no header")
    samples = scrape_until(
        rig.net,
        address,
        lambda s: value(s, "mmproxy_udp_datagrams_dropped_total", reason="not_proxy_protocol") == 1,
    )
    assert value(samples, "mmproxy_udp_flows_opened_total") == 3
    assert value(samples, "mmproxy_udp_flows_active") == 3
    assert value(samples, "mmproxy_udp_datagrams_total", direction="to_target") == 3
    assert value(samples, "mmproxy_udp_datagrams_total", direction="to_client") == 3
    assert value(samples, "mmproxy_udp_datagrams_dropped_total", reason="not_proxy_protocol") == 1


def test_sighup_reloads_the_allowed_subnets_for_every_datagram(rig: UdpRig, tmp_path: Path) -> None:
    """UDP checks each datagram, so a reload applies at once, to flows already open too."""
    allowed = tmp_path / "allowed.txt"
    allowed.write_text("127.0.0.2/32\n")
    daemon = rig.start("-allowed-subnets", str(allowed), verbose=1)
    first, second = rig.balancer(daemon, "127.0.0.1"), rig.balancer(daemon, "127.0.0.2")
    client = rig.addresses.v4()
    second.send(dgram_header(client) + b"before")
    assert second.recv() == show(client).encode() + b"|before"
    first.send(dgram_header(rig.addresses.v4()) + b"refused")
    assert daemon.wait_for(lambda line: line.get("reason") == "not_allowed")

    allowed.write_text("127.0.0.1/32\n")
    daemon.hup()
    assert daemon.wait_for(lambda line: line.get("msg") == "allowed subnets reloaded")
    newcomer = rig.addresses.v4()
    first.send(dgram_header(newcomer) + b"now")
    assert first.recv() == show(newcomer).encode() + b"|now"
    second.send(dgram_header(client) + b"after")
    assert second.recv_all(0.3) == []
    refusals = daemon.wait_for(lambda line: line.get("reason") == "not_allowed", count=2)
    assert len(refusals) == 2, daemon.describe()
