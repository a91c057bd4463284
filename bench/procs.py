"""The processes the harness starts, what /proc says about them, and stopping them.

Every child is started through one :class:`Processes` registry, in a session of its own (so a
Ctrl-C at the terminal reaches the harness, which then stops the children in order) and is
killed with its whole process group by :meth:`Processes.stop_all`, whatever happened.

Figures come from /proc: CPU time is ``utime + stime`` of ``/proc/PID/stat`` (all threads of
the process), memory is ``VmRSS`` of ``/proc/PID/status``, descriptors are the entries of
``/proc/PID/fd``.  They are summed over the process and its descendants, so that a peer
started through a wrapper is measured whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

LineHandler = Callable[[str], None]


@dataclass(frozen=True)
class Usage:
    """A snapshot of a process tree's resources (differences of snapshots are Usages too).

    ``cpu_seconds`` is ``user_seconds + system_seconds``; the context switches are summed over
    every thread, and tell how often the proxy's threads slept and were woken.
    """

    cpu_seconds: float
    rss_kib: int
    fds: int
    threads: int
    user_seconds: float = 0.0
    system_seconds: float = 0.0
    voluntary_switches: int = 0
    involuntary_switches: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Usage)))

    def __sub__(self, other: Usage) -> Usage:
        return Usage(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(Usage)))

    def as_json(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}_{f.name}": round(value, 4) if isinstance(value, float) else value
            for f in fields(Usage)
            for value in [getattr(self, f.name)]
        }


ZERO = Usage(0.0, 0, 0, 0)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants alive now."""
    tree = _children()
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(tree.get(current, []))
    return found


def _switches(pid: int) -> tuple[int, int]:
    voluntary = involuntary = 0
    for task in os.scandir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            for line in Path(task.path, "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    voluntary += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    involuntary += int(line.split()[1])
    return voluntary, involuntary


def _one(pid: int) -> Usage:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rpartition(")")[2].split()
    # fields[0] is the state (field 3 of proc(5)); utime and stime are fields 14 and 15
    user, system = int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS
    rss = threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    voluntary, involuntary = _switches(pid)
    return Usage(user + system, rss, fds, threads, user, system, voluntary, involuntary)


def usage(pid: int) -> Usage:
    """The resources of ``pid`` and its descendants (processes that vanish meanwhile count 0)."""
    total = ZERO
    for member in process_tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += _one(member)
    return total


def _readable(line: str) -> str:
    """A JSON log line (mmproxy's, go-mmproxy's) shortened to its message and error."""
    try:
        record = json.loads(line)
    except ValueError:
        return line
    if not isinstance(record, dict) or "msg" not in record:
        return line
    error = record.get("error")
    return f"{record['msg']}: {error}" if error else str(record["msg"])


class Child:
    """One started process; its stdout lines go to ``on_line`` (from a reader thread)."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str,
        on_line: LineHandler | None,
        stderr_path: Path,
        env: dict[str, str] | None = None,
        stdin: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.stderr_path = stderr_path
        self._stderr_file = stderr_path.open("wb")
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._stderr_file,
                env=env,
                text=True,
                cwd="/",
                start_new_session=True,
            )
        except BaseException:
            self._stderr_file.close()
            raise
        self._reader = threading.Thread(
            target=self._read, args=(self.proc.stdout, on_line), daemon=True
        )
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self, stream: IO[str] | None, on_line: LineHandler | None) -> None:
        if stream is None:
            return
        for line in stream:
            if on_line is not None:
                on_line(line.rstrip("\n"))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stderr_tail(self, lines: int = 3, width: int = 400) -> str:
        """The last lines the child wrote on stderr, joined with `` | ``, at most ``width`` long."""
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        tail = " | ".join(_readable(line) for line in text.strip().splitlines()[-lines:])
        return tail if len(tail) <= width else "..." + tail[-(width - 3) :]

    def stop(self, grace: float = 5.0) -> int:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL the process group; idempotent."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            if self.wait(grace) is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # whatever the child left in its group (a peer's helpers) goes too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.close_stdin()
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr_file.close()
        return self.proc.returncode


class Processes:
    """Starts children and remembers them until :meth:`stop_all`."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self._children: list[Child] = []
        self._lock = threading.Lock()
        self._count = 0

    def start(
        self,
        argv: Sequence[str],
        *,
        name: str,
        on_line: LineHandler | None = None,
        env: dict[str, str] | None = None,
        stdin: bool = False,
    ) -> Child:
        with self._lock:
            self._count += 1
            stderr_path = self.logs / f"{self._count:04d}-{name}.stderr"
        child = Child(
            argv, name=name, on_line=on_line, stderr_path=stderr_path, env=env, stdin=stdin
        )
        with self._lock:
            self._children.append(child)
        return child

    def stop(self, child: Child, grace: float = 5.0) -> int:
        code = child.stop(grace)
        with self._lock:
            if child in self._children:
                self._children.remove(child)
        return code

    def stop_all(self) -> None:
        """Stop every child still registered, newest first (load before proxy before backend)."""
        with self._lock:
            children = list(reversed(self._children))
            self._children.clear()
        for child in children:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                child.stop(grace=2.0)
