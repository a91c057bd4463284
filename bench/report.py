"""What a run produces: the summary (medians and ratios), the table, the JSON document.

The table is Markdown, so that it reads in a terminal and pastes into a README as it is.  The
JSON document holds everything needed to check or redo the table: the machine, the settings
and commands, and every repeat's raw output.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.interpreters import mmproxy_env
from bench.runner import Record
from bench.settings import DIRECT, MMPROXY, MMPROXY_FT, Settings, Target
from bench.stats import count, median, number, ratio, times
from bench.workloads import BY_NAME, Metric, Workload

SCHEMA = "mmproxy-bench/1"
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Row:
    """One figure of one workload, for every target."""

    workload: Workload
    metric: Metric
    values: dict[str, list[float | None]]  # target -> one value per repeat (None: no figure)

    connections: int = 0  # idle workloads: how many the client tried to hold

    def median(self, target: str) -> float | None:
        return median(self.values.get(target, []))

    def ratio(self, target: str, reference: str) -> float | None:
        return ratio(self.median(target), self.median(reference))

    @property
    def unit(self) -> str:
        if self.metric.key == "held":
            return f"held of {self.connections:,}"
        return self.metric.unit


def summarise(settings: Settings, records: list[Record]) -> list[Row]:
    """One row per (workload, figure), in the settings' order; values in repeat order."""
    rows: list[Row] = []
    for name in settings.workloads:
        workload = BY_NAME[name]
        metrics = list(workload.metrics)
        if workload.cpu is not None:
            metrics.append(workload.cpu)
        connections = workload.conns or (
            settings.limit_connections if workload.limited else settings.idle_connections
        )
        for metric in metrics:
            values: dict[str, list[float | None]] = {}
            for target in settings.targets:
                # a failed measurement gives no figure, even if it got some before failing
                ours = [
                    r
                    for r in records
                    if r.workload == name and r.target == target.name and r.error is None
                ]
                ours.sort(key=lambda r: r.repeat)
                values[target.name] = [r.figures.get(metric.key) for r in ours]
            row = Row(workload, metric, values, connections)
            rows.append(row)
    return rows


def table(settings: Settings, rows: list[Row]) -> str:
    """The Markdown table: medians per target, then ratios to direct and to mmproxy.

    Every target but direct and mmproxy gets a ratio to mmproxy: for a peer that is how it
    compares, for ``mmproxy-ft`` it is the free-threaded interpreter against the GIL one.
    """
    names = [target.name for target in settings.targets]
    proxies = [name for name in names if name != DIRECT]
    peers = [name for name in proxies if name != MMPROXY]
    header = ["workload", "figure", *names]
    header += [f"{name}/direct" for name in proxies]
    header += [f"{name}/mmproxy" for name in peers]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|",
    ]
    for row in rows:
        title = row.workload.title
        if row.workload.limited:
            title += f" {settings.limit_nofile:,}"
        cells = [title, row.unit]
        show = count if row.metric.key in ("held", "lost") else number
        cells += [show(row.median(name)) for name in names]
        cells += [times(row.ratio(name, DIRECT)) for name in proxies]
        cells += [times(row.ratio(name, MMPROXY)) for name in peers]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


BOTTLENECK_RATIO = 0.8  # a proxy this close to direct suggests the harness itself is the limit


def suspicious(settings: Settings, rows: list[Row]) -> list[str]:
    """Rate figures where a proxy comes within :data:`BOTTLENECK_RATIO` of ``direct``.

    The direct path must stay far above every proxied one; when it does not, the load
    generator or the backend may be what limits both, and the ratio says little.
    """
    found = []
    for row in rows:
        if row.workload.kind == "idle" or row.metric != row.workload.metrics[0]:
            continue
        for target in settings.proxies:
            share = row.ratio(target.name, DIRECT)
            if share is not None and share >= BOTTLENECK_RATIO:
                found.append(f"{row.workload.name} via {target.name} ({share:.2f}x)")
    return found


