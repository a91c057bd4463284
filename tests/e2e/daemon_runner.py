"""Runs the mmproxy daemon inside a test namespace and collects its JSON log lines.

Why a process, not an import: the e2e tests check what an operator runs, ``python -m mmproxy``
with go-mmproxy's flags, including start-up, signals and the exit code.  The process runs in
its own process group, so teardown can kill everything it started even if it hangs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from netns import Deadline, NetNamespace

LogLine = dict[str, Any]
# Seconds a peer has to send its header in these tests: short, so that timeouts are cheap to
# test.  (The spec asks for at least 3 s in production; nothing here depends on that.)
HEADER_TIMEOUT = 2.0
# Seconds live connections get after SIGTERM, unless a test says otherwise: short, so that a
# connection a test left open cannot hold up teardown.
DRAIN_TIMEOUT = 3.0


class Daemon:
    """One ``mmproxy`` process in a namespace.

    ``logs`` holds every stdout line, parsed (lines that are not JSON are kept as
    ``{"_raw": line}`` so that a test failure shows them); ``stderr`` everything it printed
    there.
    """

    def __init__(
        self,
        namespace: NetNamespace,
        args: Sequence[str],
        listeners: int = 1,
        nofile: int | None = None,
        wrapper: Sequence[str] = (),
    ) -> None:
        self.args = list(args)
        self.expected_listeners = listeners
        self.logs: list[LogLine] = []
        self.signalled = False
        self._stderr: list[str] = []
        self._cond = threading.Condition()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MMPROXY_")}
        self.proc = subprocess.Popen(
            [
                # prlimit (util-linux) sets the descriptor limit for tests of the connection cap.
                *(("prlimit", f"--nofile={nofile}:{nofile}") if nofile else ()),
                *("ip", "netns", "exec", namespace.name, *wrapper, sys.executable, "-m", "mmproxy"),
                *self.args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd="/",  # so that ``-m`` finds the installed package, not whatever the cwd holds
            start_new_session=True,
        )
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self.listening = self._wait_listening(listeners)
        first = self.listening[0]
        host, _, port = str(first.get("listenAddr", first.get("listenAdr"))).rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)

    # ------------------------------------------------------------------ output

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                record = json.loads(line)
            except ValueError:
                record = {"_raw": line.rstrip("\n")}
            if not isinstance(record, dict):
                record = {"_raw": line.rstrip("\n")}
            with self._cond:
                self.logs.append(record)
                self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self._stderr.append(line)

    @property
    def stderr(self) -> str:
        with self._cond:
            return "".join(self._stderr)

    def describe(self) -> str:
        """Everything the daemon said, for assertion messages."""
        with self._cond:
            logs = "\n".join(json.dumps(line) for line in self.logs[-60:])
        command = " ".join(self.args)
        return f"mmproxy {command}\n--- stdout (last 60)\n{logs}\n--- stderr\n{self.stderr}"

    def _wait_listening(self, count: int, timeout: float = 10.0) -> list[LogLine]:
        deadline = Deadline(timeout)
        with self._cond:
            while not deadline.expired():
                found = [line for line in self.logs if line.get("msg") == "listening"]
                if len(found) >= count:
                    return found
                if self.proc.poll() is not None:
                    break
                self._cond.wait(min(0.1, deadline.remaining()))
        self.stop()
        raise AssertionError(f"mmproxy did not report {count} listeners\n{self.describe()}")

    def wait_for(
        self, predicate: Callable[[LogLine], bool], count: int = 1, timeout: float = 5.0
    ) -> list[LogLine]:
        """Wait until ``count`` log lines match; return the matches (maybe fewer on timeout)."""
        deadline = Deadline(timeout)
        with self._cond:
            while True:
                found = [line for line in self.logs if predicate(line)]
                if len(found) >= count or deadline.expired():
                    return found
                self._cond.wait(min(0.1, deadline.remaining()))

    # --------------------------------------------------------------- lifecycle

    def signal(self, signum: int) -> None:
        """Send ``signum``; the fixture then leaves the exit code to the test."""
        self.signalled = True
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def hup(self) -> None:
        """SIGHUP: a reload, not a stop, so the fixture still expects a clean exit on SIGTERM."""
        self.proc.send_signal(signal.SIGHUP)

    def wait(self, timeout: float) -> int | None:
        """The exit code, or ``None`` if still running after ``timeout`` seconds."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, wait, then SIGKILL the whole process group; close the pipes.

        Idempotent.  Marks the daemon as ``signalled``: its exit is then the caller's business.
        """
        self.signalled = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        if self.wait(timeout) is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        for reader in self._readers:
            reader.join(timeout=5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return self.proc.returncode


StartDaemon = Callable[..., Daemon]


def run_to_exit(
    namespace: NetNamespace, *flags: str, timeout: float = 20.0, wrapper: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mmproxy FLAGS`` in ``namespace`` to its exit (for start-up failures).

    ``wrapper`` goes between entering the namespace and the interpreter (``setpriv ...``).
    """
    return subprocess.run(
        ["ip", "netns", "exec", namespace.name, *wrapper, sys.executable, "-m", "mmproxy", *flags],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
        check=False,
    )
