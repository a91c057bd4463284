"""The benchmark's private network namespace: loopback up, the policy routes, nothing else.

Why a namespace: mmproxy connects to the backend from the client's address (IP_TRANSPARENT) and
the replies only come back through policy routes; adding those to the host would change how the
machine routes.  In a namespace of its own the harness can add them, pick any port, and leave
nothing behind: :meth:`Namespace.delete` first kills whatever still runs inside.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

ROUTING_TABLE = "123"  # the README's convention for the "replies come back to the proxy" table


class NamespaceError(RuntimeError):
    """An ``ip`` command failed; the message is ip's own."""


def run_ip(*args: str) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=20)
    if result.returncode != 0:
        raise NamespaceError(f"ip {' '.join(args)}: {result.stderr.strip() or 'failed'}")
    return result.stdout


PREFIX = "mmproxy-bench-"


def default_name() -> str:
    return f"{PREFIX}{os.getpid()}"


def stale() -> list[str]:
    """Namespaces of earlier runs whose harness is gone (killed with SIGKILL, say).

    Only names this harness makes (``mmproxy-bench-<pid>``) and only when no process has that
    pid any more: a live run, or an unrelated process that reused the pid, is left alone.
    """
    try:
        names = os.listdir("/run/netns")
    except OSError:
        return []
    found = []
    for name in sorted(names):
        pid = name.removeprefix(PREFIX)
        if name.startswith(PREFIX) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            found.append(name)
    return found


def remove_stale() -> list[str]:
    """Kill what runs in each stale namespace and delete it; returns the names removed."""
    removed = []
    for name in stale():
        namespace = Namespace(name, existing=True)
        try:
            namespace.delete()
        except NamespaceError:
            continue
        removed.append(name)
    return removed


def exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


class Namespace:
    """A named network namespace; use :meth:`create` and :meth:`delete` (or ``with``).

    ``existing`` takes charge of a namespace that is already there (one left by a killed run),
    so that :meth:`delete` removes it.
    """

    def __init__(self, name: str | None = None, *, existing: bool = False) -> None:
        self.name = name or default_name()
        self._created = existing

    def create(self) -> None:
        run_ip("netns", "add", self.name)
        self._created = True
        self.ip("link", "set", "lo", "up")
        table = ROUTING_TABLE
        self.ip("rule", "add", "from", "127.0.0.1/8", "iif", "lo", "table", table)
        self.ip("route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", table)
        self.ip("-6", "rule", "add", "from", "::1/128", "iif", "lo", "table", table)
        self.ip("-6", "route", "add", "local", "::/0", "dev", "lo", "table", table)

    def ip(self, *args: str) -> str:
        """``ip -n NAME ARGS...``."""
        return run_ip("-n", self.name, *args)

    def prefix(self) -> list[str]:
        """The argv prefix that runs a command inside: ``ip netns exec NAME``."""
        return ["ip", "netns", "exec", self.name]

    def pids(self) -> list[int]:
        """Processes living in the namespace now."""
        if not self._created:
            return []
        try:
            out = run_ip("netns", "pids", self.name)
        except NamespaceError:
            return []
        return [int(word) for word in out.split() if word.isdigit()]

    def delete(self) -> None:
        """Kill what still runs inside, then delete the namespace (idempotent)."""
        if not self._created:
            return
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self._created = False
        run_ip("netns", "del", self.name)

    def __enter__(self) -> Namespace:
        self.create()
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()
