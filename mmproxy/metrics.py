"""Prometheus metrics (``--metrics ADDR:PORT``): what the data path counts, and the scrape server.

The data path sees one object, :class:`Metrics`, and only calls its methods at
the points where a connection's outcome is already decided (and logged), so a
connection costs a handful of counter increments and nothing per byte: bytes
relayed are added when the connection ends.  With ``--metrics`` off the object
is the base class, whose methods do nothing.

:class:`PrometheusMetrics` keeps its collectors in a private registry, not
prometheus_client's global one, so several can live in one process (tests) and
nothing else in the process leaks into the scrape.  :class:`MetricsServer`
serves that registry over HTTP until :meth:`close`: one thread accepts, and
:data:`METRICS_WORKERS` threads answer; while all of them are busy the
acceptor waits, so more scrapers wait in the kernel's backlog instead of
costing a thread each.
"""

from __future__ import annotations

import ipaddress
import queue
import socket
import socketserver
import threading
from collections.abc import Callable
from http.server import HTTPServer
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import MetricsHandler

from mmproxy import __version__
from mmproxy.config import Endpoint
from mmproxy.errors import Reason, Refusal

NAMESPACE = "mmproxy"

# The label values each reason-labelled counter declares (at 0, from the start).
# Refusals before a byte is read:
REFUSED_REASONS: tuple[str, ...] = (Refusal.NOT_ALLOWED,)
# A TCP connection refused before its relay: the parser's Reason codes and these.
HEADER_REASONS: tuple[str, ...] = (
    *Reason,
    Refusal.HEADER_TIMEOUT,
    Refusal.READ_ERROR,
    Refusal.WRONG_TRANSPORT,
    Refusal.BAD_SOURCE,
    Refusal.BAD_DESTINATION,
    Refusal.STOPPING,
)
# A UDP datagram dropped: the parser's Reason codes and these.
DROP_REASONS: tuple[str, ...] = (
    *Reason,
    Refusal.NOT_ALLOWED,
    Refusal.WRONG_VERSION,
    Refusal.WRONG_TRANSPORT,
    Refusal.BAD_SOURCE,
    Refusal.BAD_DESTINATION,
    Refusal.UPSTREAM_FAILED,
    Refusal.NO_FLOW,
    Refusal.FLOW_LIMIT,
    Refusal.SEND_FAILED,
    Refusal.REPLY_FAILED,
    Refusal.RECEIVE_BUFFER_FULL,
)

TO_TARGET = "to_target"
TO_CLIENT = "to_client"
DIRECTIONS = (TO_TARGET, TO_CLIENT)
# Why the kernel relay did not take a pair (mmproxy.sockmap's FALLBACK_* values).
KERNEL_FALLBACK_REASONS = ("insert_failed", "busy", "ended")

METRICS_WORKERS = 4  # threads answering scrapes; Prometheus sends one at a time per target
_CLOSE_POLL = 0.5  # seconds between looks at "closing" while every worker is busy

# Seconds from accept to a complete header: a local load balancer sends it at
# once (well under a millisecond); slow or split headers take longer.
HEADER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """What the data path reports; this base class records nothing (``--metrics`` off)."""

    enabled = False

    def accepted(self) -> None:
        """A listener accepted a connection (before the allowed-subnets check)."""

    def refused(self, reason: str) -> None:
        """An accepted connection was closed before a byte was read (``REFUSED_*``)."""

    def header_parsed(self, seconds: float) -> None:
        """A complete, valid header arrived ``seconds`` after the connection was taken up."""

    def header_error(self, reason: str) -> None:
        """The connection was refused before its relay: one of ``HEADER_REASONS``."""

    def upstream_failed(self) -> None:
        """The upstream connection to the backend could not be made."""

    def opened(self) -> None:
        """A connection is relayed (the backend accepted the upstream connection)."""

    def closed(self, to_target: int, to_client: int) -> None:
        """A relayed connection ended after moving these many bytes each way."""

    def kernel_relay(self, fallback: str | None) -> None:
        """``--relay sockmap``: a pair went to the kernel (None), or stayed with splice and why."""

    def limits(self, max_connections: int, max_workers: int, workers: Callable[[], int]) -> None:
        """The caps in force, and how to read the worker threads alive now."""

    def accept_paused(self, paused: bool) -> None:
        """An acceptor stopped calling accept() at the connection cap (True), or resumed."""

    def parked(self) -> None:
        """A relayed connection gave its last thread back: it waits in the parking lot."""

    def resumed(self) -> None:
        """A parked connection has a thread again (or ended)."""

    def udp_flow_opened(self) -> None:
        """A UDP flow (client address and port) got its upstream socket."""

    def udp_flow_closed(self) -> None:
        """A UDP flow ended (idle for ``-close-after`` seconds, or the daemon stopped)."""

    def udp_datagram(self, direction: str) -> None:
        """One datagram relayed, ``TO_TARGET`` or ``TO_CLIENT``."""

    def udp_datagrams(self, direction: str, count: int) -> None:
        """``count`` datagrams relayed (a batch), ``TO_TARGET`` or ``TO_CLIENT``."""

    def udp_dropped(self, reason: str, count: int = 1) -> None:
        """Datagrams dropped (not allowed, bad header, no flow, flow limit...)."""


