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

from mmproxy import logs, upstream
from mmproxy.config import Config, Endpoint
from mmproxy.errors import HeaderError, Reason
from mmproxy.metrics import NO_METRICS, READ_ERROR, Metrics
from mmproxy.parking import ParkingLot
from mmproxy.pool import WorkerPool
from mmproxy.protocol import Command, InetAddress, NeedMore, ProxyHeader, Transport, parse
from mmproxy.relay import PEER_GONE, UNLIMITED, Pair, PipeBudget

# A header is at most 16 + 65535 bytes (v2); one recv asks for what the parser
# still needs, or this much, whichever is more, and never waits for more.
RECV_SIZE = 16384

# Log ``reason`` codes for refusals that are not header parse errors.
NOT_ALLOWED = "not_allowed"
HEADER_TIMEOUT = "header_timeout"
WRONG_TRANSPORT = "wrong_transport"
BAD_DESTINATION = "bad_destination"
UPSTREAM_FAILED = "upstream_failed"
STOPPING = "stopping"
IDLE_TIMEOUT = "idle_timeout"


class RefusedError(Exception):
    """This connection cannot be relayed.

    ``reason`` is the log code, ``message`` the fixed log message (``msg``) and
    ``detail`` the specifics (the ``error`` field).
    """

    def __init__(self, reason: str, message: str, detail: str) -> None:
        super().__init__(f"{message}: {detail}")
        self.reason = reason
        self.message = message
        self.detail = detail


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


class Tracker:
    """The live connections, capped so that each one can get the descriptors it needs."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._live: set[Connection] = set()
        self._changed = threading.Condition()

    def add(self, connection: Connection) -> bool:
        """Register ``connection``; False when at capacity."""
        with self._changed:
            if len(self._live) >= self.capacity:
                return False
            self._live.add(connection)
            return True

    def remove(self, connection: Connection) -> None:
        with self._changed:
            self._live.discard(connection)
            if not self._live:
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
                **{
                    logs.REMOTE_ADDR: logs.go_address(*peer),
                    logs.LOCAL_ADDR: logs.local_address(sock),
                    logs.LISTENER_NUM: listener_num,
                }
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
                self._log.state(logs.MSG_NEW_CONNECTION)
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._started = time.monotonic()
                self._deadline = self._started + services.config.header_timeout
            found = self._read_header()
            if found is None:
                return  # parked until more of the header arrives
            header, payload = found
            metrics.header_parsed(time.monotonic() - self._started)
            _check_transport(header)  # a parse failure to go-mmproxy: before "parsed" is said
            if self._log.failures:
                self._log_header(header)
            conn_up = self._connect(header)
        except RefusedError as refusal:
            message = logs.tcp_refusal_message(refusal.reason)
            self._log.failure(message, str(refusal), reason=refusal.reason)
            if refusal.reason == UPSTREAM_FAILED:
                metrics.upstream_failed()
            else:
                metrics.header_error(refusal.reason)
            self.discard()
            return
        except HeaderError as error:
            # A peer that closed before sending a byte is a failed read, as go-mmproxy has it.
            failed_read = error.reason == Reason.INCOMPLETE and not self._buffer
            message = logs.MSG_READ_HEADER_FAILED if failed_read else logs.MSG_PARSE_HEADER_FAILED
            self._log.failure(message, error)
            metrics.header_error(error.reason)
            self.discard()
            return
        except OSError as error:
            self._log.failure(logs.MSG_READ_HEADER_FAILED, error, reason=READ_ERROR)
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
        if conn_up.fallback:
            log.notice(
                "client port in use here: connected from an ephemeral port instead",
                upstreamSource=logs.local_address(conn_up.sock),
            )
        if aborted:
            pair.close()
            log.failure("daemon is stopping", reason=STOPPING)
            services.tracker.remove(self)
            return
        log.state(logs.MSG_UPSTREAM_ESTABLISHED)
        log.state(logs.MSG_NODELAY_DOWNSTREAM)
        log.state(logs.MSG_NODELAY_UPSTREAM)  # upstream.connect_* set it on the new socket
        metrics.opened()
        try:
            if payload:
                try:
                    conn_up.sock.sendall(payload)  # what came with the header goes first
                except OSError as error:
                    self._relay_failed(pair, log, error, logs.MSG_WRITE_UPSTREAM_FAILED)
                    return
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

    def _relay_failed(
        self,
        pair: Pair,
        log: logs.ConnectionLog,
        error: BaseException,
        message: str = "relay could not start",
    ) -> None:
        pair.close()
        log.failure(message, error)
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
            log.failure(logs.MSG_CONNECTION_BROKEN, error, **fields)
        else:
            log.state(logs.MSG_CONNECTION_CLOSING, **fields)
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
        self._log.failure(logs.MSG_READ_HEADER_FAILED, error, reason=READ_ERROR)
        self.discard()

    def _log_header(self, header: ProxyHeader) -> None:
        """From here on every record carries ``clientAddr`` and ``targetAddr``, as in
        go-mmproxy; at -v 2 ``successfully parsed PROXY header`` says so, with the TLVs."""
        client = header.client
        client_text = logs.UNKNOWN_CLIENT if client is None else str(client)
        target = str(self._target_of(header))
        self._log = self._log.bind(**{logs.CLIENT_ADDR: client_text, logs.TARGET_ADDR: target})
        if self._log.states:
            self._log.state(logs.MSG_HEADER_PARSED, **logs.tlv_fields(header.tlvs))

    # -------------------------------------------------------------- upstream

    def _target_of(self, header: ProxyHeader) -> Endpoint:
        """The header's destination with -dynamic-destination, else -4 or -6 by family.

        The family is the client's, or the balancer's for a header without addresses.
        """
        destination = header.destination
        if self._services.config.dynamic_destination and isinstance(destination, InetAddress):
            return Endpoint(upstream.plain_address(destination.host), destination.port)
        client = header.client
        host = ipaddress.ip_address(self._peer.partition("%")[0]) if client is None else client.host
        config = self._services.config
        return config.target4 if upstream.plain_address(host).version == 4 else config.target6

    def _connect(self, header: ProxyHeader) -> upstream.Upstream:
        config = self._services.config
        client = header.client
        target = self._target_of(header)
        if target.port == 0:
            raise RefusedError(
                BAD_DESTINATION,
                "unusable destination in PROXY header",
                f"destination {header.destination} has port 0",
            )
        timeout = config.connect_timeout
        try:
            if client is None:  # LOCAL, UNKNOWN, UNSPEC, AF_UNIX: no address to impersonate
                return upstream.connect_plain(target, mark=config.mark, timeout=timeout)
            host = upstream.plain_address(client.host)
            if target.host.version != host.version:
                raise RefusedError(
                    BAD_DESTINATION,
                    "unusable destination in PROXY header",
                    f"source {client} and destination {target} differ in family",
                )
            return upstream.connect_spoofed(
                (host, client.port), target, mark=config.mark, timeout=timeout
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


def _check_transport(header: ProxyHeader) -> None:
    if header.transport == Transport.DGRAM and header.command == Command.PROXY:
        raise RefusedError(
            WRONG_TRANSPORT,
            "wrong transport in PROXY header",
            "the header announces DGRAM (UDP) on a TCP listener",
        )


def _header_timeout(received: int, timeout: float) -> RefusedError:
    return RefusedError(
        HEADER_TIMEOUT,
        "PROXY header timeout",
        f"no complete header within {timeout:g}s ({received} bytes received)",
    )
