"""One TCP connection's life: header, upstream, relay, outcome.

A :class:`Connection` moves through explicit states (:class:`State`): HEADER, CONNECTING,
RELAYING (at least one direction on a thread) and PARKED (none), then DONE.  Every way out,
whatever the state and whichever thread finds it, goes through :meth:`Connection._finish`,
which closes, logs, counts and leaves the tracker exactly once.

:meth:`Connection.start`, on the acceptor thread, reads the header and connects upstream
(:mod:`mmproxy.handshake`) without blocking (a header still arriving parks, a connect still
under way goes to a pool worker), then parks both relay directions in the parking lot, which
moves small messages and ends itself (:mod:`mmproxy.hop`); bulk, or a slow reader, gets a pool
worker that splices until its source has been quiet for :data:`QUIET_GRACE`.  With
``--relay sockmap`` an established pair goes to the kernel instead, at one call site
(:meth:`Connection._kernel_relay`).

Descriptor ownership: the connection owns the client socket from accept, and both sockets
once the relay starts (:class:`~mmproxy.relay.Pair` holds them), and only ``_finish`` closes
them, under the connection's lock.  :meth:`Connection.abort` (graceful stop) only ever shuts
sockets down, under the same lock, never closes them; the lot never closes a socket.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import functools
import ipaddress
import math
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from mmproxy import handshake, logs, policy, upstream
from mmproxy.config import Config
from mmproxy.errors import HeaderError, Reason, Refusal, RefusedError
from mmproxy.header import IPAddress, host_port
from mmproxy.hop import Hop, move
from mmproxy.metrics import NO_METRICS, Metrics
from mmproxy.outcome import Outcome, relay_ended, report
from mmproxy.parking import ParkingLot
from mmproxy.pool import Job, WorkerPool
from mmproxy.protocol import ProxyHeader
from mmproxy.relay import BACKWARD, FORWARD, UNLIMITED, Pair, PipeBudget, Step
from mmproxy.sockmap import FALLBACK_ENDED, KernelPair, KernelRelay

_BEFORE_RELAY = "connection failed before the relay started"

# Seconds a relay direction may wait for its source on a thread before it parks that socket
# and gives the thread back (bench/README.md: how it was chosen).
QUIET_GRACE = 0.25


def socket_host(text: str) -> IPAddress:
    """The address in a host string a socket call gave (``accept()``): an IPv4 dotted quad
    without the text parser's cost, anything else by ``ipaddress`` (a zone suffix dropped)."""
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        return ipaddress.ip_address(text.partition("%")[0])


class Registry(Protocol):
    """Where live connections are counted (the server's tracker): a finished one leaves."""

    def remove(self, connection: Connection) -> None: ...


@dataclass(frozen=True, slots=True)
class Services:
    """What every connection shares: configuration, logging, threads, bookkeeping, metrics."""

    config: Config
    log: logs.ConnectionLog
    pool: WorkerPool
    tracker: Registry
    metrics: Metrics = NO_METRICS
    pipes: PipeBudget = UNLIMITED
    parking: ParkingLot | None = None  # None: relay at once, one thread per direction
    grace: float = QUIET_GRACE  # seconds a quiet direction keeps its thread (with a lot)
    kernel: KernelRelay | None = None  # --relay sockmap: established pairs go to the kernel
    # Serve a connection where it is seen (the accepting thread, the lot's) whenever that
    # cannot block: one thread for everything with the GIL; free-threaded builds hand the
    # header and the connect to a worker, which runs beside the acceptor.
    inline: bool = False
    destinations: policy.Destinations | None = None  # with -dynamic-destination


class State(enum.Enum):
    """Where a connection is in its life; it only ever moves down this list (PARKED and
    RELAYING alternate), and every way out goes to DONE through :meth:`Connection._finish`."""

    HEADER = "header"  # reading the PROXY header (on a worker, or parked until more arrives)
    CONNECTING = "connecting"  # header parsed, connecting upstream
    RELAYING = "relaying"  # relayed, at least one direction holds a thread
    PARKED = "parked"  # relayed, no direction holds a thread: every live one waits in the lot
    DONE = "done"  # closed, logged, counted, out of the tracker