def footer(
    settings: Settings, records: list[Record], rows: list[Row], machine: dict[str, Any]
) -> str:
    """The lines under the table: what was measured where, and what went wrong."""
    protocols = {BY_NAME[name].protocol for name in settings.workloads}
    headers = {
        frozenset({"udp"}): "PROXY header v2 DGRAM (UDP)",
        frozenset({"tcp", "udp"}): f"PROXY header {settings.header} (TCP), v2 DGRAM (UDP)",
    }.get(frozenset(protocols), f"PROXY header {settings.header}")
    mmproxies = [target.name for target in settings.targets if target.kind == MMPROXY]
    if len(mmproxies) > 1:  # say which interpreter is which, and what the GIL was in each
        pythons = ", ".join(
            f"{name} on Python {_python_text(machine.get(python_key(name), {}))}"
            for name in mmproxies
        )
    else:
        pythons = f"mmproxy on Python {str(machine['python_mmproxy'].get('version')).split()[0]}"
    lines = [
        (
            f"Medians of {settings.repeats} repeat(s) of {settings.duration:g} s per workload; "
            f"{headers}; {pythons}."
        ),
        (
            f"Machine: {machine['cores']} cores ({machine['cpu_model']}), "
            f"Linux {machine['kernel']}, load average {machine['loadavg_start'][0]:.2f} at start, "
            f"{machine['loadavg_end'][0]:.2f} at end."
        ),
    ]
    if settings.extra.get("note"):
        lines.append(f"Note: {settings.extra['note']}")
    close = suspicious(settings, rows)
    if close:
        lines.append(
            "Warning: direct is not far above the proxied figure for "
            + ", ".join(close)
            + ": the load generator or backend may be the bottleneck there."
        )
    failed: dict[tuple[str, str], list[Record]] = {}
    for record in records:
        if record.error:
            failed.setdefault((record.workload, record.target), []).append(record)
    for (workload, target), ours in failed.items():
        error = str(ours[-1].error)
        if len(error) > 240:  # keep what failed and how it ended: both ends of the message
            error = error[:100] + " ... " + error[-135:]
        lines.append(
            f"Failed: {workload} via {target}, {len(ours)} of {settings.repeats} repeat(s): {error}"
        )
    client_errors = sum(int(r.client.get("errors", 0)) for r in records)
    if client_errors:
        lines.append(f"The load generator counted {client_errors} failed connection(s).")
    return "\n".join(lines)


# --------------------------------------------------------------------------- machine


