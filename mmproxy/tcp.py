"""One TCP connection's life: header, upstream, relay, outcome.

:meth:`Connection.serve` runs on a pool worker.  It reads the PROXY header
with a deadline, connects upstream from the client's address, sends the
bytes that arrived after the header, then becomes the client -> backend
relay thread while a second worker relays backend -> client.  The thread
that finishes last logs the outcome and releases the connection's slot.
A header still arriving, and a connection with nothing to relay yet, wait
in the parking lot (:mod:`mmproxy.parking`) without a thread of their own;
the lot runs the next step on the pool when a socket has something.

Descriptor ownership: until the relay starts, the connection owns the
client socket (whichever thread runs :meth:`Connection.serve`, or the lot
giving it back at close) and closes it; from then on
:class:`~mmproxy.relay.Pair` owns both sockets.  :meth:`Connection.abort`
(graceful stop) only ever shuts sockets down, under the same lock as the
close, never closes them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from mmproxy import logs, policy, upstream
from mmproxy.config import Config
from mmproxy.errors import HeaderError, Reason, RefusedError
from mmproxy.metrics import NO_METRICS, READ_ERROR, Metrics
from mmproxy.parking import ParkingLot
from mmproxy.pool import WorkerPool
from mmproxy.protocol import Command, NeedMore, ProxyHeader, Transport, parse
from mmproxy.relay import PEER_GONE, UNLIMITED, Pair, PipeBudget

# A header is at most 16 + 65535 bytes (v2); one recv asks for what the parser
# still needs, or this much, whichever is more, and never waits for more.
RECV_SIZE = 16384

# Log ``reason`` codes for refusals that are not header parse errors.
NOT_ALLOWED = "not_allowed"
HEADER_TIMEOUT = "header_timeout"
WRONG_TRANSPORT = "wrong_transport"
UPSTREAM_FAILED = "upstream_failed"
STOPPING = "stopping"
IDLE_TIMEOUT = "idle_timeout"


@dataclass(frozen=True, slots=True)
class Services:
    """What every connection shares: configuration, logging, threads, bookkeeping, metrics."""

    config: Config
    log: logs.ConnectionLog
    pool: WorkerPool
    tracker: Tracker
    metrics: Metrics = NO_METRICS
    pipes: PipeBudget = UNLIMITED
    parking: ParkingLot | None = None  # None: relay at once, one thread per direction
    destinations: policy.Destinations | None = None  # with -dynamic-destination


class Tracker:
    """The live connections, capped (``--max-connections``): at the cap, admission waits.

    :meth:`wait_for_room` is what an acceptor calls before ``accept()``, so that at the cap
    new connections wait in the kernel's backlog instead of costing threads here.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._live: set[Connection] = set()
        self._changed = threading.Condition()
        self._closed = False  # no more admissions: the daemon is stopping

    def wait_for_room(self, timeout: float | None = None) -> bool:
        """Wait until a connection may be added; False when closed (or on timeout)."""
        with self._changed:
            self._changed.wait_for(lambda: self._closed or len(self._live) < self.capacity, timeout)
            return not self._closed and len(self._live) < self.capacity

    def add(self, connection: Connection) -> bool:
        """Register ``connection``, waiting for room at the cap; False once closed.

        Another listener's acceptor may have taken the last slot since this one's
        :meth:`wait_for_room`: then this waits, holding one accepted socket.
        """
        with self._changed:
            self._changed.wait_for(lambda: self._closed or len(self._live) < self.capacity)
            if self._closed:
                return False
            self._live.add(connection)
            return True

    def close(self) -> None:
        """Admit no more connections; wakes acceptors waiting for room."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def remove(self, connection: Connection) -> None:
        with self._changed:
            was_full = len(self._live) >= self.capacity
            self._live.discard(connection)
            if was_full or not self._live:
                self._changed.notify_all()

    def __len__(self) -> int:
        with self._changed:
            return len(self._live)

    def wait_empty(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the last connection to end; True if none is left."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._live, timeout)

    def abort_all(self) -> int:
        """Shut every live connection down; returns how many there were."""
        with self._changed:
            live = list(self._live)
        for connection in live:
            connection.abort()
        return len(live)


class Connection:
    """A client connection from the load balancer, from accept to close."""

    def __init__(
        self, sock: socket.socket, peer: tuple[str, int], listener_num: int, services: Services
    ) -> None:
        self._sock = sock
        self._peer = peer[0]  # the load balancer's address, as accept() gave it
        self._services = services
        self._log = services.log
        if services.log.failures:  # at -v 0 nothing is logged: skip the formatting
            self._log = services.log.bind(
                **{logs.REMOTE_ADDR: logs.go_address(*peer), logs.LISTENER_NUM: listener_num}
            )
        self._lock = threading.Lock()
        self._pair: Pair | None = None
        self._aborted = False
        self._closed = False
        # The header read so far, and when it must be complete; serve() may run several times
        # (one thread at a time: the parking lot hands it on) while the header trickles in.
        self._buffer = bytearray()
        self._started = 0.0
        self._deadline = 0.0

    # -------------------------------------------------------------- stopping

    def abort(self) -> None:
        """Make this connection end soon: wake whichever thread is blocked on it."""
        with self._lock:
            self._aborted = True
            pair = self._pair
            if pair is None and not self._closed:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
        if pair is not None:
            pair.abort()

    def _close_client(self) -> None:
        with self._lock:
            self._closed = True
            self._sock.close()

    # -------------------------------------------------------------- serving

    def serve(self) -> None:
        """The whole connection; runs on a pool worker and never raises.

        A header that has not all arrived yet waits in the parking lot without a thread;
        the lot runs this again when more of it comes, or when its deadline passes.
        """
        services = self._services
        metrics = services.metrics
        try:
            if not self._started:
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._started = time.monotonic()
                self._deadline = self._started + services.config.header_timeout
            found = self._read_header()
            if found is None:
                return  # parked until more of the header arrives
            header, payload = found
            metrics.header_parsed(time.monotonic() - self._started)
            conn_up = self._connect(header)
        except RefusedError as refusal:
            self._log.failure(refusal.message, refusal.detail, reason=refusal.reason)
            if refusal.reason == UPSTREAM_FAILED:
                metrics.upstream_failed()
            else:
                metrics.header_error(refusal.reason)
            self.discard()
            return
        except HeaderError as error:
            self._log.failure("invalid PROXY header", error)
            metrics.header_error(error.reason)
            self.discard()
            return
        except OSError as error:
            self._log.failure("connection failed before the relay started", error)
            metrics.header_error(READ_ERROR)
            self.discard()
            return
        except BaseException:
            self.discard()
            raise
        pair = Pair(self._sock, conn_up.sock, services.config.idle_timeout, services.pipes)
        with self._lock:
            self._pair = pair
            aborted = self._aborted
        log = self._log
        if log.failures:
            log = log.bind(
                **{
                    logs.CLIENT_ADDR: logs.go_address(*conn_up.source),
                    logs.TARGET_ADDR: _peer_text(conn_up.sock),
                }
            )
            if conn_up.fallback:
                log.notice("client port in use here: connected from an ephemeral port instead")
        if aborted:
            pair.close()
            log.failure("daemon is stopping", reason=STOPPING)
            services.tracker.remove(self)
            return
        log.state("connection established")
        metrics.opened()
        try:
            if payload:
                conn_up.sock.sendall(payload)  # what came with the header goes first
                pair.to_target[0] += len(payload)
            elif services.parking is not None and not pair.input_waiting():
                # Nothing to relay yet: wait in the parking lot, holding no thread.
                services.parking.park(
                    pair,
                    lambda: self._start_relay(pair, log),
                    lambda error: self._relay_failed(pair, log, error),
                )
                return
        except (OSError, RuntimeError) as error:
            self._relay_failed(pair, log, error)
            return
        self._start_relay(pair, log)

    def _start_relay(self, pair: Pair, log: logs.ConnectionLog) -> None:
        """Relay both ways: backward on another worker, forward on this thread."""
        try:
            self._services.pool.submit(lambda: self._relay(pair, pair.backward, log))
        except (OSError, RuntimeError) as error:
            self._relay_failed(pair, log, error)
            return
        self._relay(pair, pair.forward, log)

    def _relay_failed(self, pair: Pair, log: logs.ConnectionLog, error: BaseException) -> None:
        pair.close()
        log.failure("relay could not start", error)
        self._services.metrics.closed(pair.to_target[0], pair.to_client[0])
        self._services.tracker.remove(self)

    def discard(self) -> None:
        """Close and forget a connection whose relay never started."""
        self._close_client()
        self._services.tracker.remove(self)

    def _relay(self, pair: Pair, direction: Callable[[], bool], log: logs.ConnectionLog) -> None:
        if not direction():
            return  # the sibling direction is still running; it reports
        fields = {
            "bytesToTarget": pair.to_target[0],
            "bytesToClient": pair.to_client[0],
            "durationSeconds": round(pair.duration, 6),
        }
        error = pair.error
        with self._lock:
            aborted = self._aborted
        if pair.idle:
            timeout = self._services.config.idle_timeout
            detail = f"no data in either direction for {timeout:g}s"
            log.failure("idle timeout", detail, reason=IDLE_TIMEOUT, **fields)
        elif error is not None and not (aborted and error.errno in PEER_GONE):
            log.failure("connection ended with an error", error, **fields)
        else:
            log.state("connection closed", **fields)
        self._services.metrics.closed(pair.to_target[0], pair.to_client[0])
        self._services.tracker.remove(self)

    # -------------------------------------------------------------- header

    def _read_header(self) -> tuple[ProxyHeader, bytes] | None:
        """The header and the bytes that came after it, or None when parked to wait for more.

        Reads only what has arrived (the socket stays blocking for splice; each read is
        ``MSG_DONTWAIT``).  Raises the refusals: a timeout, a peer that closed, a bad header.
        """
        sock = self._sock
        buffer = self._buffer
        while True:
            result = parse(buffer)
            if not isinstance(result, NeedMore):
                return result.header, bytes(buffer[result.consumed :])
            try:
                chunk = sock.recv(max(result.at_least, RECV_SIZE), socket.MSG_DONTWAIT)
            except BlockingIOError:
                if time.monotonic() >= self._deadline:
                    timeout = self._services.config.header_timeout
                    raise _header_timeout(len(buffer), timeout) from None
                if self._wait_for_more():
                    return None
                continue
            if not chunk:
                raise HeaderError(
                    Reason.INCOMPLETE, f"peer closed the connection after {len(buffer)} bytes"
                )
            buffer += chunk

    def _wait_for_more(self) -> bool:
        """Wait for more of the header: True when parked (this thread is free to go)."""
        parking = self._services.parking
        remaining = self._deadline - time.monotonic()
        if parking is None:
            poller = select.poll()
            poller.register(self._sock, select.POLLIN)
            poller.poll(max(1, math.ceil(remaining * 1000)))
            return False
        try:
            parking.park_sockets(
                (self._sock,),
                self.serve,
                self._resume_failed,
                timeout=max(remaining, 0.001),
                abandon=self.discard,
            )
        except RuntimeError as error:  # the lot is closed: the daemon is stopping
            raise RefusedError(STOPPING, "daemon is stopping", str(error)) from error
        return True

    def _resume_failed(self, error: BaseException) -> None:
        self._log.failure("connection failed before the relay started", error)
        self.discard()

    # -------------------------------------------------------------- upstream

    def _connect(self, header: ProxyHeader) -> upstream.Upstream:
        config = self._services.config
        if header.transport == Transport.DGRAM and header.command == Command.PROXY:
            raise RefusedError(
                WRONG_TRANSPORT,
                "wrong transport in PROXY header",
                "the header announces DGRAM (UDP) on a TCP listener",
            )
        timeout = config.connect_timeout
        peer = ipaddress.ip_address(self._peer.partition("%")[0])
        route = policy.decide(header, peer, config, self._services.destinations)
        try:
            if route.source is None:
                return upstream.connect_plain(route.target, mark=config.mark, timeout=timeout)
            return upstream.connect_spoofed(
                route.source, route.target, mark=config.mark, timeout=timeout
            )
        except PermissionError as error:
            raise RefusedError(
                UPSTREAM_FAILED,
                "cannot impersonate the client (IP_TRANSPARENT needs CAP_NET_ADMIN)",
                error.strerror or str(error),
            ) from error
        except OSError as error:
            raise RefusedError(
                UPSTREAM_FAILED, "cannot connect to the target", error.strerror or str(error)
            ) from error


def _header_timeout(received: int, timeout: float) -> RefusedError:
    return RefusedError(
        HEADER_TIMEOUT,
        "PROXY header timeout",
        f"no complete header within {timeout:g}s ({received} bytes received)",
    )


def _peer_text(sock: socket.socket) -> str:
    try:
        address = sock.getpeername()
    except OSError:
        return "?"
    return logs.go_address(str(address[0]), int(address[1]))
