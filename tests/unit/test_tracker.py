"""The connection tracker's cap, as a parked acceptor sees it (``room_or_wake``)."""

from __future__ import annotations

from typing import Any

from mmproxy.tcp import Tracker


def full_tracker() -> tuple[Tracker, Any]:
    tracker = Tracker(1)
    connection: Any = object()  # the tracker only holds and counts them
    assert tracker.add(connection)
    return tracker, connection


def test_room_below_the_cap_and_a_wake_once_a_slot_frees() -> None:
    tracker, connection = full_tracker()
    woken: list[str] = []
    assert tracker.room_or_wake(lambda: woken.append("first")) is False
    assert tracker.room_or_wake(lambda: woken.append("second")) is False
    assert woken == []
    tracker.remove(connection)
    assert woken == ["first", "second"]
    assert tracker.room_or_wake(lambda: woken.append("third")) is True
    tracker.remove(object())  # not there: no slot freed, nobody woken again
    assert woken == ["first", "second"]


def test_closing_wakes_whoever_waits_so_their_pause_ends() -> None:
    tracker, _ = full_tracker()
    woken: list[str] = []
    assert tracker.room_or_wake(lambda: woken.append("paused")) is False
    tracker.close()
    assert woken == ["paused"]
    # Once closed there is no pause to end: nothing is registered, and None says why.
    assert tracker.room_or_wake(lambda: woken.append("late")) is None
    tracker.close()
    assert woken == ["paused"]
