"""UDP under load: a burst of new flows, many open flows on few threads, a route-cache flood.

The rig (namespace, echo backends, balancers) is test_udp's.  Every loop is bounded in count
and time; fake clients come from the documentation ranges.
"""

from __future__ import annotations

import random

from test_udp import UdpRig, dgram_header, rig, show  # noqa: F401 - rig is a fixture

from mmproxy.protocol import InetAddress, ProxyHeader, Transport, encode
from mmproxy.tlv import Noop

BURST = 2000
MAX_THREADS = 16


def status(pid: int, field: str) -> int:
    """A number from /proc/PID/status (``Threads``, ``VmRSS`` in KiB)."""
    with open(f"/proc/{pid}/status") as lines:
        for line in lines:
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0])
    raise KeyError(field)


def test_burst_of_first_datagrams_from_2000_clients_all_arrive(rig: UdpRig) -> None:  # noqa: F811
    """2,000 clients' first datagrams at once: every one reaches the backend as its client,
    every echo comes back, and the 2,000 open flows hold no thread each."""
    daemon = rig.start(verbose=0)
    clients = [rig.addresses.v4(prefix) for prefix in ("192.0.2", "198.51.100", "203.0.113")]
    clients += [rig.addresses.v4() for _ in range(BURST - len(clients))]
    balancers = [rig.balancer(daemon) for _ in range(4)]
    for number, client in enumerate(clients):
        balancers[number % 4].send(dgram_header(client) + number.to_bytes(4, "big"))
    seen = rig.udp4.wait_count(BURST, timeout=30)
    arrived = {int.from_bytes(payload, "big"): peer for peer, payload in seen}
    assert len(seen) == BURST, f"{BURST - len(seen)} of {BURST} first datagrams lost"
    assert arrived == dict(enumerate(clients)), "each arrived once, from its own client"
    threads = status(daemon.proc.pid, "Threads")
    assert threads <= MAX_THREADS, f"{threads} threads for {BURST} open flows"
    replies = [sorted(balancer.recv_all(1.0)) for balancer in balancers]
    for index, got in enumerate(replies):
        expected = [
            show(client).encode() + b"|" + number.to_bytes(4, "big")
            for number, client in enumerate(clients)
            if number % 4 == index
        ]
        assert got == sorted(expected)


def padded_header(client: tuple[str, int], padding: bytes) -> bytes:
    """A v2 DGRAM header for ``client`` with ``padding`` in a NOOP TLV."""
    source, destination = InetAddress.of(*client), InetAddress.of("203.0.113.1", 53)
    return encode(
        ProxyHeader.proxy(source, destination, transport=Transport.DGRAM, tlvs=(Noop(padding),))
    )


def test_flood_of_distinct_padded_headers_keeps_rss_flat(rig: UdpRig) -> None:  # noqa: F811
    """10,000 datagrams whose headers differ in kilobytes of padding, for 8 flows: every one
    is delivered, and the daemon's memory does not grow with them (a cache keyed by the raw
    header would hold ~80 MB of them)."""
    daemon = rig.start(verbose=0)
    clients = [rig.addresses.v4() for _ in range(8)]
    balancer = rig.balancer(daemon)
    pick = random.Random(15)
    sent = 0

    def flood(count: int) -> None:
        nonlocal sent
        for _ in range(count // 100):
            for _ in range(100):
                client = clients[sent % len(clients)]
                padding = sent.to_bytes(4, "big") * pick.randrange(250, 4000)
                balancer.send(padded_header(client, padding) + b"%d" % sent)
                sent += 1
            assert len(rig.udp4.wait_count(sent, timeout=10)) == sent, daemon.describe()
        balancer.recv_all(0.2)  # the echoes

    flood(1000)  # warm up: the flows open, the allocator settles
    before = status(daemon.proc.pid, "VmRSS")
    flood(10_000)
    after = status(daemon.proc.pid, "VmRSS")
    assert after - before < 4096, f"RSS grew from {before} KiB to {after} KiB"
    assert {peer for peer, _ in rig.udp4.received} == set(clients)