# A wait that could not go on: the lot or the pool refused it (the daemon is stopping).
_STOPPED = "the daemon is stopping"


class Connection:
    """A client connection from the load balancer, from accept to close.

    :meth:`start` (or the job :meth:`serve`) reads the header and connects upstream; then
    both directions park, and the lot moves their small messages and ends (:meth:`_move`).
    A direction with more goes to a pool worker (:meth:`_run`) until it ends or has been
    quiet for the grace, when it parks its source socket again.  ``_threads`` counts the
    directions on a thread now; with none, a relayed connection is PARKED.
    """

    def __init__(
        self, sock: socket.socket, peer: tuple[str, int], listener_num: int, services: Services
    ) -> None:
        self._sock = sock
        self._peer = peer[0]  # the load balancer's address, as accept() gave it
        self._services = services
        # The lot starts the relay (the splice relay, with a lot): nothing on the way blocks.
        # Then, when asked to, the header and the connect are served where they are seen.
        self._lot_relays = services.kernel is None and services.parking is not None
        self._never_blocks = services.inline and self._lot_relays
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
        if was_parked:
            self._services.metrics.resumed()
        relayed = pair if self._opened else None
        report(outcome, self._log, self._services.metrics, relayed)
        self._services.tracker.remove(self)

    # -------------------------------------------------------------- header

    def start(self) -> None:
        """On the accepting thread: serve the connection there, or hand it to a worker.

        With ``Services.inline`` (and the splice relay and a lot) it goes as far as it can
        without blocking: the header is usually all there and the backend's handshake over
        by the time ``connect()`` returns (it is on this host), so the relay starts here and
        the lot takes it from there, and no worker is woken.  A connect still under way goes
        to a worker to wait.  Otherwise (the kernel relay's hand-over, a relay without a lot
        block; free-threaded builds run the worker beside the acceptor) :meth:`serve` runs
        on a worker.
        """
        if self._never_blocks:
            self._serve(blocking=False)
            return
        services = self._services
        try:
            services.pool.submit(self.serve)
        except (RuntimeError, OSError) as error:
            self.not_served(error)

    def serve(self) -> None:
        """:meth:`start`'s work on a pool worker, where waiting is allowed; never raises.

        A header that has not all arrived yet waits in the parking lot without a thread;
        the lot runs this again when more of it comes, or when its deadline passes.
        """
        self._serve(blocking=True)

    def _serve(self, *, blocking: bool) -> None:
        """Read the header, start the upstream connect and, once it is up, the relay."""
        metrics = self._services.metrics
        try:
            found = self._read_header()
            if found is None:
                return  # parked until more of the header arrives
            header, payload = found
            metrics.header_parsed(time.monotonic() - self._started)
            handshake.check_transport(
                header
            )  # a parse failure to go-mmproxy: before "parsed" is said
            if self._log.failures:
                self._log_header(header)
            with self._lock:
                self._state = State.CONNECTING
            connecting = handshake.connect(
                header, self._balancer(), self._services.config, self._services.destinations
            )
        except BaseException as error:
            self._failed(error)
            if not isinstance(error, Exception):
                raise
            return
        if blocking or connecting.done():
            self._connected(connecting, payload)
            return
        try:
            self._services.pool.submit(lambda: self._connected(connecting, payload))
        except (RuntimeError, OSError) as error:
            connecting.sock.close()
            self.not_served(error)

    def _connected(self, connecting: upstream.Connecting, payload: bytes) -> None:
        """Wait for the upstream connect if it is still under way, then relay."""
        try:
            conn_up = handshake.connected(connecting)
        except BaseException as error:
            self._failed(error)
            if not isinstance(error, Exception):
                raise
            return
        self._relay(conn_up, payload)

    def _failed(self, error: BaseException) -> None:
        """Finish a connection whose header or upstream connect failed, saying why."""
        if isinstance(error, RefusedError):
            message = logs.tcp_refusal_message(error.reason)
            self._finish(Outcome(message, str(error), error.reason, error.reason))
        elif isinstance(error, HeaderError):
            # A peer that closed before sending a byte is a failed read, as go-mmproxy has it.
            failed_read = error.reason == Reason.INCOMPLETE and not self._buffer
            message = logs.MSG_READ_HEADER_FAILED if failed_read else logs.MSG_PARSE_HEADER_FAILED
            self._finish(Outcome(message, error, None, error.reason))
        elif isinstance(error, OSError):
            self._finish(
                Outcome(logs.MSG_READ_HEADER_FAILED, error, Refusal.READ_ERROR, Refusal.READ_ERROR)
            )
        else:
            self._finish(Outcome(_BEFORE_RELAY, repr(error)))

    def _read_header(self) -> tuple[ProxyHeader, bytes] | None:
        """The header and the bytes that came after it, or None when parked to wait for more.

        Raises the refusals: a timeout, a peer that closed, a bad header.
        """
        while True:
            found = handshake.read_header(self._sock, self._buffer)
            if found is not None:
                return found
            if time.monotonic() >= self._deadline:
                timeout = self._services.config.header_timeout
                raise handshake.header_timeout(len(self._buffer), timeout)
            if self._wait_for_more():
                return None

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
                move=self._more_arrived if self._never_blocks else None,
            )
        except RuntimeError as error:  # the lot is closed: the daemon is stopping
            raise RefusedError(Refusal.STOPPING, "daemon is stopping", str(error)) from error
        return True

    def _more_arrived(self, _buffer: memoryview) -> Job:
        """On the lot's thread, when more of a parked header came: go on right there, as
        :meth:`start` does on the acceptor (it never blocks), instead of waking a worker."""
        return functools.partial(self._serve, blocking=False)

    def _header_stopped(self, error: BaseException | str) -> None:
        """A parked header cannot be read on: the pool or the lot refused (stopping)."""
        self._finish(Outcome("daemon is stopping", str(error), Refusal.STOPPING, Refusal.STOPPING))

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
            self._finish(Outcome("daemon is stopping", None, Refusal.STOPPING))
            return
        log = self._log
        if log.states:
            log.state(logs.MSG_UPSTREAM_ESTABLISHED)
            log.state(logs.MSG_NODELAY_DOWNSTREAM)  # inherited from the listening socket
            log.state(logs.MSG_NODELAY_UPSTREAM)  # upstream.connect_* set it already
        services.metrics.opened()
        self._opened = True
        parking = services.parking
        try:
            if payload:  # what came with the header goes first
                try:
                    self._send_first(pair, payload)
                except OSError as error:
                    self._finish(Outcome(logs.MSG_WRITE_UPSTREAM_FAILED, error))
                    return
            if self._kernel_relay(pair):
                return
        except OSError as error:
            self._finish(Outcome("relay could not start", error))
            return
        if parking is not None:
            # Both directions wait in the lot, which moves small messages and the ends itself
            # (mmproxy.hop) and gives a direction a thread only for bulk: this one is free.
            self._release()
            if pair.pending[FORWARD]:  # the backend did not take it all: a worker sends it
                self._hand_over(pair, FORWARD)
            else:
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

    def _send_first(self, pair: Pair, payload: bytes) -> None:
        """Send what came with the header; with the lot, without waiting: what the backend
        does not take now waits in ``pair.pending`` for a worker (:meth:`_hand_over`)."""
        sock = pair.upstream
        if not self._lot_relays:
            sock.sendall(payload)  # on a worker: the relay or the hand-over blocks anyway
            pair.to_target[0] += len(payload)
            return
        try:
            sent = sock.send(payload, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        pair.to_target[0] += sent
        if sent < len(payload):
            pair.pending[FORWARD] = payload[sent:]

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
        with self._lock:
            aborted = self._aborted
        return relay_ended(pair, self._services.config.idle_timeout, aborted)

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
                move=functools.partial(self._move, pair, side),
            )
        except (OSError, RuntimeError) as error:
            self._lost(pair, error)

    def _move(self, pair: Pair, side: int, buffer: memoryview) -> Job | None:
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
        target = str(policy.nominal_target(header, self._balancer(), self._services.config))
        self._log = self._log.bind(**{logs.CLIENT_ADDR: client_text, logs.TARGET_ADDR: target})
        if self._log.states:
            self._log.state(logs.MSG_HEADER_PARSED, **logs.tlv_fields(header.tlvs))

    def _balancer(self) -> IPAddress:
        """The load balancer's address (a zone suffix, if any, dropped)."""
        return socket_host(self._peer)
