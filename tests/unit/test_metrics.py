"""Metrics: what each data-path call counts, private registries, and the scrape server."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mmproxy import __version__
from mmproxy.config import Endpoint
from mmproxy.errors import Reason, Refusal
from mmproxy.metrics import (
    DROP_REASONS,
    HEADER_REASONS,
    NO_METRICS,
    REFUSED_REASONS,
    TO_CLIENT,
    TO_TARGET,
    Metrics,
    MetricsServer,
    PrometheusMetrics,
)


def value(metrics: PrometheusMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_connection_outcomes_are_counted() -> None:
    metrics = PrometheusMetrics()
    for _ in range(3):
        metrics.accepted()
    metrics.refused(Refusal.NOT_ALLOWED)
    metrics.header_error(Reason.V1_BAD_SYNTAX)
    metrics.header_error(Refusal.READ_ERROR)
    metrics.upstream_failed()
    assert value(metrics, "mmproxy_connections_accepted_total") == 3
    assert value(metrics, "mmproxy_connections_refused_total", reason="not_allowed") == 1
    assert value(metrics, "mmproxy_connections_refused_total", reason="connection_limit") is None
    assert value(metrics, "mmproxy_header_errors_total", reason="v1_bad_syntax") == 1
    assert value(metrics, "mmproxy_header_errors_total", reason="read_error") == 1
    assert value(metrics, "mmproxy_header_errors_total", reason="v2_bad_crc") == 0
    assert value(metrics, "mmproxy_upstream_connect_failures_total") == 1


def test_every_known_reason_is_exported_from_the_start() -> None:
    metrics = PrometheusMetrics()
    for reason in HEADER_REASONS:
        assert value(metrics, "mmproxy_header_errors_total", reason=reason) == 0, reason
    for reason in REFUSED_REASONS:
        assert value(metrics, "mmproxy_connections_refused_total", reason=reason) == 0
    for reason in DROP_REASONS:
        assert value(metrics, "mmproxy_udp_datagrams_dropped_total", reason=reason) == 0, reason
    for direction in (TO_TARGET, TO_CLIENT):
        assert value(metrics, "mmproxy_relayed_bytes_total", direction=direction) == 0
        assert value(metrics, "mmproxy_udp_datagrams_total", direction=direction) == 0


def test_relayed_connections_and_bytes() -> None:
    metrics = PrometheusMetrics()
    metrics.opened()
    metrics.opened()
    assert value(metrics, "mmproxy_connections_active") == 2
    metrics.closed(100, 7)
    assert value(metrics, "mmproxy_connections_active") == 1
    assert value(metrics, "mmproxy_connections_relayed_total") == 2
    assert value(metrics, "mmproxy_relayed_bytes_total", direction="to_target") == 100
    assert value(metrics, "mmproxy_relayed_bytes_total", direction="to_client") == 7


def test_header_parse_time_histogram() -> None:
    metrics = PrometheusMetrics()
    metrics.header_parsed(0.0002)
    metrics.header_parsed(0.3)
    assert value(metrics, "mmproxy_header_parse_seconds_count") == 2
    assert value(metrics, "mmproxy_header_parse_seconds_bucket", le="0.0005") == 1
    assert value(metrics, "mmproxy_header_parse_seconds_bucket", le="0.5") == 2
    assert value(metrics, "mmproxy_header_parse_seconds_sum") == pytest.approx(0.3002)


def test_udp_flows_and_datagrams() -> None:
    metrics = PrometheusMetrics()
    metrics.udp_flow_opened()
    metrics.udp_flow_opened()
    metrics.udp_flow_closed()
    metrics.udp_datagram(TO_TARGET)
    metrics.udp_datagram(TO_TARGET)
    metrics.udp_datagram(TO_CLIENT)
    assert value(metrics, "mmproxy_udp_flows_active") == 1
    assert value(metrics, "mmproxy_udp_flows_opened_total") == 2
    assert value(metrics, "mmproxy_udp_datagrams_total", direction="to_target") == 2
    assert value(metrics, "mmproxy_udp_datagrams_total", direction="to_client") == 1


def test_registries_are_private() -> None:
    one, two = PrometheusMetrics(), PrometheusMetrics()
    one.accepted()
    assert value(one, "mmproxy_connections_accepted_total") == 1
    assert value(two, "mmproxy_connections_accepted_total") == 0
    assert value(one, "mmproxy_build_info", version=__version__) == 1
    assert value(one, "process_open_fds") is not None


def test_disabled_metrics_accept_every_call() -> None:
    """The no-op object the data path holds when --metrics is off."""
    assert isinstance(NO_METRICS, Metrics)
    assert not NO_METRICS.enabled
    assert PrometheusMetrics().enabled
    calls = [
        NO_METRICS.accepted,
        lambda: NO_METRICS.refused(Refusal.NOT_ALLOWED),
        lambda: NO_METRICS.header_parsed(0.1),
        lambda: NO_METRICS.header_error("incomplete"),
        NO_METRICS.upstream_failed,
        NO_METRICS.opened,
        lambda: NO_METRICS.closed(1, 2),
        NO_METRICS.udp_flow_opened,
        NO_METRICS.udp_flow_closed,
        lambda: NO_METRICS.udp_datagram(TO_CLIENT),
    ]
    assert [call() for call in calls] == [None] * len(calls)


def fetch(address: str) -> str:
    """GET /metrics over a plain socket (no proxy settings can send it anywhere but here)."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host.strip("[]"), int(port)), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: mmproxy\r\n\r\n")
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    assert b"text/plain" in head
    return body.decode()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_server_serves_the_registry_and_stops(host: str) -> None:
    metrics = PrometheusMetrics()
    metrics.accepted()
    server = MetricsServer(Endpoint(ipaddress.ip_address(host), 0), metrics.registry)
    try:
        server.start()
        address = server.address
        assert address.rpartition(":")[2] != "0"
        text = fetch(address)
        families = {family.name: family for family in text_string_to_metric_families(text)}
        (sample,) = families["mmproxy_connections_accepted"].samples
        assert sample.value == 1
    finally:
        server.close()
    server.close()  # idempotent
    port = int(address.rpartition(":")[2])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe, pytest.raises(ConnectionRefusedError):
        probe.connect((host, port))


def test_server_bind_failure_raises() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="in use"):
            MetricsServer(
                Endpoint(ipaddress.ip_address("127.0.0.1"), port), PrometheusMetrics().registry
            )


def test_limits_and_accept_pauses() -> None:
    """The caps, the live worker count (read at scrape time) and the acceptors' pauses."""
    metrics = PrometheusMetrics()
    workers = [5]
    metrics.limits(100, 216, lambda: workers[0])
    assert value(metrics, "mmproxy_max_connections") == 100
    assert value(metrics, "mmproxy_max_worker_threads") == 216
    assert value(metrics, "mmproxy_worker_threads") == 5
    workers[0] = 7
    assert value(metrics, "mmproxy_worker_threads") == 7
    metrics.accept_paused(True)
    metrics.accept_paused(True)
    assert value(metrics, "mmproxy_accept_paused") == 2
    metrics.accept_paused(False)
    assert value(metrics, "mmproxy_accept_paused") == 1
    assert value(metrics, "mmproxy_accept_pauses_total") == 2