def _first_line(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (result.stdout.strip().splitlines() or [""])[0]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_kib() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def python_description(python: str) -> dict[str, Any]:
    """Version, build (free-threaded or not, configure flags) and GIL status of an interpreter.

    The GIL status is read after importing mmproxy the way the harness runs it: on a
    free-threaded build, an imported extension module that does not declare itself safe
    without the GIL turns the GIL back on for the whole process.
    """
    code = (
        "import sys, sysconfig\n"
        "try:\n"
        "    import mmproxy.cli\n"
        "except Exception:\n"
        "    pass\n"
        "g = getattr(sys, '_is_gil_enabled', None)\n"
        "print(sys.version.replace(chr(10), ' '))\n"
        "print(g() if g else True)\n"
        "print(bool(sysconfig.get_config_var('Py_GIL_DISABLED')))\n"
        "print(sysconfig.get_config_var('CONFIG_ARGS') or '')\n"
    )
    try:
        result = subprocess.run(
            [python, "-c", code],
            env=mmproxy_env(),
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        lines = result.stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        lines = []
    return {
        "path": python,
        "version": lines[0] if lines else "unknown",
        "gil_enabled": (lines[1] == "True") if len(lines) > 1 else None,
        "free_threaded_build": (lines[2] == "True") if len(lines) > 2 else None,
        # how it was built: --enable-optimizations (PGO) and --with-lto show here
        "configure": lines[3] if len(lines) > 3 else None,
    }


def python_key(name: str) -> str:
    """The machine description's key for an mmproxy target's interpreter: ``python_mmproxy``."""
    return "python_" + name.replace("-", "_")


def _python_text(description: dict[str, Any]) -> str:
    """``3.13.5 (free-threaded, GIL off)``: a version and what the GIL was in it."""
    version = str(description.get("version")).split()[0]
    gil, build = description.get("gil_enabled"), description.get("free_threaded_build")
    if gil is False:
        return f"{version} (free-threaded, GIL off)"
    if gil and build:
        return f"{version} (free-threaded build, GIL on)"
    return f"{version} (GIL)" if gil else version


def interpreter_warnings(settings: Settings, machine: dict[str, Any]) -> list[str]:
    """What makes a free-threaded target not what its name says: the GIL is on in it."""
    found = []
    for target in settings.targets:
        if target.name != MMPROXY_FT:
            continue
        described = machine.get(python_key(target.name), {})
        if described.get("gil_enabled") is not False:
            found.append(
                f"{MMPROXY_FT} runs on {settings.interpreter(target)}, where the GIL is on with "
                "mmproxy imported: it is measured as it is"
            )
    return found


def machine(settings: Settings) -> dict[str, Any]:
    """The machine and software a run measured (the start of the JSON's ``machine``)."""
    uname = platform.uname()
    commit = _first_line(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    dirty = _first_line(["git", "-C", str(REPO), "status", "--porcelain", "--", "mmproxy"])
    return {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "memory_kib": memory_kib(),
        "kernel": uname.release,
        "kernel_version": uname.version,
        "python_harness": sys.version.replace("\n", " "),
        "python_mmproxy": python_description(settings.python),
        **{
            python_key(target.name): python_description(settings.interpreter(target))
            for target in settings.targets
            if target.kind == MMPROXY and target.name != MMPROXY
        },
        "compiler": _first_line([*os.environ.get("CC", "cc").split(), "--version"]),
        "mmproxy_commit": (commit + (" (mmproxy/ modified)" if dirty else "")) or None,
        "loadavg_start": list(os.getloadavg()),
    }


def document(
    settings: Settings,
    records: list[Record],
    rows: list[Row],
    info: dict[str, Any],
    started: str,
    finished: str,
) -> dict[str, Any]:
    """The JSON document: machine, settings, targets, summary and every repeat."""
    return {
        "schema": SCHEMA,
        "started": started,
        "finished": finished,
        "command": sys.argv,
        "machine": info,
        "settings": {
            "duration": settings.duration,
            "repeats": settings.repeats,
            "workloads": list(settings.workloads),
            "header": settings.header,
            "python": settings.python,
            "idle_connections": settings.idle_connections,
            "limit_connections": settings.limit_connections,
            "limit_nofile": settings.limit_nofile,
            **settings.extra,
        },
        "targets": [
            {
                "name": target.name,
                "kind": target.kind,
                "template": target.template or None,
                "flags": list(target.flags),
                "python": target.python,
            }
            for target in settings.targets
        ],
        "summary": [
            {
                "workload": row.workload.name,
                "title": row.workload.title,
                "figure": row.metric.key,
                "unit": row.unit,
                "higher_is_better": row.metric.higher_is_better,
                "targets": {
                    target.name: {
                        "median": row.median(target.name),
                        "values": row.values.get(target.name, []),
                        "ratio_to_direct": row.ratio(target.name, DIRECT),
                        "ratio_to_mmproxy": row.ratio(target.name, MMPROXY),
                    }
                    for target in settings.targets
                },
            }
            for row in rows
        ],
        "runs": [record.as_json() for record in records],
        "errors": sum(1 for record in records if record.error),
    }


def load(doc: dict[str, Any]) -> tuple[Settings, list[Record], dict[str, Any]]:
    """The settings, records and machine of a saved JSON document, to print or draw it again."""
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"not a {SCHEMA} document (schema {doc.get('schema')!r})")
    saved = doc["settings"]
    targets = tuple(
        Target(
            name=t["name"],
            kind=t["kind"],
            template=t["template"] or "",
            flags=tuple(t["flags"]),
            python=t.get("python"),
        )
        for t in doc["targets"]
    )
    known = set(BY_NAME)
    workloads = tuple(name for name in saved["workloads"] if name in known)
    settings = Settings(
        duration=float(saved["duration"]),
        repeats=int(saved["repeats"]),
        workloads=workloads,
        targets=targets,
        python=str(saved["python"]),
        header=str(saved["header"]),
        idle_connections=int(saved["idle_connections"]),
        limit_connections=int(saved["limit_connections"]),
        limit_nofile=int(saved["limit_nofile"]),
        extra={"note": saved["note"]} if saved.get("note") else {},
    )
    records = [
        Record(
            repeat=int(run["repeat"]),
            workload=str(run["workload"]),
            target=str(run["target"]),
            figures=dict(run["figures"]),
            client=dict(run["client"]),
            proxy=dict(run["proxy"]),
            error=run["error"],
            seconds=float(run["seconds"]),
            loadavg=float(run.get("loadavg", 0.0)),
        )
        for run in doc["runs"]
    ]
    return settings, records, dict(doc["machine"])
