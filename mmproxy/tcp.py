"""The TCP server: acceptors, admission at the cap, the live connections, the drain.

:class:`TcpServer` is the TCP side of :mod:`mmproxy.server`.  Each acceptor thread waits for
room under ``--max-connections`` before it calls ``accept()`` (so at the cap new connections
wait in the kernel's backlog), checks the allow-list, registers the connection with the
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
from mmproxy.listener import Acceptor, ParkedAcceptor, Throttle, listener_fields
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
    """The live connections, capped (``--max-connections``): at the cap, admission waits.

    :meth:`wait_for_room` is what an acceptor calls before ``accept()``, so that at the cap
    new connections wait in the kernel's backlog instead of costing threads here.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._live: set[Connection] = set()
        self._changed = threading.Condition()
        self._closed = False  # no more admissions: the daemon is stopping
        self._wakers: list[Callable[[], None]] = []  # called once when a slot frees

    def wait_for_room(self, timeout: float | None = None) -> bool:
        """Wait until a connection may be added; False when closed (or on timeout)."""
        with self._changed:
            self._changed.wait_for(lambda: self._closed or len(self._live) < self.capacity, timeout)
            return not self._closed and len(self._live) < self.capacity

    def room_or_wake(self, wake: Callable[[], None]) -> bool | None:
        """True when a connection may be added now; None when closed.  False: ``wake`` will
        be called once, on the thread that frees a slot or on the one that closes the tracker."""
        with self._changed:
            if self._closed:
                return None
            if len(self._live) < self.capacity:
                return True
            self._wakers.append(wake)
            return False

    def add(self, connection: Connection) -> bool:
        """Register ``connection``, waiting for room at the cap; False once closed.

        Another listener's acceptor may have taken the last slot since this one's
        :meth:`wait_for_room`: then this waits, holding one accepted socket.
        """
        with self._changed:
            while not self._closed and len(self._live) >= self.capacity:
                self._changed.wait()
            if self._closed:
                return False
            self._live.add(connection)
            return True

    def close(self) -> None:
        """Admit no more connections; wakes acceptors waiting for room."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            wakers, self._wakers = self._wakers, []
        for wake in wakers:
            wake()

    def remove(self, connection: Connection) -> None:
        wakers: list[Callable[[], None]] = []
        with self._changed:
            was_full = len(self._live) >= self.capacity
            self._live.discard(connection)
            if was_full or not self._live:
                self._changed.notify_all()
            if was_full and not self._closed:
                wakers, self._wakers = self._wakers, []
        for wake in wakers:
            wake()

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
            inline=self._parking.threads == 1,  # the GIL: one thread does it all
        )
        self._acceptors: list[Acceptor | ParkedAcceptor]
        if self._services.inline:  # the lot's one thread accepts, starts and moves
            self._acceptors = [
                ParkedAcceptor(sock, number, self._admit, log, self._parking, self._room)
                for number, sock in enumerate(sockets)
            ]
        else:
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

    def _room(self, wake: Callable[[], None]) -> bool:
        """A parked acceptor's look before accept(): at the cap it leaves the lot, and
        ``wake`` brings it back once a slot frees."""
        room = self._tracker.room_or_wake(lambda: self._resume_accepting(wake))
        if room is not False:  # room now, or stopping: not paused
            return bool(room)
        self._metrics.accept_paused(True)  # the tracker's wake ends the pause, even at close
        self._warn_full()
        return False

    def _resume_accepting(self, wake: Callable[[], None]) -> None:
        self._metrics.accept_paused(False)
        wake()

    def _warn_full(self) -> None:
        suppressed = self._full.ready()
        if suppressed is not None:
            self._log.warning(
                "connection limit reached: not accepting until a connection ends",
                extra={"maxConnections": self._tracker.capacity, "suppressed": suppressed},
            )

    def _wait_for_room(self) -> bool:
        """Runs on an acceptor thread before accept(): at the cap, pause until a slot frees."""
        tracker = self._tracker
        if tracker.wait_for_room(0):
            return True
        metrics = self._metrics
        metrics.accept_paused(True)
        self._warn_full()
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
        connection.start()

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
