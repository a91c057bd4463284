"""``python -m bench``: parse the flags, set up, measure, report, and always clean up.

Clean-up is the contract: whatever happens (a failure, Ctrl-C, SIGTERM, SIGHUP), every process
the harness started is killed and its namespace deleted before it exits.  SIGTERM and SIGHUP
are turned into the same KeyboardInterrupt as Ctrl-C, so one ``finally`` covers them all, and
while cleaning up further signals are ignored so that an impatient second Ctrl-C cannot leave a
namespace behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from bench import build, chart, interpreters, netns, report
from bench.netns import Namespace, NamespaceError
from bench.procs import Processes
from bench.runner import Progress, Record, Runner
from bench.settings import (
    DIRECT,
    MMPROXY,
    Settings,
    SettingsError,
    Target,
    check_python,
    parse_flags,
    parse_only,
    parse_peer,
    unique_names,
)
from bench.workloads import NAMES

EXIT_OK = 0
EXIT_FAILED = 1  # the run finished but some measurement failed
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump), exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise SettingsError(message)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and 3600 seconds")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not positive")
    return value


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m bench",
        description=(
            "Measure mmproxy against no proxy (direct) and any peers, in a private network "
            "namespace. Needs root, iproute2 and a C compiler."
        ),
    )
    p.add_argument("--duration", type=_positive_float, default=3.0, help="seconds per workload")
    p.add_argument("--repeats", type=_positive_int, default=3, help="repeats of every workload")
    p.add_argument(
        "--only", metavar="WORKLOAD,...", help=f"run only these workloads ({', '.join(NAMES)})"
    )
    p.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="NAME='COMMAND'",
        help="another proxy to compare: a command line with {listen}, {target4}, {target6}",
    )
    p.add_argument("--mmproxy-flags", default="", metavar="'FLAGS'", help="extra flags for mmproxy")
    p.add_argument(
        "--python", default=sys.executable, metavar="PATH", help="interpreter that runs mmproxy"
    )
    p.add_argument(
        "--free-threaded",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help=(
            "also measure mmproxy on a free-threaded CPython (target mmproxy-ft): PATH, or "
            "without one a python3.13t built into the cache on first use"
        ),
    )
    p.add_argument(
        "--header", choices=["v1", "v2"], default="v1", help="PROXY header the clients send"
    )
    p.add_argument(
        "--idle-connections",
        type=_positive_int,
        default=2000,
        help="connections the idle workload opens (flows, in udp-idle)",
    )
    p.add_argument(
        "--limit-connections",
        type=_positive_int,
        default=9000,
        help="connections idle-limit tries to hold through a proxy limited to --limit-nofile",
    )
    p.add_argument(
        "--limit-nofile",
        type=_positive_int,
        default=20000,
        help="the proxy's descriptor limit in idle-limit (prlimit)",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="write every figure here")
    p.add_argument("--png", type=Path, metavar="PATH", help="draw a bar chart (matplotlib)")
    p.add_argument("--note", default="", help="free text recorded with the results")
    p.add_argument(
        "--from-json",
        type=Path,
        metavar="PATH",
        help="measure nothing: print the table of a saved --json file again (and --png)",
    )
    return p


def parse(argv: Sequence[str]) -> Settings:
    """The settings, or :class:`SettingsError` with the one line to show."""
    try:
        args = parser().parse_args(argv)
    except argparse.ArgumentTypeError as error:
        raise SettingsError(str(error)) from None
    workloads = parse_only(args.only, NAMES) if args.only is not None else NAMES
    peers = [parse_peer(text) for text in args.peer]
    targets = [
        Target(DIRECT, DIRECT),
        Target(MMPROXY, MMPROXY, flags=parse_flags(args.mmproxy_flags, "--mmproxy-flags")),
        *peers,
    ]
    unique_names(targets)
    extra = {"note": args.note} if args.note else {}
    free_threaded = args.free_threaded
    if free_threaded:
        free_threaded = check_python(free_threaded, "--free-threaded")
    return Settings(
        duration=args.duration,
        repeats=args.repeats,
        workloads=workloads,
        targets=tuple(targets),
        python=check_python(args.python),
        free_threaded=free_threaded,
        header=args.header,
        idle_connections=args.idle_connections,
        limit_connections=args.limit_connections,
        limit_nofile=args.limit_nofile,
        json_path=args.json,
        png_path=args.png,
        replay=args.from_json,
        extra=extra,
    )


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _preflight() -> str | None:
    if os.geteuid() != 0:
        return "needs root: it creates a network namespace and runs mmproxy with IP_TRANSPARENT"
    for tool in ("ip", "prlimit"):
        if shutil.which(tool) is None:
            return f"{tool!r} not found (install iproute2 and util-linux)"
    return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit code (0 ok, 1 a measurement failed, 2 usage, 130)."""
    # SIGINT too, explicitly: a background job of a shell script starts with SIGINT ignored,
    # and Python then leaves it ignored, so Ctrl-C or kill -INT would not stop the run.
    previous = {
        signum: signal.signal(signum, _interrupt)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        print("bench: interrupted; every process stopped, namespace deleted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _main(argv: Sequence[str]) -> int:
    try:
        settings = parse(argv)
    except SettingsError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if settings.replay is not None:
        return _replay(settings.replay, settings.png_path)
    problem = _preflight()
    if problem:
        print(f"bench: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        loadgen = build.build()
    except (build.BuildError, OSError) as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if settings.free_threaded is not None:
        try:
            settings = settings.with_free_threaded(
                interpreters.free_threaded(settings.free_threaded)
            )
        except interpreters.InterpreterError as error:
            print(f"bench: error: {error}", file=sys.stderr)
            return EXIT_USAGE
        except OSError as error:  # the cache cannot be written, say
            print(f"bench: error: --free-threaded: {error}", file=sys.stderr)
            return EXIT_USAGE

    for name in netns.remove_stale():
        print(f"bench: deleted {name}, left by a run that was killed", file=sys.stderr)
    started = _now()
    info = report.machine(settings)
    for warning in report.interpreter_warnings(settings, info):
        print(f"bench: warning: {warning}", file=sys.stderr)
    logs = Path(tempfile.mkdtemp(prefix="mmproxy-bench-"))
    ns = Namespace()
    procs = Processes(logs)
    try:
        ns.create()
        total = settings.repeats * len(settings.workloads) * len(settings.targets)
        progress = Progress(total)
        try:
            records = Runner(settings, ns, procs, loadgen).run(progress)
        finally:
            progress.finish()
    except NamespaceError as error:
        _clean_up(procs, ns, logs)
        print(f"bench: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        _clean_up(procs, ns, logs)  # also on KeyboardInterrupt, before main() reports it
    info["loadavg_end"] = list(os.getloadavg())
    _output(settings, records, info)
    code = EXIT_FAILED if any(record.error for record in records) else EXIT_OK
    if settings.json_path is not None:
        doc = report.document(
            settings, records, report.summarise(settings, records), info, started, _now()
        )
        try:
            settings.json_path.parent.mkdir(parents=True, exist_ok=True)
            settings.json_path.write_text(json.dumps(doc, indent=1) + "\n")
        except OSError as error:
            print(f"bench: error: --json: {error}", file=sys.stderr)
            return EXIT_FAILED
        print(f"JSON: {settings.json_path}", file=sys.stderr)
    return code


def _replay(path: Path, png: Path | None) -> int:
    """``--from-json``: the table (and chart) of an earlier run, from its JSON document."""
    try:
        settings, records, info = report.load(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"bench: error: --from-json: {path}: {error}", file=sys.stderr)
        return EXIT_USAGE
    settings = replace(settings, png_path=png)
    _output(settings, records, info)
    return EXIT_OK


def _output(settings: Settings, records: list[Record], info: dict[str, Any]) -> None:
    """The table and its footer on stdout; the chart when asked for."""
    rows = report.summarise(settings, records)
    print(report.table(settings, rows))
    print()
    print(report.footer(settings, records, rows, info))
    if settings.png_path is not None:
        if chart.render(settings, rows, settings.png_path):
            print(f"chart: {settings.png_path}", file=sys.stderr)
        else:
            print(
                "bench: chart skipped: matplotlib is not installed (pip install -e '.[bench]')",
                file=sys.stderr,
            )


def _clean_up(procs: Processes, ns: Namespace, logs: Path) -> None:
    """Stop every child, delete the namespace, remove the logs; deaf to signals meanwhile."""
    previous = {
        signum: signal.signal(signum, signal.SIG_IGN)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        procs.stop_all()
        for attempt in range(3):
            try:
                ns.delete()
                break
            except NamespaceError:
                if attempt == 2:
                    raise
                time.sleep(0.5)
        shutil.rmtree(logs, ignore_errors=True)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
