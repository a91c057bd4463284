"""tcpinfo.snapshot: counters read together, again until they agree."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from mmproxy import tcpinfo
from mmproxy.tcpinfo import TcpCounters

ESTABLISHED, CLOSE_WAIT = 1, 8


def reading(state: int, received: int) -> TcpCounters:
    return TcpCounters(state, 0, 0, bytes_acked=1, bytes_received=received, outq=0)


def scripted(
    monkeypatch: pytest.MonkeyPatch, counters: list[TcpCounters], queued: list[int]
) -> None:
    readings: Iterator[TcpCounters] = iter(counters)
    queues: Iterator[int] = iter(queued)
    monkeypatch.setattr(tcpinfo, "counters", lambda _sock, outq=True: next(readings))
    monkeypatch.setattr(tcpinfo, "inq", lambda _sock: next(queues))


def test_a_fin_between_the_state_and_the_counters_is_not_a_byte_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """100 bytes came and were read, then the FIN (bytes_received counts it: 101).  TCP_INFO
    loads the state before it locks the socket, so the first reading has the FIN counted and
    still says established: taken as it is, user space would seem to have read 101 bytes.
    The state that changed before the second reading makes it read again."""
    scripted(
        monkeypatch,
        [
            reading(ESTABLISHED, 101),  # raced: the FIN counted, the state not yet changed
            reading(CLOSE_WAIT, 101),
            reading(CLOSE_WAIT, 101),  # read again: these agree
            reading(CLOSE_WAIT, 101),
        ],
        [0, 0],
    )
    with socket.socket() as sock:  # never touched: the readings are scripted
        shot = tcpinfo.snapshot(sock)
    assert shot.consumed == 100
    assert shot.ended


def test_counters_that_agree_are_taken_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    scripted(monkeypatch, [reading(ESTABLISHED, 51), reading(ESTABLISHED, 51)], [20])
    with socket.socket() as sock:  # never touched: the readings are scripted
        shot = tcpinfo.snapshot(sock)
    assert shot.consumed == 31
    assert not shot.ended