NO_METRICS = Metrics()


class PrometheusMetrics(Metrics):
    """Counters, gauges and a histogram in a registry of their own."""

    enabled = True

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, ns = self.registry, NAMESPACE
        Info("build", "mmproxy's version", namespace=ns, registry=r).info({"version": __version__})
        ProcessCollector(registry=r)  # process_open_fds, process_cpu_seconds_total, ...
        PlatformCollector(registry=r)  # python_info
        self._accepted = Counter(
            "connections_accepted", "Connections accepted by a listener", namespace=ns, registry=r
        )
        refused = Counter(
            "connections_refused",
            "Connections closed before a byte was read, by reason",
            ["reason"],
            namespace=ns,
            registry=r,
        )
        header_errors = Counter(
            "header_errors",
            "Connections closed because of their PROXY header, by reason",
            ["reason"],
            namespace=ns,
            registry=r,
        )
        self._upstream_failed = Counter(
            "upstream_connect_failures",
            "Upstream connections to the backend that could not be made",
            namespace=ns,
            registry=r,
        )
        self._relayed = Counter(
            "connections_relayed", "Connections relayed to the backend", namespace=ns, registry=r
        )
        self._active = Gauge(
            "connections_active", "Connections being relayed now", namespace=ns, registry=r
        )
        self._parked = Gauge(
            "connections_parked",
            "Relayed connections holding no thread now (quiet: waiting in the parking lot)",
            namespace=ns,
            registry=r,
        )
        relayed_bytes = Counter(
            "relayed_bytes",
            "Bytes relayed, by direction, counted when each connection ends",
            ["direction"],
            namespace=ns,
            registry=r,
        )
        self._header_seconds = Histogram(
            "header_parse_seconds",
            "Seconds from taking a connection up to a complete PROXY header",
            namespace=ns,
            registry=r,
            buckets=HEADER_BUCKETS,
        )
        self._kernel_relayed = Counter(
            "kernel_relayed",
            "Connections relayed inside the kernel (--relay sockmap)",
            namespace=ns,
            registry=r,
        )
        self._kernel_fallbacks = Counter(
            "kernel_relay_fallbacks",
            "Connections the kernel relay did not take (relayed with splice), by reason",
            ["reason"],
            namespace=ns,
            registry=r,
        )
        self._max_connections = Gauge(
            "max_connections",
            "Most TCP connections at once (--max-connections)",
            namespace=ns,
            registry=r,
        )
        self._max_workers = Gauge(
            "max_worker_threads",
            "Most worker threads the pool may have",
            namespace=ns,
            registry=r,
        )
        self._workers = Gauge(
            "worker_threads", "Worker threads alive now (busy or idle)", namespace=ns, registry=r
        )
        self._paused = Gauge(
            "accept_paused",
            "Acceptors not calling accept() now: the connection cap is reached (backpressure)",
            namespace=ns,
            registry=r,
        )
        self._pauses = Counter(
            "accept_pauses",
            "Times an acceptor paused at the connection cap",
            namespace=ns,
            registry=r,
        )
        self._udp_flows_opened = Counter(
            "udp_flows_opened", "UDP flows opened", namespace=ns, registry=r
        )
        self._udp_flows = Gauge("udp_flows_active", "UDP flows open now", namespace=ns, registry=r)
        datagrams = Counter(
            "udp_datagrams",
            "UDP datagrams relayed, by direction",
            ["direction"],
            namespace=ns,
            registry=r,
        )
        self._udp_dropped = Counter(
            "udp_datagrams_dropped",
            "UDP datagrams dropped, by reason",
            ["reason"],
            namespace=ns,
            registry=r,
        )
        # Every label value exists from the start, at 0, so rate() works from the first scrape.
        for reason in KERNEL_FALLBACK_REASONS:
            self._kernel_fallbacks.labels(reason)
        self._refused = {reason: refused.labels(reason) for reason in REFUSED_REASONS}
        self._header_errors = {reason: header_errors.labels(reason) for reason in HEADER_REASONS}
        for reason in DROP_REASONS:
            self._udp_dropped.labels(reason)
        self._bytes_to_target = relayed_bytes.labels(TO_TARGET)
        self._bytes_to_client = relayed_bytes.labels(TO_CLIENT)
        self._datagrams = {direction: datagrams.labels(direction) for direction in DIRECTIONS}
        self._refused_family = refused
        self._header_errors_family = header_errors

    def accepted(self) -> None:
        self._accepted.inc()

    def refused(self, reason: str) -> None:
        child = self._refused.get(reason)
        (child or self._refused_family.labels(reason)).inc()

    def header_parsed(self, seconds: float) -> None:
        self._header_seconds.observe(seconds)

    def header_error(self, reason: str) -> None:
        child = self._header_errors.get(reason)
        (child or self._header_errors_family.labels(reason)).inc()

    def upstream_failed(self) -> None:
        self._upstream_failed.inc()

    def opened(self) -> None:
        self._relayed.inc()
        self._active.inc()

    def closed(self, to_target: int, to_client: int) -> None:
        self._active.dec()
        self._bytes_to_target.inc(to_target)
        self._bytes_to_client.inc(to_client)

    def kernel_relay(self, fallback: str | None) -> None:
        if fallback is None:
            self._kernel_relayed.inc()
        else:
            self._kernel_fallbacks.labels(fallback).inc()

    def limits(self, max_connections: int, max_workers: int, workers: Callable[[], int]) -> None:
        self._max_connections.set(max_connections)
        self._max_workers.set(max_workers)
        self._workers.set_function(workers)

    def accept_paused(self, paused: bool) -> None:
        if paused:
            self._paused.inc()
            self._pauses.inc()
        else:
            self._paused.dec()

    def parked(self) -> None:
        self._parked.inc()

    def resumed(self) -> None:
        self._parked.dec()

    def udp_flow_opened(self) -> None:
        self._udp_flows_opened.inc()
        self._udp_flows.inc()

    def udp_flow_closed(self) -> None:
        self._udp_flows.dec()

    def udp_datagram(self, direction: str) -> None:
        self._datagrams[direction].inc()

    def udp_datagrams(self, direction: str, count: int) -> None:
        self._datagrams[direction].inc(count)

    def udp_dropped(self, reason: str, count: int = 1) -> None:
        self._udp_dropped.labels(reason).inc(count)


