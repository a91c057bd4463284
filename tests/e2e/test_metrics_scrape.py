"""``--metrics``: the numbers a scrape shows after real connections, and the server's lifetime.

The scrape is a plain HTTP GET from inside the namespace, parsed with prometheus_client's own
text parser, so the test reads what Prometheus would read.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from daemon_runner import Daemon, StartDaemon
from netns import (
    Backend,
    ClientAddresses,
    Deadline,
    Net,
    exchange,
    recv_to_eof,
    wait_accept_queue,
    wait_closed,
)
from prometheus_client.parser import text_string_to_metric_families
from test_tcp import connect, header, send_allowing_reset

from mmproxy.metrics import METRICS_WORKERS

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(net: Net, address: str) -> Samples:
    host, _, port = address.rpartition(":")
    with net.sockets.connect((host.strip("[]"), int(port))) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: mmproxy\r\nConnection: close\r\n\r\n")
        response = recv_to_eof(sock, Deadline(10))
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].endswith(b"200 OK"), head
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scrape_until(
    net: Net, address: str, done: Callable[[Samples], bool], timeout: float = 10.0
) -> Samples:
    """Scrape until ``done`` holds: a connection's counters move when its threads finish."""
    deadline = Deadline(timeout)
    while True:
        samples = scrape(net, address)
        if done(samples) or deadline.expired():
            return samples
        time.sleep(min(0.1, deadline.remaining()))


def metrics_address(daemon: Daemon) -> str:
    (line,) = daemon.wait_for(lambda line: line.get("msg") == "serving metrics", timeout=10)
    return str(line["metricsAddr"])


def from_address(net: Net, source: str, target: tuple[str, int]) -> socket.socket:
    """A connection to mmproxy from a chosen loopback address (any of 127/8 is local)."""

    def bound() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((source, 0))
        return sock

    sock = net.sockets.call(bound)
    try:
        sock.settimeout(10)
        sock.connect(target)
    except BaseException:
        sock.close()
        raise
    return sock


def test_connection_outcomes_are_counted(
    net: Net,
    mmproxy: StartDaemon,
    backend4: Backend,
    addresses: ClientAddresses,
    tmp_path: Path,
) -> None:
    """One relayed connection, one refused by the allowed subnets, one bad header, one whose
    backend is down: each shows up in its own counter, and the relayed one's bytes too."""
    subnets = tmp_path / "allowed-subnets.txt"
    subnets.write_text("127.0.0.1/32\n")
    daemon = mmproxy(
        "--metrics", "127.0.0.1:0", "-allowed-subnets", str(subnets), target6="[::1]:1"
    )  # [::1]:1 has no listener: IPv6 clients fail upstream
    address = metrics_address(daemon)
    before = scrape(net, address)
    assert value(before, "mmproxy_connections_accepted_total") == 0
    assert value(before, "mmproxy_connections_active") == 0
    assert value(before, "mmproxy_header_errors_total", reason="not_proxy_protocol") == 0

    # Relayed: the gauge shows it while it is open.
    source = addresses.v4()
    with connect(net, daemon) as sock:
        sock.sendall(header(source, ("203.0.113.1", 443), 2) + b"hello ")
        backend4.wait_connections(1)
        live = scrape_until(net, address, lambda s: value(s, "mmproxy_connections_active") == 1)
        assert value(live, "mmproxy_connections_active") == 1
        assert exchange(sock, b"metrics", Deadline(10)) == b"hello metrics"
    # Refused: 127.0.0.2 is not in the allowed subnets.
    with from_address(net, "127.0.0.2", (daemon.host, daemon.port)) as sock:
        assert wait_closed(sock, 10) < 10
    # Bad header.
    with connect(net, daemon) as sock:
        send_allowing_reset(sock, b"GET / HTTP/1.0\r\n\r\n")
        assert wait_closed(sock, 10) < 10
    # Upstream down.
    with connect(net, daemon) as sock:
        send_allowing_reset(sock, header(addresses.v6(), ("2001:db8::1", 443), 1))
        assert wait_closed(sock, 15) < 15

    samples = scrape_until(
        net,
        address,
        lambda s: (
            value(s, "mmproxy_upstream_connect_failures_total") == 1
            and value(s, "mmproxy_connections_active") == 0
        ),
    )
    assert value(samples, "mmproxy_connections_accepted_total") == 4
    assert value(samples, "mmproxy_connections_refused_total", reason="not_allowed") == 1
    assert value(samples, "mmproxy_accept_pauses_total") == 0
    assert value(samples, "mmproxy_header_errors_total", reason="not_proxy_protocol") == 1
    assert value(samples, "mmproxy_header_errors_total", reason="v1_bad_syntax") == 0
    assert value(samples, "mmproxy_upstream_connect_failures_total") == 1
    assert value(samples, "mmproxy_connections_relayed_total") == 1
    assert value(samples, "mmproxy_connections_active") == 0
    assert value(samples, "mmproxy_relayed_bytes_total", direction="to_target") == len(
        b"hello metrics"
    )
    assert value(samples, "mmproxy_relayed_bytes_total", direction="to_client") == len(
        b"hello metrics"
    )
    # Two headers were complete: the relayed one and the one whose backend was down.
    assert value(samples, "mmproxy_header_parse_seconds_count") == 2
    assert value(samples, "mmproxy_header_parse_seconds_bucket", le="+Inf") == 2
    assert value(samples, "mmproxy_udp_flows_active") == 0
    assert value(samples, "mmproxy_udp_datagrams_total", direction="to_target") == 0
    assert value(samples, "process_open_fds") is not None
    assert daemon.stop() == 0


