"""Medians over repeats, ratios between targets, and how numbers are written in the table.

Pure functions over plain numbers: the one place where "no figure" (``None``: the run failed,
or the figure does not apply, like a proxy's memory for ``direct``) is handled.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable


def median(values: Iterable[float | None]) -> float | None:
    """The median of the figures that exist; None when there are none."""
    present = [value for value in values if value is not None]
    if not present:
        return None
    return float(statistics.median(present))


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``; None when either is missing or the reference is 0."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def per(amount: float | None, count: float | None, scale: float = 1.0) -> float | None:
    """``amount`` per ``count / scale`` units (e.g. CPU seconds per GB); None without a count."""
    if amount is None or count is None or count <= 0:
        return None
    return amount / (count / scale)


def number(value: float | None) -> str:
    """A figure with about three significant digits; ``-`` for no figure.

    ``12345.6`` -> ``12,346``; ``123.4`` -> ``123``; ``12.34`` -> ``12.3``; ``1.234`` -> ``1.23``;
    ``0.01234`` -> ``0.0123``.
    """
    if value is None:
        return "-"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1 or magnitude == 0:
        return f"{value:.2f}"
    return f"{value:.3g}"


def count(value: float | None) -> str:
    """A whole number of things (connections held): ``9,000``; ``-`` for none."""
    if value is None:
        return "-"
    return f"{value:,.0f}"


def times(value: float | None) -> str:
    """A ratio, as ``0.53x``; ``-`` for none."""
    if value is None:
        return "-"
    return f"{value:.2f}x"
