"""One TCP connection's life: header, upstream, relay, outcome.

A :class:`Connection` moves through explicit states (:class:`State`): HEADER, CONNECTING,
RELAYING (at least one direction on a thread) and PARKED (none), then DONE.  Every way out,
whatever the state and whichever thread finds it, goes through :meth:`Connection._finish`,
which closes, logs, counts and leaves the tracker exactly once.

:meth:`Connection.serve` runs on a pool worker.  It reads the PROXY header with a deadline,
connects upstream from the client's address, sends the bytes that arrived after the header,
then parks both relay directions in the parking lot (:mod:`mmproxy.parking`).  The lot moves
small messages and relays the ends on its own thread (:mod:`mmproxy.hop`); a direction with
bulk, or a slow reader, goes to a pool worker, which splices until its source has been quiet
for :data:`QUIET_GRACE`, then parks the socket again.  So a quiet connection holds no thread,
and a request, its answer and the closes need none.  A header still arriving waits in the
lot too.  With ``--relay sockmap`` an established pair is handed to the kernel instead, at one
call site (:meth:`Connection._kernel_relay`, where :mod:`mmproxy.sockmap` joins); it is then
PARKED, holding no thread, until the kernel relay reports its end to ``_finish``.

Descriptor ownership: the connection owns the client socket from accept, and both sockets
once the relay starts (:class:`~mmproxy.relay.Pair` holds them), and only ``_finish`` closes
them, under the connection's lock.  :meth:`Connection.abort` (graceful stop) only ever shuts
sockets down, under the same lock, never closes them; the lot never closes a socket.

:class:`TcpServer` (at the end) is the TCP side of :mod:`mmproxy.server`: acceptors, the
admission check, the :class:`Tracker` of live connections, and the drain.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import functools
import ipaddress
import logging
import math
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mmproxy import logs, policy, upstream
from mmproxy.acl import AllowListHolder
from mmproxy.config import Config, Endpoint
from mmproxy.errors import HeaderError, Reason, Refusal, RefusedError
from mmproxy.header import host_port
from mmproxy.hop import Hop, move
from mmproxy.listener import Acceptor, Throttle, listener_fields
from mmproxy.metrics import NO_METRICS, Metrics
from mmproxy.parking import ParkingLot, lot_threads
from mmproxy.pool import Job, WorkerPool
from mmproxy.protocol import Command, InetAddress, NeedMore, ProxyHeader, Transport, parse
from mmproxy.relay import BACKWARD, FORWARD, PEER_GONE, UNLIMITED, Pair, PipeBudget, Step
from mmproxy.server import Server, Serving
from mmproxy.sockmap import FALLBACK_ENDED, KernelPair, KernelRelay

# A header is at most 16 + 65535 bytes (v2); one recv asks for what the parser
# still needs, or this much, whichever is more, and never waits for more.
RECV_SIZE = 16384

# The refusal codes this module uses, by short name; errors.Refusal is the one vocabulary.
HEADER_TIMEOUT = Refusal.HEADER_TIMEOUT
IDLE_TIMEOUT = Refusal.IDLE_TIMEOUT
READ_ERROR = Refusal.READ_ERROR
STOPPING = Refusal.STOPPING
UPSTREAM_FAILED = Refusal.UPSTREAM_FAILED
WRONG_TRANSPORT = Refusal.WRONG_TRANSPORT

_BEFORE_RELAY = "connection failed before the relay started"

# Seconds a relay direction may wait for its source on a thread before it parks that socket
# and gives the thread back (bench/README.md: how it was chosen).
QUIET_GRACE = 0.25

WORKERS_PER_CONNECTION = 2  # the most threads one TCP connection holds at once
SPARE_WORKERS = 16  # for workers between a finished job and the idle stack
AFTER_ABORT_WAIT = 5.0  # seconds connections get to unwind after being shut down
DRAIN_POLL = 0.2  # seconds between looks for a second stop signal while draining


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
    grace: float = QUIET_GRACE  # seconds a quiet direction keeps its thread (with a lot)
    kernel: KernelRelay | None = None  # --relay sockmap: established pairs go to the kernel
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


class State(enum.Enum):
    """Where a connection is in its life; it only ever moves down this list (PARKED and
    RELAYING alternate), and every way out goes to DONE through :meth:`Connection._finish`."""

    HEADER = "header"  # reading the PROXY header (on a worker, or parked until more arrives)
    CONNECTING = "connecting"  # header parsed, connecting upstream
    RELAYING = "relaying"  # relayed, at least one direction holds a thread
    PARKED = "parked"  # relayed, no direction holds a thread: every live one waits in the lot
    DONE = "done"  # closed, logged, counted, out of the tracker


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a connection ended: the log record, and the counter for one that was never relayed.

    ``failure`` False logs ``message`` as a state change (``-v 2``), True as a dropped
    connection (``-v 1``).  ``metric`` is counted only for a connection that was never
    relayed: :data:`UPSTREAM_FAILED`, or a header error reason (None: nothing).
    """

    message: str
    error: BaseException | str | None = None
    reason: str | None = None
    metric: str | None = None
    failure: bool = True


