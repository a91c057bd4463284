"""The TCP server: acceptors, admission at the cap, the live connections, the drain.

:class:`TcpServer` is the TCP side of :mod:`mmproxy.server`.  Every parking-lot thread
accepts on every listening socket (:class:`~mmproxy.listener.ParkedAcceptor`).  Before each
``accept()`` it reserves room under ``--max-connections`` (so at the cap new connections wait in
the kernel's backlog), then checks the allow-list, registers the connection with the
:class:`Tracker` and starts it (:meth:`~mmproxy.connection.Connection.start`: as far as it
goes without blocking); a connection's life from there is :mod:`mmproxy.connection`'s.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence

from mmproxy import logs, policy
from mmproxy.acl import AllowListHolder
from mmproxy.config import Config
from mmproxy.connection import Connection, Services
from mmproxy.errors import Refusal
from mmproxy.header import host_port
from mmproxy.listener import ParkedAcceptor, Throttle, listener_fields
from mmproxy.metrics import NO_METRICS, Metrics
from mmproxy.parking import ParkingLot, lot_threads
from mmproxy.pool import WorkerPool
from mmproxy.relay import UNLIMITED, PipeBudget
from mmproxy.server import Server, Serving
from mmproxy.sockmap import KernelRelay

WORKERS_PER_CONNECTION = 2  # the most threads one TCP connection holds at once
SPARE_WORKERS = 16  # for workers between a finished job and the idle stack
AFTER_ABORT_WAIT = 5.0  # seconds connections get to unwind after being shut down
DRAIN_POLL = 0.2  # seconds between looks for a second stop signal while draining


class Tracker:
    """The live connections, capped (``--max-connections``).

    An acceptor reserves a slot (:meth:`reserve`) before it calls ``accept()``, so that at the
    cap new connections wait in the kernel's backlog instead of costing descriptors here, and
    acceptors on several threads can never admit more than the cap between them.  What
    ``accept()`` gives is then admitted (:meth:`admit`), or the slot given back
    (:meth:`release`).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._live: set[Connection] = set()
        self._reserved = 0  # slots promised to acceptors, not yet admitted nor released
        # A plain lock under the condition: nothing here re-enters, and each connection takes
        # it three times (a Condition's own with-block is a Python call, an RLock slower).
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._closed = False  # no more admissions: the daemon is stopping
        self._wakers: list[Callable[[], None]] = []  # called once when a slot frees

    def reserve(self, wake: Callable[[], None]) -> bool | None:
        """True: a slot is held for the next connection; None when closed.  False (at the
        cap): ``wake`` will be called once, on the thread that frees a slot or on the one
        that closes the tracker."""
        with self._lock:
            if self._closed:
                return None
            if len(self._live) + self._reserved < self.capacity:
                self._reserved += 1
                return True
            self._wakers.append(wake)
            return False

    def admit(self, connection: Connection) -> bool:
        """Register ``connection`` in a reserved slot; False (the slot dropped) once closed."""
        with self._lock:
            self._reserved -= 1
            if self._closed:
                return False
            self._live.add(connection)
            return True

    def release(self) -> None:
        """Give back a reserved slot that no connection took."""
        self._free(self._release_slot)

    def close(self) -> None:
        """Admit no more connections; wakes acceptors waiting for room."""
        with self._lock:
            self._closed = True
            self._changed.notify_all()
            wakers, self._wakers = self._wakers, []
        for wake in wakers:
            wake()

    def remove(self, connection: Connection) -> None:
        self._free(lambda: self._live.discard(connection))

    def _release_slot(self) -> None:
        self._reserved -= 1

    def _free(self, change: Callable[[], None]) -> None:
        """Apply ``change`` (it frees at most a slot), under the lock; if that took the
        tracker off its cap, wake whoever waits for room."""
        wakers: list[Callable[[], None]] = []
        with self._lock:
            was_full = len(self._live) + self._reserved >= self.capacity
            change()
            now_full = len(self._live) + self._reserved >= self.capacity
            if not self._live:
                self._changed.notify_all()  # wait_empty
            if was_full and not now_full and not self._closed:
                wakers, self._wakers = self._wakers, []
        for wake in wakers:
            wake()

    def __len__(self) -> int:
        with self._lock:
            return len(self._live)

    def wait_empty(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the last connection to end; True if none is left."""
        with self._lock:
            return self._changed.wait_for(lambda: not self._live, timeout)

    def abort_all(self) -> int:
        """Shut every live connection down; returns how many there were."""
        with self._lock:
            live = list(self._live)
        for connection in live:
            connection.abort()
        return len(live)


class Gate:
    """What a parked acceptor asks before each ``accept()``: the tracker's cap, with the
    warning and the metrics that go with reaching it (:class:`~mmproxy.listener.Admission`)."""

    def __init__(self, tracker: Tracker, metrics: Metrics, log: logging.Logger) -> None:
        self._tracker = tracker
        self._metrics = metrics
        self._log = log
        self._full = Throttle(10.0)

    def reserve(self, wake: Callable[[], None]) -> bool | None:
        room = self._tracker.reserve(wake)
        if room is False:
            suppressed = self._full.ready()
            if suppressed is not None:
                self._log.warning(
                    "connection limit reached: not accepting until a connection ends",
                    extra={"maxConnections": self._tracker.capacity, "suppressed": suppressed},
                )
        return room

    def release(self) -> None:
        self._tracker.release()

    def paused(self, paused: bool) -> None:
        self._metrics.accept_paused(paused)


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
            inline=True,  # a lot's thread accepts, starts and moves
        )
        gate = Gate(self._tracker, metrics, log)
        self._acceptors = [
            ParkedAcceptor(sock, number, self._admit, log, self._parking.lots, gate)
            for number, sock in enumerate(sockets)
        ]

    @property
    def capacity(self) -> int:
        return self._tracker.capacity

    def live(self) -> int:
        return len(self._tracker)

    def _serving(self) -> Sequence[Serving]:
        return self._acceptors

    def _start_services(self) -> None:
        self._parking.start()

    def _admit(self, sock: socket.socket, peer: tuple[str, int], number: int) -> None:
        """Runs on a lot's thread with a slot reserved: decide before a byte is read, then
        start the connection.  The slot is taken by the connection or given back."""
        try:
            connection = self._allowed(sock, peer, number)
        except BaseException:
            self._tracker.release()
            raise
        if connection is None:
            self._tracker.release()
        elif self._tracker.admit(connection):
            connection.start()
        else:  # stopping: the slot is gone
            sock.close()

    def _allowed(
        self, sock: socket.socket, peer: tuple[str, int], number: int
    ) -> Connection | None:
        """The connection, or None when its peer is refused (closed and logged here)."""
        services = self._services
        services.metrics.accepted()
        if self.allows(peer[0]):
            return Connection(sock, peer, number, services)
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
        return None

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
