"""Starting the backends and the proxies inside the namespace, and knowing when they are ready.

mmproxy says so itself: it logs a ``ready`` JSON line once every listener is bound.  A peer is
ready when its listening address accepts a TCP connection (probed from inside the namespace),
or for a UDP workload when a UDP socket is bound to its port (the namespace's ``net/udp``
table, read through the peer's ``/proc`` entry).
A backend (``loadgen serve``) prints ``ready``, then ``live N`` whenever its number of open
connections changes, which is how the idle workload counts what a proxy really relayed.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.interpreters import mmproxy_env
from bench.netns import Namespace
from bench.procs import Processes
from bench.settings import DIRECT, MMPROXY, Target

READY_TIMEOUT = 20.0  # seconds a proxy or backend gets to start (a loaded CI box is slow)
CLONE_NEWNET = 0x40000000


class StartError(RuntimeError):
    """A backend or proxy did not start; the message says which and why, in one line."""


class Backend:
    """A ``loadgen serve MODE`` process on 127.0.0.1:port and [::1]:port."""

    def __init__(
        self, procs: Processes, ns: Namespace, loadgen: Path, mode: str, port: int
    ) -> None:
        self.port = port
        self.mode = mode
        self._cond = threading.Condition()
        self._ready = False
        self._live = 0
        self.child = procs.start(
            [*ns.prefix(), str(loadgen), "serve", mode, "--port", str(port)],
            name=f"backend-{mode}",
            on_line=self._on_line,
        )
        with self._cond:
            self._cond.wait_for(lambda: self._ready or not self.child.alive(), READY_TIMEOUT)
            ready = self._ready
        if not ready:
            raise StartError(f"backend {mode} did not start: {self.child.stderr_tail()}")

    def _on_line(self, line: str) -> None:
        with self._cond:
            if line == "ready":
                self._ready = True
            elif line.startswith("live "):
                self._live = int(line.split()[1])
            self._cond.notify_all()

    @property
    def live(self) -> int:
        with self._cond:
            return self._live

    def wait_settled(self, quiet: float, timeout: float) -> int:
        """The live count once it has not changed for ``quiet`` seconds (or at ``timeout``)."""
        end = time.monotonic() + timeout
        with self._cond:
            last, since = self._live, time.monotonic()
            while time.monotonic() < end:
                self._cond.wait(min(0.1, max(0.0, end - time.monotonic())))
                if self._live != last:
                    last, since = self._live, time.monotonic()
                elif time.monotonic() - since >= quiet:
                    break
            return self._live


class Proxy:
    """A running proxy target: mmproxy or a peer, listening on 127.0.0.1:``port``.

    ``python`` runs an mmproxy target (the run's choice for it: ``Settings.interpreter``).
    """

    def __init__(
        self,
        procs: Processes,
        ns: Namespace,
        target: Target,
        python: str,
        port: int,
        backend_port: int,
        nofile: int | None = None,
        protocol: str = "tcp",
    ) -> None:
        if target.kind == DIRECT:
            raise ValueError("direct has no proxy")
        self.target = target
        self.listen = f"127.0.0.1:{port}"
        self.ready_record: dict[str, Any] = {}
        self.problems: list[str] = []  # ERROR log lines and the like, for the run's record
        self._cond = threading.Condition()
        self._ready = False
        target4, target6 = f"127.0.0.1:{backend_port}", f"[::1]:{backend_port}"
        limit = ["prlimit", f"--nofile={nofile}:{nofile}"] if nofile else []
        env = {k: v for k, v in os.environ.items() if not k.startswith("MMPROXY_")}
        if target.kind == MMPROXY:
            env = mmproxy_env()  # the same as interpreters.check_mmproxy tried
            argv = [
                *limit,
                *ns.prefix(),
                python,
                "-m",
                "mmproxy",
                *("-l", self.listen, "-4", target4, "-6", target6),
                *("--drain-timeout", "0"),  # the harness has ended every connection by then
                *(("-p", "udp") if protocol == "udp" else ()),
                *target.flags,
            ]
            self.child = procs.start(argv, name=target.name, on_line=self._on_log, env=env)
            self._wait_ready()
        else:
            argv = [
                *limit,
                *ns.prefix(),
                *target.command(self.listen, target4, target6, protocol),
            ]
            self.child = procs.start(argv, name=target.name, env=env)
            if protocol == "udp":
                self._wait_bound_udp(port)
            else:
                self._wait_accepting(ns, port)

    @property
    def pid(self) -> int:
        return self.child.pid

    def _on_log(self, line: str) -> None:
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        with self._cond:
            if not isinstance(record, dict):
                if len(self.problems) < 20:
                    self.problems.append(f"not JSON: {line[:200]}")
                return
            if record.get("msg") == "ready":
                self.ready_record = record
                self._ready = True
                self._cond.notify_all()
            elif record.get("level") == "ERROR" and len(self.problems) < 20:
                self.problems.append(str(record.get("msg")))

    def _wait_ready(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._ready or not self.child.alive(), READY_TIMEOUT)
            ready = self._ready
        if not ready:
            raise StartError(
                f"{self.target.name} did not log 'ready': {self.child.stderr_tail() or 'no output'}"
            )

    def _wait_accepting(self, ns: Namespace, port: int) -> None:
        if not probe_until_accepting(ns, "127.0.0.1", port, READY_TIMEOUT, self.child.alive):
            raise StartError(
                f"{self.target.name} did not accept on {self.listen}: "
                f"{self.child.stderr_tail() or 'no output'}"
            )

    def _wait_bound_udp(self, port: int) -> None:
        end = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < end and self.child.alive():
            tables = ""
            for name in ("udp", "udp6"):
                with contextlib.suppress(OSError):  # not started yet, or gone
                    tables += Path(f"/proc/{self.child.pid}/net/{name}").read_text()
            if udp_port_bound(tables, port):
                return
            time.sleep(0.05)
        hint = (
            ""
            if self.target.selects_protocol
            else " (does its template select UDP mode? e.g. '-p {protocol}')"
        )
        raise StartError(
            f"{self.target.name} did not bind UDP {self.listen}{hint}: "
            f"{self.child.stderr_tail() or 'no output'}"
        )


def udp_port_bound(table: str, port: int) -> bool:
    """Whether a ``/proc/net/udp`` (or ``udp6``) table has a socket bound to local ``port``.

    Each row after the heading has ``local_address`` as its second column, ``HEXADDR:HEXPORT``.
    """
    for line in table.splitlines():
        columns = line.split()
        if len(columns) < 2 or ":" not in columns[1]:
            continue
        try:
            if int(columns[1].rpartition(":")[2], 16) == port:
                return True
        except ValueError:
            continue
    return False


def enter_namespace(ns: Namespace) -> None:
    """Move the calling thread into ``ns`` (a namespace belongs to a thread, not a process)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns.name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({ns.name}): {os.strerror(errno)}")
    finally:
        os.close(fd)


def probe_until_accepting(
    ns: Namespace, host: str, port: int, timeout: float, alive: Callable[[], bool]
) -> bool:
    """Connect to ``host:port`` inside ``ns`` until it works, ``alive()`` is false, or timeout."""
    accepted: list[bool] = []

    def probe() -> None:
        enter_namespace(ns)
        end = time.monotonic() + timeout
        while time.monotonic() < end and alive():
            try:
                with socket.create_connection((host, port), timeout=1.0):
                    accepted.append(True)
                    return
            except OSError:
                time.sleep(0.05)

    thread = threading.Thread(target=probe, name=f"probe-{ns.name}", daemon=True)
    thread.start()
    thread.join(timeout + 5)
    return bool(accepted)
