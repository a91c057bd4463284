"""The systemd watchdog: the interval from systemd's variables, pings only while healthy."""

from __future__ import annotations

import logging
import os
import threading

import pytest

from mmproxy import notify
from mmproxy.watchdog import Watchdog


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_interval_is_half_of_watchdog_usec(environ: dict[str, str], expected: float | None) -> None:
    assert notify.watchdog_interval(environ) == expected


class Pings:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.changed = threading.Condition()

    def send(self, message: str) -> None:
        with self.changed:
            self.sent.append(message)
            self.changed.notify_all()

    def wait(self, count: int, timeout: float = 10) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: len(self.sent) >= count, timeout=timeout)


def test_pings_while_healthy_and_goes_silent_for_good_when_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pings = Pings()
    healthy = threading.Event()
    healthy.set()
    checked_unhealthy = threading.Event()

    def check() -> bool:
        if healthy.is_set():
            return True
        checked_unhealthy.set()
        return False

    watchdog = Watchdog(0.001, check, logging.getLogger("test-watchdog"), pings.send)
    watchdog.start()
    assert pings.wait(3)
    assert set(pings.sent) == {"WATCHDOG=1"}
    healthy.clear()
    assert checked_unhealthy.wait(10)
    watchdog.stop()  # returns: the thread ended on its own
    healthy.set()  # health coming back does not restart the pings
    assert not pings.wait(len(pings.sent) + 1, timeout=0.2)
    assert "acceptor thread is gone" in caplog.text


def test_stop_ends_the_pings() -> None:
    pings = Pings()
    watchdog = Watchdog(0.001, lambda: True, logging.getLogger("test-watchdog"), pings.send)
    watchdog.start()
    assert pings.wait(2)
    watchdog.stop()
    assert not pings.wait(len(pings.sent) + 1, timeout=0.2)  # 200 intervals: none came
