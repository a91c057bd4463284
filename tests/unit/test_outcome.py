"""How a connection's end is reported: the record only at the verbosity that shows it, the
counters always, and nothing built for a record that will not be written."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import pytest

from mmproxy import logs
from mmproxy.errors import Refusal
from mmproxy.metrics import PrometheusMetrics
from mmproxy.outcome import CLOSED, Outcome, relay_ended, report
from mmproxy.relay import Pair


class Untouchable(Pair):
    """A pair whose duration must not be asked for (it is only logged)."""

    @property
    def duration(self) -> float:
        raise AssertionError("the duration was computed for a record nobody writes")


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> tuple[logging.Logger, pytest.LogCaptureFixture]:
    logger = logging.getLogger("test-outcome")
    caplog.set_level(logging.DEBUG, logger.name)
    return logger, caplog


@pytest.fixture
def pair() -> Iterator[Pair]:
    a, b = socket.socketpair()
    relayed = Untouchable(a, b)
    relayed.to_target[0], relayed.to_client[0] = 11, 22
    try:
        yield relayed
    finally:
        relayed.close()


def closed_bytes(metrics: PrometheusMetrics, direction: str) -> float | None:
    name = "mmproxy_relayed_bytes_total"
    return metrics.registry.get_sample_value(name, {"direction": direction})


@pytest.mark.parametrize("verbose", [0, 1])
def test_a_clean_end_below_v2_is_counted_and_builds_no_record(
    records: tuple[logging.Logger, pytest.LogCaptureFixture], pair: Pair, verbose: int
) -> None:
    logger, handler = records
    metrics = PrometheusMetrics()
    report(CLOSED, logs.ConnectionLog(logger, verbose), metrics, pair)
    assert handler.records == []
    assert closed_bytes(metrics, "to_target") == 11
    assert closed_bytes(metrics, "to_client") == 22


def test_a_clean_end_at_v2_is_logged_with_its_bytes(
    records: tuple[logging.Logger, pytest.LogCaptureFixture],
) -> None:
    logger, handler = records
    a, b = socket.socketpair()
    relayed = Pair(a, b)
    relayed.to_target[0], relayed.to_client[0] = 11, 22
    try:
        report(CLOSED, logs.ConnectionLog(logger, 2), PrometheusMetrics(), relayed)
    finally:
        relayed.close()
    [record] = handler.records
    assert record.getMessage() == logs.MSG_CONNECTION_CLOSING
    assert (record.bytesToTarget, record.bytesToClient) == (11, 22)
    assert record.durationSeconds >= 0


def test_a_failure_at_v0_is_counted_and_not_logged(
    records: tuple[logging.Logger, pytest.LogCaptureFixture], pair: Pair
) -> None:
    logger, handler = records
    metrics = PrometheusMetrics()
    outcome = Outcome("idle timeout", "quiet", Refusal.IDLE_TIMEOUT)
    report(outcome, logs.ConnectionLog(logger, 0), metrics, pair)
    assert handler.records == []
    assert closed_bytes(metrics, "to_target") == 11


def test_a_refusal_at_v1_is_logged_and_counted(
    records: tuple[logging.Logger, pytest.LogCaptureFixture],
) -> None:
    logger, handler = records
    metrics = PrometheusMetrics()
    outcome = Outcome(
        "upstream failed", "refused", Refusal.UPSTREAM_FAILED, Refusal.UPSTREAM_FAILED
    )
    report(outcome, logs.ConnectionLog(logger, 1), metrics, None)
    [record] = handler.records
    assert record.getMessage() == "upstream failed"
    assert record.reason == Refusal.UPSTREAM_FAILED
    name = "mmproxy_upstream_connect_failures_total"
    assert metrics.registry.get_sample_value(name) == 1


def test_a_clean_relay_ends_with_the_one_shared_outcome(pair: Pair) -> None:
    assert relay_ended(pair, 0.0, aborted=False) is CLOSED
    assert not CLOSED.failure
