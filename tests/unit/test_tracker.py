"""The connection tracker's cap, as parked acceptors see it: slots reserved before accept()."""

from __future__ import annotations

from typing import Any

from mmproxy.tcp import Tracker


def full_tracker() -> tuple[Tracker, Any]:
    tracker = Tracker(1)
    connection: Any = object()  # the tracker only holds and counts them
    assert tracker.reserve(lambda: None) is True
    assert tracker.admit(connection)
    return tracker, connection


def test_room_below_the_cap_and_a_wake_once_a_slot_frees() -> None:
    tracker, connection = full_tracker()
    woken: list[str] = []
    assert tracker.reserve(lambda: woken.append("first")) is False
    assert tracker.reserve(lambda: woken.append("second")) is False
    assert woken == []
    tracker.remove(connection)
    assert woken == ["first", "second"]
    assert tracker.reserve(lambda: woken.append("third")) is True
    tracker.remove(object())  # not there: no slot freed, nobody woken again
    assert woken == ["first", "second"]


def test_closing_wakes_whoever_waits_so_their_pause_ends() -> None:
    tracker, _ = full_tracker()
    woken: list[str] = []
    assert tracker.reserve(lambda: woken.append("paused")) is False
    tracker.close()
    assert woken == ["paused"]
    # Once closed there is no pause to end: nothing is registered, and None says why.
    assert tracker.reserve(lambda: woken.append("late")) is None
    tracker.close()
    assert woken == ["paused"]


def test_a_reserved_slot_counts_against_the_cap_until_admitted_or_released() -> None:
    """Two acceptors on two threads can never hold more than the cap between them."""
    tracker = Tracker(2)
    woken: list[str] = []
    assert tracker.reserve(lambda: woken.append("a")) is True
    assert tracker.reserve(lambda: woken.append("b")) is True
    assert tracker.reserve(lambda: woken.append("c")) is False, "both slots are promised"
    connection: Any = object()
    assert tracker.admit(connection)
    assert len(tracker) == 1
    assert woken == []
    tracker.release()  # the other accept() found nobody: its slot frees, the waiter wakes
    assert woken == ["c"]
    assert tracker.reserve(lambda: woken.append("d")) is True
    assert tracker.reserve(lambda: woken.append("e")) is False
    tracker.remove(connection)
    assert woken == ["c", "e"]


def test_a_slot_reserved_before_closing_is_not_admitted() -> None:
    tracker = Tracker(1)
    assert tracker.reserve(lambda: None) is True
    tracker.close()
    assert not tracker.admit(object())  # type: ignore[arg-type]
    assert len(tracker) == 0
    assert tracker.wait_empty(0)
