"""systemd's watchdog: ``WATCHDOG=1`` every half period, only while the daemon is healthy.

Healthy means every acceptor (or UDP dispatcher) thread is alive: the threads that take new
work.  A daemon whose acceptors died still runs, holds its port and serves nothing; going
silent lets systemd (``WatchdogSec=``, ``Restart=on-failure``) kill and restart it.  Once
silent it stays silent: the health check is not trusted to come back.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from mmproxy import notify


class Watchdog:
    """A thread that pings systemd every ``interval`` seconds while ``healthy()`` holds."""

    def __init__(
        self,
        interval: float,
        healthy: Callable[[], bool],
        log: logging.Logger,
        send: Callable[[str], object] = notify.notify,
    ) -> None:
        self._interval = interval
        self._healthy = healthy
        self._log = log
        self._send = send
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mmproxy-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._healthy():
                self._log.error(
                    "an acceptor thread is gone: no longer sending WATCHDOG=1 "
                    "(systemd restarts the service when WatchdogSec= runs out)"
                )
                return
            try:
                self._send(notify.WATCHDOG)
            except OSError as error:
                self._log.warning(f"cannot send WATCHDOG=1: {error.strerror or error}")
                return
            self._stop.wait(self._interval)