def test_metrics_server_stops_with_the_daemon(net: Net, mmproxy: StartDaemon) -> None:
    daemon = mmproxy("--metrics", "127.0.0.1:0")
    address = metrics_address(daemon)
    assert value(scrape(net, address), "mmproxy_connections_accepted_total") == 0
    assert daemon.stop() == 0
    host, _, port = address.rpartition(":")
    with pytest.raises(ConnectionRefusedError):
        net.sockets.connect((host, int(port)), timeout=5).close()


def test_without_the_flag_nothing_is_served(net: Net, mmproxy: StartDaemon) -> None:
    daemon = mmproxy()
    assert daemon.wait_for(lambda line: line.get("msg") == "ready", timeout=10)
    assert not [line for line in daemon.logs if line.get("msg") == "serving metrics"]


def test_metrics_address_in_use_stops_start_up(net: Net, backend4: Backend) -> None:
    """A metrics port that cannot be bound is a start-up failure: one ERROR line, exit 1."""
    taken = net.sockets.server("127.0.0.1")
    try:
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                *("ip", "netns", "exec", net.ns.name, sys.executable, "-m", "mmproxy"),
                *("-l", "127.0.0.1:0", "-4", backend4.target(), "--metrics", f"127.0.0.1:{port}"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            cwd="/",
            check=False,
        )
    finally:
        taken.close()
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stdout.splitlines() if '"ERROR"' in line]
    assert len(errors) == 1, done.stdout
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in errors[0]


def test_metrics_server_answers_from_a_bounded_pool(net: Net, mmproxy: StartDaemon) -> None:
    """Scrapers that connect and say nothing take the few metrics workers; more of them wait
    in the kernel's backlog (a thread each before), and once they go a scrape is answered."""
    daemon = mmproxy("--metrics", "127.0.0.1:0")
    address = metrics_address(daemon)
    host, _, port = address.rpartition(":")
    silent = []
    try:
        for _ in range(METRICS_WORKERS + 6):
            silent.append(net.sockets.connect((host, int(port))))  # noqa: PERF401 - closed below
        # 4 with the workers, 1 with the accepting thread (waiting for a worker), 5 queued.
        assert wait_accept_queue(net.ns, int(port), 5) >= 5
        for sock in silent:
            sock.close()
        silent.clear()
        samples = scrape(net, address)
        assert value(samples, "mmproxy_connections_accepted_total") == 0
    finally:
        for sock in silent:
            sock.close()