class _Handler(MetricsHandler):
    """prometheus_client's handler (text format, gzip, ``name[]`` filters), with a deadline."""

    timeout = 10  # seconds a scraper may take to send its request


class _Server(HTTPServer):
    """An HTTPServer whose requests go to a fixed set of workers (see the module docstring)."""

    request_queue_size = 64  # the listen backlog: where scrapers wait while workers are busy

    def __init__(self, endpoint: Endpoint, handler: type[MetricsHandler]) -> None:
        self.address_family = endpoint.family
        self.closing = threading.Event()
        self._slots = threading.BoundedSemaphore(METRICS_WORKERS)
        self._requests: queue.SimpleQueue[tuple[socket.socket, object] | None] = queue.SimpleQueue()
        self._workers = [
            # Daemon threads: a stuck scraper must not hold up the daemon's exit.
            threading.Thread(target=self._work, name=f"metrics-{n}", daemon=True)
            for n in range(METRICS_WORKERS)
        ]
        super().__init__(endpoint.sockaddr, handler)
        for worker in self._workers:
            worker.start()

    def process_request(self, request: Any, client_address: Any) -> None:
        # Runs on the serving thread: while every worker is busy, nothing more is accepted.
        while not self._slots.acquire(timeout=_CLOSE_POLL):
            if self.closing.is_set():
                self.shutdown_request(request)
                return
        self._requests.put((request, client_address))

    def _work(self) -> None:
        while (item := self._requests.get()) is not None:
            request, client_address = item
            try:
                self.finish_request(request, client_address)
            except Exception:  # noqa: BLE001 - one scraper's trouble is not the server's
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
                self._slots.release()

    def server_close(self) -> None:
        super().server_close()
        for _ in self._workers:
            self._requests.put(None)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look the host's FQDN up, a DNS query that
        # can stall start-up for nothing.  "[::]" serves IPv4 too, like -l.
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class MetricsServer:
    """Serves one registry over HTTP (any path; Prometheus asks for ``/metrics``)."""

    def __init__(self, endpoint: Endpoint, registry: CollectorRegistry) -> None:
        """Bind at once (raises OSError); serving starts with :meth:`start`."""
        handler = type("_RegistryHandler", (_Handler,), {"registry": registry})
        self._server = _Server(endpoint, handler)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        """The address served, Go-style, with the real port when 0 was asked for."""
        host, port = self._server.server_address[:2]
        return str(Endpoint(ipaddress.ip_address(str(host).partition("%")[0]), int(port)))

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving and close the listening socket; idempotent."""
        self._server.closing.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()
