"""What the TCP and UDP servers share, in socketserver's shape.

A server owns its listening sockets and what serves each (TCP: an acceptor, run by the
parking lot's threads; UDP: a dispatcher thread), admission (the allowed subnets), a
capacity, and the way it stops.
:class:`Server` holds the sequence; :class:`~mmproxy.tcp.TcpServer` and
:class:`~mmproxy.udp.UdpServer` fill in the hooks.  The daemon (:mod:`mmproxy.daemon`)
keeps the process: limits, signals, readiness, reload, and which server it runs.

Stopping is one sequence for both: stop admitting, announce it (systemd's ``STOPPING=1``,
with what is left to do), let live work finish or end it (:meth:`Server._wind_down`),
then log ``stopped``.
"""

from __future__ import annotations

import abc
import logging
import socket
from collections.abc import Callable, Sequence
from typing import ClassVar, Protocol

from mmproxy import policy
from mmproxy.acl import AllowListHolder
from mmproxy.config import Config
from mmproxy.metrics import NO_METRICS, Metrics


class Serving(Protocol):
    """What serves one listening socket (an acceptor or a dispatcher)."""

    def start(self, protocol: str) -> None: ...

    def alive(self) -> bool: ...


def _never() -> bool:
    return False


def _silent(status: str) -> None:
    pass


class Server(abc.ABC):
    """Listeners, their serving threads, admission, capacity, stop."""

    protocol: ClassVar[str]  # "tcp" or "udp": the listeners' kind, in thread names and logs
    relays: ClassVar[str]  # what the server relays, for the status line: "connections"...

    def __init__(
        self,
        config: Config,
        log: logging.Logger,
        sockets: list[socket.socket],
        allow_list: AllowListHolder,
        metrics: Metrics = NO_METRICS,
        destinations: policy.Destinations | None = None,
    ) -> None:
        self._config = config
        self._log = log
        self._sockets = sockets
        self._allow_list = allow_list
        self._metrics = metrics
        self._destinations = destinations

    @property
    def log(self) -> logging.Logger:
        return self._log

    @property
    @abc.abstractmethod
    def capacity(self) -> int:
        """The most connections (flows) live at once."""

    @abc.abstractmethod
    def live(self) -> int:
        """Connections (flows) live now."""

    @abc.abstractmethod
    def _serving(self) -> Sequence[Serving]:
        """The serving threads, one per listening socket."""

    @abc.abstractmethod
    def _start_services(self) -> None:
        """Hook: start what the serving threads hand work to (before they start)."""

    def start(self) -> None:
        self._start_services()
        for thread in self._serving():
            thread.start(self.protocol)

    def healthy(self) -> bool:
        """Every serving thread is serving (what the systemd watchdog vouches for)."""
        return all(thread.alive() for thread in self._serving())

    def allows(self, peer: str) -> bool:
        """Admission: ``peer`` is in the allowed subnets in force now."""
        return self._allow_list.current.allows(peer)

    @abc.abstractmethod
    def _stop_admitting(self) -> None:
        """Hook: take no more work (the serving threads may stop here or in the wind-down)."""

    @abc.abstractmethod
    def _stopping_status(self) -> str:
        """What is left to do once admission has stopped, for systemd's STATUS."""

    @abc.abstractmethod
    def _wind_down(self, cause: str, interrupted: Callable[[], bool]) -> None:
        """Let live work finish (until ``interrupted()`` or the drain timeout), end the rest."""

    def stop(
        self,
        cause: str,
        announce: Callable[[str], None] = _silent,
        interrupted: Callable[[], bool] = _never,
    ) -> None:
        """Stop admitting, ``announce`` the status, wind down, log ``stopped``."""
        self._stop_admitting()
        announce(self._stopping_status())
        self._wind_down(cause, interrupted)
        self._log.info("stopped")
