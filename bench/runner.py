"""The measurement loop: every repeat runs every workload through every target, alternating.

Order: repeat by repeat, workload by workload, and within a workload the targets in turn, the
first target rotating with each repeat, so that machine drift (other load, thermal limits)
hits every target alike.  Each measurement gets a fresh backend and a fresh proxy on fresh
ports, and they are stopped before the next one starts.

A measurement that fails (a proxy that does not start or dies, a client that errs) is recorded
with its error and the run goes on; the command then exits non-zero.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from bench.netns import Namespace
from bench.procs import Child, Processes, usage
from bench.settings import Settings, Target
from bench.stats import number
from bench.targets import Backend, Proxy, StartError
from bench.workloads import BY_NAME, Workload, client_header, idle_figures, load_figures

CLIENT_GRACE = 60.0  # seconds a client may run past its duration before it is killed
IDLE_OPEN_SECONDS = 600.0  # hard cap on an idle client's whole life
SETTLE_QUIET = 1.5  # seconds the backend's count must stay put before idle figures are read
SETTLE_TIMEOUT = 60.0
FIRST_PORT = 20000


class MeasureError(RuntimeError):
    """One measurement failed; the message is recorded and shown."""


@dataclass
class Record:
    """One measurement: a workload through a target in one repeat."""

    repeat: int
    workload: str
    target: str
    figures: dict[str, float | None] = field(default_factory=dict)
    client: dict[str, Any] = field(default_factory=dict)  # the load generator's raw output
    proxy: dict[str, Any] = field(default_factory=dict)  # resource figures, ready line
    error: str | None = None
    seconds: float = 0.0  # wall time of the whole measurement, start-up included
    loadavg: float = 0.0  # the machine's 1-minute load average when it started

    def as_json(self) -> dict[str, Any]:
        return {
            "repeat": self.repeat,
            "workload": self.workload,
            "target": self.target,
            "figures": self.figures,
            "client": self.client,
            "proxy": self.proxy,
            "error": self.error,
            "seconds": round(self.seconds, 3),
            "loadavg": round(self.loadavg, 2),
        }


class Progress:
    """One line on stderr: rewritten in place on a terminal, one line per step otherwise."""

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total = total
        self.done = 0
        self._stream = stream
        self._tty = stream.isatty()
        self._width = 0

    def show(self, text: str) -> None:
        """What runs now: on a terminal only (a log gets the finished steps)."""
        if self._tty:
            self._write(f"[{self.done + 1}/{self.total}] {text}")

    def step(self, text: str) -> None:
        """A finished step and its result."""
        line = f"[{self.done + 1}/{self.total}] {text}"
        self.done += 1
        if self._tty:
            self._write(line)
        else:
            self._stream.write(line + "\n")
            self._stream.flush()

    def _write(self, line: str) -> None:
        pad = max(0, self._width - len(line))
        self._stream.write("\r" + line + " " * pad)
        self._stream.flush()
        self._width = len(line)

    def finish(self) -> None:
        if self._tty and self._width:
            self._stream.write("\n")
            self._stream.flush()


def rotated(targets: tuple[Target, ...], repeat: int) -> list[Target]:
    """The targets in the order of ``repeat`` (0-based): the first one moves each repeat."""
    if not targets:
        return []
    shift = repeat % len(targets)
    return [*targets[shift:], *targets[:shift]]


class Runner:
    """Runs the measurements of one benchmark inside ``ns``."""

    def __init__(self, settings: Settings, ns: Namespace, procs: Processes, loadgen: Path) -> None:
        self.settings = settings
        self.ns = ns
        self.procs = procs
        self.loadgen = loadgen
        self._port = FIRST_PORT
        self._address = 0  # next fake client address:port index (see loadgen.c)
        self.records: list[Record] = []

    def _ports(self) -> tuple[int, int]:
        self._port += 2
        return self._port, self._port + 1

    def run(self, progress: Progress) -> list[Record]:
        settings = self.settings
        for repeat in range(settings.repeats):
            for name in settings.workloads:
                workload = BY_NAME[name]
                for target in rotated(settings.targets, repeat):
                    label = f"repeat {repeat + 1}/{settings.repeats} {name} via {target.name}"
                    progress.show(label + " ...")
                    record = self.measure(workload, target, repeat)
                    self.records.append(record)
                    progress.step(f"{label}: {summary_text(workload, record)}")
        return self.records

    def measure(self, workload: Workload, target: Target, repeat: int) -> Record:
        record = Record(repeat=repeat, workload=workload.name, target=target.name)
        record.loadavg = os.getloadavg()[0]
        started = time.monotonic()
        backend: Backend | None = None
        proxy: Proxy | None = None
        try:
            proxy_port, backend_port = self._ports()
            backend = Backend(self.procs, self.ns, self.loadgen, workload.server, backend_port)
            port = backend_port
            if target.is_proxy:
                nofile = self.settings.limit_nofile if workload.limited else None
                proxy = Proxy(
                    self.procs,
                    self.ns,
                    target,
                    self.settings.interpreter(target),
                    proxy_port,
                    backend_port,
                    nofile=nofile,
                    protocol=workload.protocol,
                )
                port = proxy_port
                record.proxy["ready"] = proxy.ready_record
                if nofile:
                    record.proxy["nofile"] = nofile
            if workload.kind == "idle":
                self._idle(workload, record, backend, proxy, port)
            else:
                self._load(workload, record, proxy, port, backend)
            if proxy is not None:
                if not proxy.child.alive():
                    raise MeasureError(
                        f"{target.name} exited during the run: {proxy.child.stderr_tail()}"
                    )
                if proxy.problems:
                    record.proxy["problems"] = proxy.problems
        except (StartError, MeasureError, OSError, ValueError, KeyError) as error:
            record.error = str(error) or type(error).__name__
        finally:
            if proxy is not None:
                stopping = time.monotonic()
                record.proxy["exit_code"] = self.procs.stop(proxy.child)
                record.proxy["stop_seconds"] = round(time.monotonic() - stopping, 3)
            if backend is not None:
                self.procs.stop(backend.child)
            record.seconds = time.monotonic() - started
        return record

    # ------------------------------------------------------------------ clients

    def _client_argv(
        self, workload: Workload, port: int, backend_port: int, proxied: bool
    ) -> list[str]:
        conns = workload.conns
        if conns is None:
            conns = (
                self.settings.limit_connections
                if workload.limited
                else self.settings.idle_connections
            )
        duration = IDLE_OPEN_SECONDS if workload.kind == "idle" else self.settings.duration
        return [
            *self.ns.prefix(),
            str(self.loadgen),
            workload.client,
            *("--connect", f"127.0.0.1:{port}"),
            *("--conns", str(conns)),
            *("--duration", f"{duration:g}"),
            *("--proxy", client_header(workload, self.settings.header, proxied)),
            *("--addr-offset", str(self._address)),
            *("--dest-port", str(backend_port)),
            *("--window", str(workload.window)),
        ]

    def _consume_addresses(self, result: dict[str, Any]) -> None:
        self._address += int(result.get("addresses_used", 0)) + 1

    def _start_client(self, argv: list[str], lines: list[str], stdin: bool = False) -> Child:
        return self.procs.start(argv, name="loadgen", on_line=lines.append, stdin=stdin)

    def _finish_client(self, child: Child, lines: list[str], timeout: float) -> dict[str, Any]:
        code = child.wait(timeout)
        if code is None:
            self.procs.stop(child)
            raise MeasureError(f"the load generator did not finish within {timeout:g}s")
        self.procs.stop(child)
        if code != 0:
            raise MeasureError(f"the load generator failed: {child.stderr_tail() or code}")
        results = [json.loads(line) for line in lines if line.startswith("{")]
        if not results:
            raise MeasureError("the load generator printed no result")
        result: dict[str, Any] = results[-1]
        self._consume_addresses(result)
        if result.get("mismatches"):
            raise MeasureError(
                f"{result['mismatches']} echoed chunks or datagrams did not match what was sent"
            )
        return result

    def _load(
        self, workload: Workload, record: Record, proxy: Proxy | None, port: int, backend: Backend
    ) -> None:
        lines: list[str] = []
        udp = workload.protocol == "udp"
        counters = udp_counters(backend.child.pid) if udp else {}
        before = usage(proxy.pid) if proxy else None
        child = self._start_client(
            self._client_argv(workload, port, backend.port, proxy is not None), lines
        )
        result = self._finish_client(child, lines, self.settings.duration + CLIENT_GRACE)
        if udp:
            # where datagrams were dropped: the namespace's kernel counters (IPv4), which
            # count every socket in it (client, proxy, backend)
            ended = udp_counters(backend.child.pid)
            result["kernel_udp"] = {key: ended[key] - counters.get(key, 0) for key in ended}
        cpu = None
        if proxy is not None and before is not None:
            after = usage(proxy.pid)
            cpu = after.cpu_seconds - before.cpu_seconds
            record.proxy.update(before.as_json("before") | after.as_json("after"))
            record.proxy["cpu_seconds"] = round(cpu, 4)
        record.client = result
        if workload.client == "upload" and result.get("errors"):
            # the time includes waiting for the backend's end of stream: without it, the
            # bytes were not all delivered and the figure would mean nothing
            raise MeasureError("an upload connection did not end cleanly: delivery unconfirmed")
        record.figures = load_figures(workload, result, cpu)

    def _idle(
        self, workload: Workload, record: Record, backend: Backend, proxy: Proxy | None, port: int
    ) -> None:
        lines: list[str] = []
        before = usage(proxy.pid) if proxy else None
        child = self._start_client(
            self._client_argv(workload, port, backend.port, proxy is not None), lines, stdin=True
        )
        opening = time.monotonic()
        end = opening + IDLE_OPEN_SECONDS
        while not any('"opened"' in line for line in list(lines)):
            if not child.alive() or time.monotonic() > end:
                self.procs.stop(child)
                raise MeasureError(
                    f"the idle client stopped before opening its connections: "
                    f"{child.stderr_tail() or 'no output'}"
                )
            time.sleep(0.05)
        settling = time.monotonic()
        if workload.protocol == "udp":
            # a flow is open once its datagram came back; no backend connection to count
            relayed = opened_count(lines)
            time.sleep(SETTLE_QUIET)
        else:
            relayed = backend.wait_settled(SETTLE_QUIET, SETTLE_TIMEOUT)
        phases = {
            "open_seconds": round(settling - opening, 3),
            "settle_seconds": round(time.monotonic() - settling, 3),
        }
        if workload.quiet and proxy is not None:
            quiet_until = time.monotonic() + workload.quiet
            while time.monotonic() < quiet_until:
                if not child.alive():
                    raise MeasureError(f"the idle client ended early: {child.stderr_tail()}")
                time.sleep(min(0.2, max(0.0, quiet_until - time.monotonic())))
            phases["quiet_seconds"] = workload.quiet  # a connection closed meanwhile: not alive
        grown = None
        if proxy is not None and before is not None:
            after = usage(proxy.pid)
            grown = after - before
            record.proxy.update(before.as_json("before") | after.as_json("after"))
        closing = time.monotonic()
        child.close_stdin()
        result = self._finish_client(child, lines, 30.0)
        phases["close_seconds"] = round(time.monotonic() - closing, 3)
        record.client = result | {"backend_live": relayed} | phases
        held = min(relayed, int(result.get("alive", 0)))
        record.figures = idle_figures(held, grown)


def opened_count(lines: list[str]) -> int:
    """The ``opened`` count of the idle client's first report."""
    for line in list(lines):
        if '"opened"' in line:
            return int(json.loads(line).get("opened", 0))
    return 0


def parse_udp_snmp(text: str) -> dict[str, int]:
    """The ``Udp:`` counters of a ``/proc/net/snmp`` table (a heading line, then values)."""
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith("Udp:")]
    if len(rows) < 2 or len(rows[0]) != len(rows[1]):
        return {}
    try:
        return {name: int(value) for name, value in zip(rows[0], rows[1], strict=True)}
    except ValueError:
        return {}


def udp_counters(pid: int) -> dict[str, int]:
    """The UDP counters of the network namespace ``pid`` lives in ({} when unreadable)."""
    try:
        return parse_udp_snmp(Path(f"/proc/{pid}/net/snmp").read_text())
    except OSError:
        return {}


def summary_text(workload: Workload, record: Record) -> str:
    """The progress line's short result: the workload's first figure."""
    if record.error:
        return f"error: {record.error}"
    metric = workload.metrics[0]
    value = record.figures.get(metric.key)
    if value is None:
        return "no figure"
    return f"{number(value)} {metric.unit}"