# A wait that could not go on: the lot or the pool refused it (the daemon is stopping).
_STOPPED = "the daemon is stopping"


class Connection:
    """A client connection from the load balancer, from accept to close.

    The job :meth:`serve` reads the header and connects upstream; then both directions
    park, and the lot moves their small messages and ends (:meth:`_move`).  A direction
    with more goes to a pool worker (:meth:`_run`) until it ends or has been quiet for the
    grace, when it parks its source socket again.  ``_threads`` counts the directions on a
    thread now; with none, a relayed connection is PARKED.
    """

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
                    logs.REMOTE_ADDR: host_port(*peer),
                    logs.LOCAL_ADDR: logs.local_address(sock),
                    logs.LISTENER_NUM: listener_num,
                }
            )
            self._log.state(logs.MSG_NEW_CONNECTION)  # allowed, taken up: go-mmproxy's first
        # _lock guards _state, _pair, _aborted, _threads and the close (abort() shuts down
        # under it, so it never touches a descriptor number already closed and reused).
        self._lock = threading.Lock()
        self._state = State.HEADER
        self._pair: Pair | None = None
        self._aborted = False
        self._threads = 0
        self._opened = False  # counted as relayed (metrics.opened): its end counts bytes
        # The header read so far, and when it must be complete; serve() may run several times
        # (one thread at a time: the parking lot hands it on) while the header trickles in.
        self._buffer = bytearray()
        self._started = time.monotonic()
        self._deadline = self._started + services.config.header_timeout

    @property
    def state(self) -> State:
        with self._lock:
            return self._state

    # -------------------------------------------------------------- stopping

    def abort(self) -> None:
        """Make this connection end soon: wake whichever thread is blocked on it, or its
        parked sockets (the lot then hands them over, and they find the end)."""
        with self._lock:
            self._aborted = True
            pair = self._pair
            if pair is None and self._state is not State.DONE:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
        if pair is not None:
            pair.abort()

    def not_served(self, error: BaseException) -> None:
        """The connection never got a thread: close it and say why."""
        self._finish(Outcome("no thread for the connection", error))

    def _finish(self, outcome: Outcome) -> None:
        """The one way out: close, log, count and leave the tracker, exactly once."""
        with self._lock:
            if self._state is State.DONE:
                return
            was_parked = self._state is State.PARKED
            self._state = State.DONE
            pair = self._pair
            if pair is not None:
                pair.close()
            else:
                self._sock.close()
        metrics = self._services.metrics
        if was_parked:
            metrics.resumed()
        fields: dict[str, object] = {}
        if self._opened and pair is not None:
            fields = {
                "bytesToTarget": pair.to_target[0],
                "bytesToClient": pair.to_client[0],
                "durationSeconds": round(pair.duration, 6),
            }
        log = self._log
        if not outcome.failure:
            log.state(outcome.message, **fields)
        elif outcome.reason is None:
            log.failure(outcome.message, outcome.error, **fields)
        else:
            log.failure(outcome.message, outcome.error, reason=outcome.reason, **fields)
        if self._opened and pair is not None:
            metrics.closed(pair.to_target[0], pair.to_client[0])
        elif outcome.metric == UPSTREAM_FAILED:
            metrics.upstream_failed()
        elif outcome.metric is not None:
            metrics.header_error(outcome.metric)
        self._services.tracker.remove(self)

    # -------------------------------------------------------------- header

    def serve(self) -> None:
        """Read the header, connect upstream and start the relay; runs on a pool worker and
        never raises.

        A header that has not all arrived yet waits in the parking lot without a thread;
        the lot runs this again when more of it comes, or when its deadline passes.
        """
        metrics = self._services.metrics
        try:
            found = self._read_header()
            if found is None:
                return  # parked until more of the header arrives
            header, payload = found
            metrics.header_parsed(time.monotonic() - self._started)
            _check_transport(header)  # a parse failure to go-mmproxy: before "parsed" is said
            if self._log.failures:
                self._log_header(header)
            with self._lock:
                self._state = State.CONNECTING
            conn_up = self._connect(header)
        except RefusedError as refusal:
            message = logs.tcp_refusal_message(refusal.reason)
            self._finish(Outcome(message, str(refusal), refusal.reason, refusal.reason))
            return
        except HeaderError as error:
            # A peer that closed before sending a byte is a failed read, as go-mmproxy has it.
            failed_read = error.reason == Reason.INCOMPLETE and not self._buffer
            message = logs.MSG_READ_HEADER_FAILED if failed_read else logs.MSG_PARSE_HEADER_FAILED
            self._finish(Outcome(message, error, None, error.reason))
            return
        except OSError as error:
            self._finish(Outcome(logs.MSG_READ_HEADER_FAILED, error, READ_ERROR, READ_ERROR))
            return
        except BaseException as error:
            self._finish(Outcome(_BEFORE_RELAY, repr(error)))
            raise
        self._relay(conn_up, payload)

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
                self._header_stopped,
                timeout=max(remaining, 0.001),
                abandon=lambda: self._header_stopped(_STOPPED),
            )
        except RuntimeError as error:  # the lot is closed: the daemon is stopping
            raise RefusedError(STOPPING, "daemon is stopping", str(error)) from error
        return True

    def _header_stopped(self, error: BaseException | str) -> None:
        """A parked header cannot be read on: the pool or the lot refused (stopping)."""
        self._finish(Outcome("daemon is stopping", str(error), STOPPING, STOPPING))

    # -------------------------------------------------------------- relay

    def _relay(self, conn_up: upstream.Upstream, payload: bytes) -> None:
        """Relay both ways: with a parking lot, park both directions (the lot moves small
        messages itself); without one, backward on another worker, forward on this thread."""
        services = self._services
        pair = Pair(
            self._sock,
            conn_up.sock,
            services.config.idle_timeout,
            services.pipes,
            grace=services.grace if services.parking is not None else 0.0,
        )
        with self._lock:
            self._pair = pair
            aborted = self._aborted
            if not aborted:
                self._state = State.RELAYING
                self._threads = 1  # this one
        if conn_up.fallback:
            self._log.notice(
                "client port in use here: connected from an ephemeral port instead",
                upstreamSource=logs.local_address(conn_up.sock),
            )
        if aborted:
            self._finish(Outcome("daemon is stopping", None, STOPPING))
            return
        self._log.state(logs.MSG_UPSTREAM_ESTABLISHED)
        services.metrics.opened()
        self._opened = True
        parking = services.parking
        try:
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._log.state(logs.MSG_NODELAY_DOWNSTREAM)
            self._log.state(logs.MSG_NODELAY_UPSTREAM)  # upstream.connect_* set it already
            if payload:
                try:
                    conn_up.sock.sendall(payload)  # what came with the header goes first
                except OSError as error:
                    self._finish(Outcome(logs.MSG_WRITE_UPSTREAM_FAILED, error))
                    return
                pair.to_target[0] += len(payload)
            if self._kernel_relay(pair):
                return
        except OSError as error:
            self._finish(Outcome("relay could not start", error))
            return
        if parking is not None:
            # Both directions wait in the lot, which moves small messages and the ends itself
            # (mmproxy.hop) and gives a direction a thread only for bulk: this one is free.
            self._release()
            self._wait(pair, FORWARD)
            self._wait(pair, BACKWARD)
            return
        with self._lock:
            self._threads += 1  # the backward direction, about to get a worker
        try:
            services.pool.submit(lambda: self._run(pair, BACKWARD))
        except (OSError, RuntimeError) as error:
            self._release()
            self._lost(pair, error)  # ends the pair: the run below sees it at once
        self._run(pair, FORWARD)

    def _kernel_relay(self, pair: Pair) -> bool:
        """--relay sockmap: hand the pair to the kernel (mmproxy.sockmap), which relays it
        holding no thread and reports its end; False when it stays with the splice relay.
        Raises OSError when a socket failed while its queue was drained."""
        services = self._services
        if services.kernel is None or services.parking is None:
            return False
        kernel_pair = KernelPair(
            services.kernel,
            pair,
            services.parking,
            lambda: self._finish(self._ending(pair)),
            services.config.idle_timeout,
        )
        self._release()  # PARKED from here: the kernel pair may finish at any moment
        fallback = kernel_pair.start()
        services.metrics.kernel_relay(fallback)
        if fallback is None:
            self._log.state("relayed in the kernel")
            return True
        self._take()  # back on this thread, for the splice relay
        # A side that already ended is ordinary: only at -v 2.
        say = self._log.state if fallback == FALLBACK_ENDED else self._log.notice
        say(f"kernel relay not used ({fallback}): relaying with splice")
        return False

    def _run(self, pair: Pair, side: int) -> None:
        """Run direction ``side`` on this thread (counted in ``_threads``) until it is quiet
        (then it parks) or ends (the last one to end finishes the connection).  A direction
        that ends while the other one is parked hands this thread over to it: a request and
        its answer, and the close that follows, need no second thread."""
        step = pair.run(side)
        if step is Step.QUIET:
            self._release()
            self._wait(pair, side)
        elif step is Step.LAST:
            self._finish(self._ending(pair))
        elif self._services.parking is not None and self._services.parking.withdraw(
            pair.source(1 - side)
        ):
            self._run(pair, 1 - side)
        else:
            self._release()

    def _ending(self, pair: Pair) -> Outcome:
        """The outcome of a relay whose directions have both ended."""
        if pair.idle:
            timeout = self._services.config.idle_timeout
            detail = f"no data in either direction for {timeout:g}s"
            return Outcome("idle timeout", detail, IDLE_TIMEOUT)
        error = pair.error
        with self._lock:
            aborted = self._aborted
        if error is not None and not (aborted and error.errno in PEER_GONE):
            return Outcome(logs.MSG_CONNECTION_BROKEN, error)
        return Outcome(logs.MSG_CONNECTION_CLOSING, failure=False)

    def _release(self) -> None:
        """A direction leaves its thread; with none left on one, the connection is parked."""
        with self._lock:
            self._threads -= 1
            if self._threads or self._state is not State.RELAYING:
                return
            self._state = State.PARKED
            self._services.metrics.parked()

    def _take(self) -> None:
        """A parked direction is back on a thread."""
        with self._lock:
            self._threads += 1
            if self._state is State.PARKED:
                self._state = State.RELAYING
                self._services.metrics.resumed()

    def _wait(self, pair: Pair, side: int) -> None:
        """Park direction ``side`` (holding no thread) until its source has something,
        or until the pair would be idle for the whole idle timeout."""
        parking = self._services.parking
        try:
            if parking is None:  # a relay without a lot has no grace, so it is never quiet
                raise RuntimeError("no parking lot")
            parking.park_sockets(
                (pair.source(side),),
                lambda: self._resume(pair, side),
                lambda error: self._lost(pair, error),
                timeout=pair.time_to_idle(),
                expire=pair.expire_if_idle,
                abandon=lambda: self._lost(pair, _STOPPED),
                move=lambda buffer: self._move(pair, side, buffer),
            )
        except (OSError, RuntimeError) as error:
            self._lost(pair, error)

    def _move(self, pair: Pair, side: int, buffer: bytearray) -> Job | None:
        """On the lot's thread: move what parked direction ``side`` has, if it is small.
        None: it stays parked; else what to do once it has left the lot."""
        try:
            hop = move(pair, side, buffer)
        except OSError as error:
            return functools.partial(self._lost, pair, error)
        if hop is Hop.MOVED:
            return None
        if hop is Hop.ENDED:
            return lambda: self._lost(pair, None)
        return lambda: self._hand_over(pair, side)

    def _hand_over(self, pair: Pair, side: int) -> None:
        """Give direction ``side``, which left the lot, a worker (bulk or a slow reader)."""
        try:
            self._services.pool.submit(lambda: self._resume(pair, side))
        except (OSError, RuntimeError) as error:
            self._lost(pair, error)

    def _resume(self, pair: Pair, side: int) -> None:
        self._take()
        self._run(pair, side)

    def _lost(self, pair: Pair, error: BaseException | str | None) -> None:
        """A direction that holds no thread is over: its source ended (``error`` None) or it
        cannot get a thread, and the pair ends with ``error``."""
        if error is not None and not isinstance(error, OSError):
            error = ConnectionAbortedError(errno.ECONNABORTED, str(error))
        if pair.end(error) is Step.LAST:
            self._finish(self._ending(pair))

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
        timeout = config.connect_timeout
        peer = ipaddress.ip_address(self._peer.partition("%")[0])
        route = policy.decide(header, peer, config, self._services.destinations)
        try:
            if route.source is None:  # LOCAL, UNKNOWN, UNSPEC, AF_UNIX: none to impersonate
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


