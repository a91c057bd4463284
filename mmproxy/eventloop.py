"""One thread serving many sockets: epoll, a handler per descriptor, and a timer.

The UDP data path runs on these loops instead of a thread per flow.  A loop calls a
descriptor's handler when it is readable (level-triggered, so a handler may read a bounded
batch and leave the rest for the next turn), and calls its ``timer`` hook once the deadline
the hook last returned has come (after every turn while it returns None).

Between turns a busy loop polls instead of sleeping (:class:`Spin`): while work keeps
arriving within ``SPIN`` of the last turn, it polls without waiting, yielding the CPU between
polls, for up to ``SPIN`` before it blocks.  A loop that sleeps lets its CPU go idle, and
waking an idle CPU from another one (on a virtual machine above all) can take longer than the
turn itself.  Once the gaps grow longer than ``SPIN``, the loop blocks at once again.

Ownership: only the loop's own thread touches the handler table and the epoll set while the
loop runs; another thread may only :meth:`stop` it.  Once :meth:`run` has returned, the
thread that joined it owns everything.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import time
from collections.abc import Callable

Handler = Callable[[], None]
# Called with the loop's time once its last deadline has come; returns the next (monotonic),
# or None to be called after every turn.
Timer = Callable[[float], float | None]

BATCH = 256  # events taken per epoll_wait
SPIN = 200e-6  # seconds a busy loop polls before it sleeps (bench/README.md, issue 15)

_log = logging.getLogger(__name__)


def _no_timer(_now: float) -> float | None:
    return None


class Spin:
    """When the loop polls instead of sleeping: for ``window`` after a turn, if that turn's
    work came within ``window`` of the turn before it ended.  Pure bookkeeping on times the
    loop passes in.

    The loop yields the CPU between empty polls, so a task that shares the CPU runs first.
    An earlier version also stopped polling for 50 ms after a yield that took long (another
    task had run); on an idle virtual machine that held a single busy flow in the slow mode
    (bench/README.md, issue 15, "the back-off"), and under load it measured no better.
    """

    __slots__ = ("_last_end", "allowed", "until", "window")

    def __init__(self, window: float) -> None:
        self.window = window
        self._last_end = -math.inf  # when the last turn with work ended
        self.until = -math.inf  # poll without waiting while the loop's time is before this
        self.allowed = True  # the loop's owner may rule polling out (see Dispatcher._tick)

    def worked(self, started: float, ended: float) -> None:
        """A turn found work at ``started`` and finished it at ``ended``."""
        short = started - self._last_end <= self.window and self.allowed
        self._last_end = ended
        self.until = ended + self.window if short else -math.inf


class EventLoop:
    """An epoll set with a handler per descriptor, served by whichever thread calls :meth:`run`."""

    def __init__(self, spin: float = SPIN) -> None:
        self.spin = Spin(spin)
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._handlers: dict[int, Handler] = {}
        self._stopping = False
        self.timer: Timer = _no_timer
        self._deadline: float | None = None  # when the timer is next due (None: every turn)
        # The time of the current turn, read once after each wait: handlers stamp activity
        # with it instead of reading the clock per datagram.
        self.now = time.monotonic()

    def add_reader(self, fd: int, handler: Handler) -> None:
        """Call ``handler`` whenever ``fd`` is readable; on the loop's thread."""
        self._handlers[fd] = handler
        self._epoll.register(fd, select.EPOLLIN)

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd`` (call before closing it); on the loop's thread."""
        if self._handlers.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)

    def timer_by(self, when: float) -> None:
        """Call the timer at ``when`` at the latest (it has a new deadline); on the loop."""
        if self._deadline is not None and when < self._deadline:
            self._deadline = when

    def stop(self) -> None:
        """Make :meth:`run` return after its current turn (from any thread)."""
        self._stopping = True
        os.eventfd_write(self._wake, 1)

    def run(self) -> None:
        """Serve until :meth:`stop`."""
        epoll, handlers, wake, monotonic = self._epoll, self._handlers, self._wake, time.monotonic
        spin, sched_yield = self.spin, os.sched_yield
        while not self._stopping:
            events: list[tuple[int, int]] = []
            until = spin.until
            if self.now < until:
                events = epoll.poll(0.0, BATCH)
                while not events and monotonic() < until:  # let others here run first
                    sched_yield()
                    events = epoll.poll(0.0, BATCH)
            if not events:
                deadline = self._deadline
                # The turn's time is old by the handlers' few microseconds (and the polling's):
                # a deadline may fire that much late, and the clock is not read again for it.
                timeout = None if deadline is None else max(0.0, deadline - self.now)
                events = epoll.poll(timeout, BATCH)
            self.now = now = monotonic()
            for fd, _mask in events:
                if fd == wake:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(wake)
                    continue
                handler = handlers.get(fd)
                if handler is None:  # removed by an earlier handler of this turn
                    continue
                try:
                    handler()
                except Exception:  # noqa: BLE001 - one socket's bug must not stop the loop
                    _log.exception("an event handler failed")
            if events and spin.allowed:
                spin.worked(now, monotonic())
            deadline = self._deadline  # a handler may have brought it forward (timer_by)
            if deadline is not None and now < deadline:
                continue  # the timer has nothing due before its deadline
            try:
                self._deadline = self.timer(now)
            except Exception:  # noqa: BLE001 - as above
                _log.exception("a loop timer failed")
                self._deadline = None

    def close(self) -> None:
        """Release the epoll and eventfd descriptors; after :meth:`run` has returned."""
        self._handlers.clear()
        self._epoll.close()
        os.close(self._wake)
