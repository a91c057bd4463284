"""The trust model end to end (README: Security): forged sources, dynamic destinations.

Each test checks what the backend saw (nothing, for a refusal) and why mmproxy refused (the
log's ``reason``, and with ``--metrics`` the counter), for TCP and for UDP.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from daemon_runner import HEADER_TIMEOUT, Daemon, StartDaemon
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
from test_metrics_scrape import metrics_address, scrape_until, value
from test_tcp import connect, header, send_allowing_reset
from test_udp import UdpRig, dgram_header, rig, show  # noqa: F401 - rig is a fixture

from mmproxy.protocol import InetAddress, ProxyHeader, encode

# Sources no real client can have, each paired with a destination of its family.
FORGED = [
    ("127.0.0.5", "203.0.113.1"),
    ("::1", "2001:db8::1"),
    ("0.0.0.0", "203.0.113.1"),
    ("::", "2001:db8::1"),
    ("224.0.0.1", "203.0.113.1"),
    ("ff02::1", "2001:db8::1"),
    ("255.255.255.255", "203.0.113.1"),
    ("::ffff:127.0.0.1", "::ffff:203.0.113.1"),
]


def subnets_file(tmp_path: Path, *lines: str, name: str = "subnets") -> str:
    path = tmp_path / name
    path.write_text("".join(f"{line}\n" for line in lines))
    return str(path)


def refusals(daemon: Daemon, reason: str, count: int) -> list[dict[str, object]]:
    return daemon.wait_for(lambda line: line.get("reason") == reason, count=count, timeout=10)


# ------------------------------------------------------------------ start-up


def run_mmproxy(*flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mmproxy", *flags],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        check=False,
    )


def test_dynamic_destination_without_allowed_subnets_does_not_start() -> None:
    """An open relay is refused at start-up: one line saying why, non-zero exit."""
    done = run_mmproxy("-l", "127.0.0.1:0", "-dynamic-destination")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "-dynamic-destination" in lines[0]
    assert "-allowed-subnets" in lines[0]


def test_a_bad_allowed_destinations_file_does_not_start(tmp_path: Path) -> None:
    subnets = subnets_file(tmp_path, "127.0.0.0/8")
    bad = subnets_file(tmp_path, "10.0.0.0/33", name="destinations")
    done = run_mmproxy(
        *("-l", "127.0.0.1:0", "-allowed-subnets", subnets, "-dynamic-destination"),
        *("--allowed-destinations", bad),
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "--allowed-destinations" in lines[0]
    assert f"{bad}:1" in lines[0]


# ------------------------------------------------------------------ forged sources, TCP


def test_tcp_forged_sources_are_refused_and_counted(
    net: Net, mmproxy: StartDaemon, backend4: Backend, backend6: Backend, addresses: ClientAddresses
) -> None:
    """A header claiming loopback, unspecified, multicast or broadcast is closed at once.

    The backend sees none of them (today's main relays 127.0.0.5 and ::1, so a "trust
    localhost" backend would trust them); a real client after them is still relayed.
    """
    daemon = mmproxy("--metrics", "127.0.0.1:0", verbose=1)
    for source, destination in FORGED:
        wire = header((source, 40000), (destination, 443), 2)
        with connect(net, daemon) as sock:
            send_allowing_reset(sock, wire + b"data")
            wait_closed(sock, HEADER_TIMEOUT + 10)
    refused = refusals(daemon, "bad_source", len(FORGED))
    assert len(refused) == len(FORGED), daemon.describe()
    assert backend4.peers() == []
    assert backend6.peers() == []
    samples = scrape_until(
        net,
        metrics_address(daemon),
        lambda s: value(s, "mmproxy_header_errors_total", reason="bad_source") == len(FORGED),
    )
    assert value(samples, "mmproxy_header_errors_total", reason="bad_source") == len(FORGED)
    real = addresses.v4()
    with connect(net, daemon) as sock:
        sock.sendall(header(real, ("203.0.113.1", 443), 1))
        assert exchange(sock, b"still serving", Deadline(10)) == b"still serving"
    assert backend4.peers() == [real]


def test_tcp_local_header_from_loopback_is_still_relayed(
    net: Net, mmproxy: StartDaemon, backend4: Backend
) -> None:
    """LOCAL carries no claim: the balancer's own loopback address is what the backend sees."""
    daemon = mmproxy()
    with connect(net, daemon) as sock:
        sock.sendall(encode(ProxyHeader.local()))
        assert exchange(sock, b"health", Deadline(10)) == b"health"
    ((host, _port),) = backend4.peers()
    assert host == "127.0.0.1"


# ------------------------------------------------------------------ destinations, TCP


def test_tcp_dynamic_destination_only_reaches_this_hosts_addresses(
    net: Net, mmproxy: StartDaemon, addresses: ClientAddresses, tmp_path: Path
) -> None:
    """Cloud metadata, another host: refused before any connect; a local backend: relayed."""
    local_backend = Backend(net.sockets, "127.0.0.2")
    try:
        subnets = subnets_file(tmp_path, "127.0.0.0/8")
        daemon = mmproxy(
            "-dynamic-destination", "-allowed-subnets", subnets, "--metrics", "127.0.0.1:0"
        )
        for outside in (("169.254.169.254", 80), ("192.0.2.10", 443)):
            with connect(net, daemon) as sock:
                send_allowing_reset(sock, header(addresses.v4(), outside, 2) + b"GET /")
                wait_closed(sock, 10)
        refused = refusals(daemon, "bad_destination", 2)
        assert len(refused) == 2, daemon.describe()
        assert "not an address of this host" in str(refused[0].get("error"))
        assert not daemon.wait_for(lambda line: line.get("reason") == "upstream_failed", timeout=0)
        samples = scrape_until(
            net,
            metrics_address(daemon),
            lambda s: value(s, "mmproxy_header_errors_total", reason="bad_destination") == 2,
        )
        assert value(samples, "mmproxy_upstream_connect_failures_total") == 0
        source = addresses.v4()
        with connect(net, daemon) as sock:
            sock.sendall(header(source, local_backend.address, 2))
            assert exchange(sock, b"local", Deadline(10)) == b"local"
        assert local_backend.peers() == [source]
    finally:
        local_backend.close()


def test_tcp_allowed_destinations_file_decides_and_reloads_on_sighup(
    net: Net, mmproxy: StartDaemon, addresses: ClientAddresses, tmp_path: Path
) -> None:
    """The file replaces the local rule; SIGHUP puts an edited file in force."""
    other = Backend(net.sockets, "127.0.0.3")
    try:
        subnets = subnets_file(tmp_path, "127.0.0.0/8")
        destinations = subnets_file(tmp_path, "192.0.2.0/24", name="destinations")
        daemon = mmproxy(
            "-dynamic-destination",
            *("-allowed-subnets", subnets, "--allowed-destinations", destinations),
        )
        with connect(net, daemon) as sock:
            send_allowing_reset(sock, header(addresses.v4(), other.address, 2))
            wait_closed(sock, 10)
        refused = refusals(daemon, "bad_destination", 1)
        assert "not in --allowed-destinations" in str(refused[0].get("error"))
        assert other.peers() == []

        Path(destinations).write_text("127.0.0.3/32\n")
        daemon.hup()
        assert daemon.wait_for(lambda line: line.get("msg") == "allowed destinations reloaded")
        source = addresses.v4()
        with connect(net, daemon) as sock:
            sock.sendall(header(source, other.address, 2))
            assert exchange(sock, b"listed", Deadline(10)) == b"listed"
        assert other.peers() == [source]
    finally:
        other.close()


ANYIP = "203.0.113.0/25"  # routed to this host by a "local" route in main, not in the local table
ADDED = "203.0.113.200"  # put on lo during the test: then it is in the local table


def test_tcp_destinations_follow_the_hosts_addresses(
    mmproxy: StartDaemon, addresses: ClientAddresses, tmp_path: Path
) -> None:
    """What the local table holds decides, as it changes, and nothing else routed here does.

    In a namespace of its own, 203.0.113.0/25 reaches a backend on 0.0.0.0 through a local
    route in the main table, so a connect there would succeed: mmproxy still refuses it, since
    it is not an address of this host.  203.0.113.200 is refused until it is added to lo, and
    refused again once it is removed.
    """
    with namespace(f"mmproxy-anyip-{os.getpid()}") as (ns, sockets):
        ns.ip("route", "add", "local", ANYIP, "dev", "lo", "table", "main")
        ns.ip("rule", "add", "from", "203.0.113.0/24", "iif", "lo", "lookup", "123")
        backend = Backend(sockets, "0.0.0.0")
        try:
            subnets = subnets_file(tmp_path, "127.0.0.0/8")
            daemon = mmproxy("-dynamic-destination", "-allowed-subnets", subnets, ns=ns)

            def attempt(destination: str) -> str:
                """ "relayed", "refused" (bad_destination) or "failed" (anything else)."""
                before = len(refusals(daemon, "bad_destination", 0))
                source = addresses.v4()
                with sockets.connect((daemon.host, daemon.port)) as sock:
                    send_allowing_reset(sock, header(source, (destination, backend.port), 2))
                    try:
                        got = exchange(sock, b"x", Deadline(10))
                    except OSError:
                        got = b""
                if got == b"x" and source in backend.peers():
                    return "relayed"
                if len(refusals(daemon, "bad_destination", before + 1)) > before:
                    return "refused"
                return "failed"

            def until(destination: str, outcome: str) -> None:
                deadline = Deadline(15)  # the local table is re-read at most once a second
                while attempt(destination) != outcome:
                    assert not deadline.expired(), f"{destination} never got {outcome}"
                    time.sleep(0.1)

            assert attempt("203.0.113.5") == "refused"
            assert backend.peers() == []
            assert attempt(ADDED) == "refused"
            ns.ip("addr", "add", f"{ADDED}/32", "dev", "lo")
            until(ADDED, "relayed")
            ns.ip("addr", "del", f"{ADDED}/32", "dev", "lo")
            until(ADDED, "refused")
        finally:
            backend.close()


# ------------------------------------------------------------------ resource bounds, TCP


def test_max_connections_pauses_accepting_then_resumes(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """At --max-connections the acceptor stops calling accept(): further connections wait in
    the kernel's backlog (not in threads here), the pause shows in the metrics and in one
    warning, and each slot that frees lets the next waiting connection in, in order."""
    cap, extra = 3, 10
    daemon = mmproxy("--max-connections", str(cap), "--metrics", "127.0.0.1:0", verbose=1)
    (ready,) = daemon.wait_for(lambda line: line.get("msg") == "ready", timeout=10)
    assert ready["maxConnections"] == cap
    assert ready["maxWorkers"] == 2 * cap + 16
    held = []
    waiting = []
    try:
        for _ in range(cap):
            sock = connect(net, daemon)
            held.append(sock)
            sock.sendall(header(addresses.v4(), ("203.0.113.1", 443), 1) + b"h")
            sock.settimeout(10)
            assert sock.recv(1) == b"h"  # relayed, and held open
        for _ in range(extra):
            sock = connect(net, daemon)
            waiting.append(sock)
            sock.sendall(header(addresses.v4(), ("203.0.113.1", 443), 1) + b"w")
        assert wait_accept_queue(net.ns, daemon.port, extra) == extra, daemon.describe()
        samples = scrape_until(
            net, metrics_address(daemon), lambda s: value(s, "mmproxy_accept_paused") == 1
        )
        assert value(samples, "mmproxy_accept_paused") == 1
        assert value(samples, "mmproxy_accept_pauses_total") == 1
        assert value(samples, "mmproxy_max_connections") == cap
        workers = value(samples, "mmproxy_worker_threads")
        assert workers is not None
        assert workers <= 2 * cap + 16
        warnings = daemon.wait_for(lambda line: "connection limit" in str(line.get("msg")))
        assert len(warnings) == 1, daemon.describe()
        assert warnings[0]["level"] == "WARN"
        assert len(backend4.peers()) == cap

        for sock in held:  # each slot that frees admits the oldest waiting connection
            sock.close()
        held.clear()
        for sock in waiting:
            sock.settimeout(10)
            assert sock.recv(1) == b"w"
            sock.close()
        assert len(backend4.peers()) == cap + extra
        samples = scrape_until(
            net, metrics_address(daemon), lambda s: value(s, "mmproxy_accept_paused") == 0
        )
        assert value(samples, "mmproxy_accept_paused") == 0
    finally:
        for sock in held + waiting:
            sock.close()


# ------------------------------------------------------------------ UDP


def test_udp_forged_sources_are_dropped(rig: UdpRig) -> None:  # noqa: F811
    daemon = rig.start("--metrics", "127.0.0.1:0", verbose=1)
    balancer = rig.balancer(daemon)
    for source, destination in FORGED:
        balancer.send(dgram_header((source, 5353), (destination, 53)) + b"forged")
    refused = refusals(daemon, "bad_source", len(FORGED))
    assert len(refused) == len(FORGED), daemon.describe()
    samples = scrape_until(
        rig.net,
        metrics_address(daemon),
        lambda s: (
            value(s, "mmproxy_udp_datagrams_dropped_total", reason="bad_source") == len(FORGED)
        ),
    )
    assert value(samples, "mmproxy_udp_datagrams_dropped_total", reason="bad_source") == len(FORGED)
    real = rig.addresses.v4()
    balancer.send(dgram_header(real) + b"real")
    assert balancer.recv() == show(real).encode() + b"|real"
    assert rig.udp4.wait_count(1) == [(real, b"real")]
    assert rig.udp6.received == []


def test_udp_dynamic_destination_is_checked_and_follows_reloads(
    rig: UdpRig,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Not local: dropped.  Listed after a SIGHUP: relayed; unlisted again: dropped again.

    The same header bytes each time, so the dispatcher's route cache must follow the reload.
    """
    other = rig.backend("127.0.0.1")
    subnets = subnets_file(tmp_path, "127.0.0.0/8")
    daemon = rig.start("-dynamic-destination", "-allowed-subnets", subnets, verbose=1)
    balancer = rig.balancer(daemon)
    balancer.send(dgram_header(rig.addresses.v4(), ("169.254.169.254", 53)) + b"metadata")
    assert len(refusals(daemon, "bad_destination", 1)) == 1, daemon.describe()
    daemon.stop()

    destinations = subnets_file(tmp_path, "192.0.2.0/24", name="destinations")
    daemon = rig.start(
        "-dynamic-destination",
        *("-allowed-subnets", subnets, "--allowed-destinations", destinations),
        verbose=1,
    )
    balancer = rig.balancer(daemon)
    client = rig.addresses.v4()
    wire = dgram_header(client, ("127.0.0.1", other.port))
    balancer.send(wire + b"one")
    refused = refusals(daemon, "bad_destination", 1)
    assert "not in --allowed-destinations" in str(refused[0].get("error"))

    Path(destinations).write_text("127.0.0.1/32\n")
    daemon.hup()
    assert daemon.wait_for(lambda line: line.get("msg") == "allowed destinations reloaded")
    balancer.send(wire + b"two")
    assert balancer.recv() == show(client).encode() + b"|two"

    Path(destinations).write_text("192.0.2.0/24\n")
    daemon.hup()
    assert (
        len(daemon.wait_for(lambda line: line.get("msg") == "allowed destinations reloaded", 2))
        == 2
    )
    balancer.send(wire + b"three")
    assert len(refusals(daemon, "bad_destination", 2)) == 2, daemon.describe()
    assert other.wait_count(1) == [(client, b"two")]
    assert rig.udp4.received == []


def test_udp_local_header_from_loopback_is_still_relayed(rig: UdpRig) -> None:  # noqa: F811
    daemon = rig.start()
    balancer = rig.balancer(daemon)
    balancer.send(encode(ProxyHeader.local()) + b"health")
    assert balancer.recv().endswith(b"|health")


_ = InetAddress  # imported for readers of the header helpers


def test_stopping_while_paused_at_the_cap_ends_the_pause(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """SIGTERM while accepting is paused at --max-connections: the daemon stops admitting,
    so the pause gauge falls back to 0 while the held connection drains."""
    daemon = mmproxy("--max-connections", "1", "--metrics", "127.0.0.1:0", verbose=1)
    with connect(net, daemon) as held, connect(net, daemon) as waiting:
        held.sendall(header(addresses.v4(), ("203.0.113.1", 443), 1) + b"h")
        held.settimeout(10)
        assert held.recv(1) == b"h"
        waiting.sendall(header(addresses.v4(), ("203.0.113.1", 443), 1) + b"w")
        assert wait_accept_queue(net.ns, daemon.port, 1) == 1, daemon.describe()
        scrape_until(net, metrics_address(daemon), lambda s: value(s, "mmproxy_accept_paused") == 1)
        daemon.signal(signal.SIGTERM)  # the held connection keeps it draining (3 s)
        samples = scrape_until(
            net, metrics_address(daemon), lambda s: value(s, "mmproxy_accept_paused") == 0
        )
        assert value(samples, "mmproxy_accept_paused") == 0
        assert value(samples, "mmproxy_accept_pauses_total") == 1
    assert daemon.wait(10) == 0