class TcpServer(Server):
    """Acceptors, workers and the live connections of one daemon run."""

    protocol = "tcp"
    relays = "connections"

    def __init__(
        self,
        config: Config,
        log: logging.Logger,
        sockets: list[socket.socket],
        capacity: int,
        allow_list: AllowListHolder,
        metrics: Metrics = NO_METRICS,
        pipes: PipeBudget = UNLIMITED,
        kernel: KernelRelay | None = None,
        destinations: policy.Destinations | None = None,
    ) -> None:
        super().__init__(config, log, sockets, allow_list, metrics, destinations)
        self._kernel = kernel
        self._tracker = Tracker(capacity)
        # Each connection holds at most two workers (header and connect, then one per direction).
        self.max_workers = WORKERS_PER_CONNECTION * capacity + SPARE_WORKERS
        self._pool = WorkerPool(max_workers=self.max_workers)
        metrics.limits(capacity, self.max_workers, lambda: self._pool.size)
        self._parking = ParkingLot(self._pool, threads=lot_threads())
        self._services = Services(
            config,
            logs.ConnectionLog(log, config.verbose, listener_fields(config, sockets)),
            self._pool,
            self._tracker,
            metrics,
            pipes,
            self._parking,
            kernel=kernel,
            destinations=destinations,
        )
        self._acceptors = [
            Acceptor(sock, number, self._admit, log, self._wait_for_room)
            for number, sock in enumerate(sockets)
        ]
        self._full = Throttle(10.0)

    @property
    def capacity(self) -> int:
        return self._tracker.capacity

    def live(self) -> int:
        return len(self._tracker)

    def _serving(self) -> Sequence[Serving]:
        return self._acceptors

    def _start_services(self) -> None:
        self._parking.start()

    def _wait_for_room(self) -> bool:
        """Runs on an acceptor thread before accept(): at the cap, pause until a slot frees."""
        tracker = self._tracker
        if tracker.wait_for_room(0):
            return True
        metrics = self._metrics
        metrics.accept_paused(True)
        suppressed = self._full.ready()
        if suppressed is not None:
            self._log.warning(
                "connection limit reached: not accepting until a connection ends",
                extra={"maxConnections": tracker.capacity, "suppressed": suppressed},
            )
        try:
            return tracker.wait_for_room()
        finally:
            metrics.accept_paused(False)

    def _admit(self, sock: socket.socket, peer: tuple[str, int], number: int) -> None:
        """Runs on an acceptor thread: decide before a byte is read, then hand over."""
        services = self._services
        services.metrics.accepted()
        if not self.allows(peer[0]):
            if services.log.failures:
                services.log.failure(
                    logs.MSG_ORIGIN_NOT_ALLOWED,
                    "the peer is not in the allowed subnets",
                    reason=Refusal.NOT_ALLOWED,
                    **{
                        logs.REMOTE_ADDR: host_port(*peer),
                        logs.LOCAL_ADDR: logs.local_address(sock),
                        logs.LISTENER_NUM: number,
                    },
                )
            sock.close()
            services.metrics.refused(Refusal.NOT_ALLOWED)
            return
        connection = Connection(sock, peer, number, services)
        if not self._tracker.add(connection):  # waits at the cap; False: stopping
            sock.close()
            return
        try:
            self._pool.submit(connection.serve)
        except (RuntimeError, OSError) as error:
            connection.not_served(error)

    def _stop_admitting(self) -> None:
        self._tracker.close()  # wakes acceptors paused at the cap
        for acceptor in self._acceptors:
            acceptor.stop()

    def _stopping_status(self) -> str:
        return f"draining {self.live()} connections"

    def _wind_down(self, cause: str, interrupted: Callable[[], bool]) -> None:
        """Drain live connections, then shut the rest down and close the workers."""
        timeout = self._config.drain_timeout
        self._log.info(
            "stopping: no longer accepting, draining live connections",
            extra={"signal": cause, "liveConnections": self.live(), "drainTimeout": timeout},
        )
        if not self._drain(timeout, interrupted):
            aborted = self._tracker.abort_all()
            self._log.warning(
                "drain ended: shutting the remaining connections down",
                extra={"liveConnections": aborted},
            )
            self._tracker.wait_empty(AFTER_ABORT_WAIT)
        self._parking.close()  # after the drain: parked connections are live ones
        self._pool.close(timeout=1.0)
        if self._kernel is not None:
            self._kernel.close()

    def _drain(self, timeout: float, interrupted: Callable[[], bool]) -> bool:
        """Wait for live connections to end; False on timeout or when ``interrupted()``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if self._tracker.wait_empty(min(max(remaining, 0.0), DRAIN_POLL)):
                return True
            if remaining <= 0 or interrupted():
                return False
