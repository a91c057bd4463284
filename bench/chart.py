"""The PNG bar chart: each proxy's figure as a share of ``direct``, workload by workload.

matplotlib is optional (``pip install -e '.[bench]'``); without it :func:`render` returns
False and the caller says in one line that the chart was skipped.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from bench.report import Row
from bench.settings import DIRECT, Settings
from bench.stats import number


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def render(settings: Settings, rows: list[Row], path: Path) -> bool:
    """Draw the chart into ``path``; False when matplotlib is not installed."""
    if not available():
        return False
    import matplotlib  # optional: imported only when drawing

    matplotlib.use("Agg")
    from matplotlib import pyplot

    proxies = [target.name for target in settings.targets if target.name != DIRECT]
    shown = [
        row
        for row in rows
        if row.metric == row.workload.metrics[0] and row.median(DIRECT) is not None
    ]
    idle = [row for row in rows if row.metric.key == "rss_kib_per_conn"]
    panels = 2 if idle else 1
    height = 0.8 / max(1, len(proxies))
    figure, axes = pyplot.subplots(
        panels,
        1,
        figsize=(9, 1.2 + 0.55 * len(shown) * max(1, len(proxies)) / 2 + 1.6 * (panels - 1)),
        gridspec_kw={"height_ratios": [max(1, len(shown)), max(1, len(idle))] if idle else [1]},
        squeeze=False,
    )
    ax = axes[0][0]
    labels = [f"{row.workload.title} ({row.unit})" for row in shown]
    for index, name in enumerate(proxies):
        positions = [i + index * height for i in range(len(shown))]
        shares = [row.ratio(name, DIRECT) or 0.0 for row in shown]
        bars = ax.barh(positions, shares, height=height, label=name)
        for bar, row in zip(bars, shown, strict=True):
            ax.annotate(
                number(row.median(name)),
                (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
    ax.axvline(1.0, color="black", linewidth=1)
    widest = max([row.ratio(name, DIRECT) or 0.0 for row in shown for name in proxies] or [1.0])
    ax.set_xlim(0, max(1.1, widest) * 1.15)
    ax.set_yticks([i + height * (len(proxies) - 1) / 2 for i in range(len(shown))], labels)
    ax.invert_yaxis()
    ax.set_xlabel("share of direct (no proxy) = 1.0; labels: medians")
    ax.set_title(
        f"mmproxy bench: {settings.repeats} x {settings.duration:g} s, medians",
        fontsize=10,
        loc="left",
        pad=20,  # the legend sits between the title and the bars
    )
    ax.legend(
        loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(proxies), fontsize=8, frameon=False
    )
    if idle:
        ax = axes[1][0]
        for index, name in enumerate(proxies):
            positions = [i + index * height for i in range(len(idle))]
            values = [row.median(name) or 0.0 for row in idle]
            ax.barh(positions, values, height=height, label=name)
        ax.set_yticks(
            [i + height * (len(proxies) - 1) / 2 for i in range(len(idle))],
            [row.workload.title for row in idle],
        )
        ax.invert_yaxis()
        ax.set_xlabel("proxy RSS per idle connection, KiB (lower is better)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return True
