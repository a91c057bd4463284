"""How a TCP connection ended, and the one place that says so: its log record and counters.

:mod:`mmproxy.connection` closes the sockets, then hands its :class:`Outcome` to
:func:`report`, exactly once per connection.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmproxy import logs
from mmproxy.errors import Refusal
from mmproxy.metrics import Metrics
from mmproxy.relay import PEER_GONE, Pair


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a connection ended: the log record, and the counter for one that was never relayed.

    ``failure`` False logs ``message`` as a state change (``-v 2``), True as a dropped
    connection (``-v 1``).  ``metric`` is counted only for a connection that was never
    relayed: ``upstream_failed``, or a header error reason (None: nothing).
    """

    message: str
    error: BaseException | str | None = None
    reason: str | None = None
    metric: str | None = None
    failure: bool = True


# The common end, one immutable object for every connection that closed cleanly.
CLOSED = Outcome(logs.MSG_CONNECTION_CLOSING, failure=False)


def relay_ended(pair: Pair, idle_timeout: float, aborted: bool) -> Outcome:
    """The outcome of a relay whose directions have both ended (``aborted``: by a stop)."""
    if pair.idle:
        detail = f"no data in either direction for {idle_timeout:g}s"
        return Outcome("idle timeout", detail, Refusal.IDLE_TIMEOUT)
    error = pair.error
    if error is not None and not (aborted and error.errno in PEER_GONE):
        return Outcome(logs.MSG_CONNECTION_BROKEN, error)
    return CLOSED


def report(
    outcome: Outcome, log: logs.ConnectionLog, metrics: Metrics, relayed: Pair | None
) -> None:
    """Log ``outcome`` and count it; ``relayed`` is the pair of a connection that was
    counted as opened (its bytes are logged and counted), None for one that never was."""
    if log.failures if outcome.failure else log.states:  # else nothing would be logged
        _log(outcome, log, relayed)
    if relayed is not None:
        metrics.closed(relayed.to_target[0], relayed.to_client[0])
    elif outcome.metric == Refusal.UPSTREAM_FAILED:
        metrics.upstream_failed()
    elif outcome.metric is not None:
        metrics.header_error(outcome.metric)


def _log(outcome: Outcome, log: logs.ConnectionLog, relayed: Pair | None) -> None:
    fields: dict[str, object] = {}
    if relayed is not None:
        fields = {
            "bytesToTarget": relayed.to_target[0],
            "bytesToClient": relayed.to_client[0],
            "durationSeconds": round(relayed.duration, 6),
        }
    if not outcome.failure:
        log.state(outcome.message, **fields)
    elif outcome.reason is None:
        log.failure(outcome.message, outcome.error, **fields)
    else:
        log.failure(outcome.message, outcome.error, reason=outcome.reason, **fields)
