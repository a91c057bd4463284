"""Fixtures for the end-to-end tests: a namespace per session, backends and daemons per test.

The namespace (with the README's policy routes) is made once per session because creating one
costs a few ``ip`` calls; everything that holds state a test could observe (backends, which
record their peers, and daemons, which log) is made fresh for each test, so tests stay
independent.  Every fixture cleans up after itself.  At teardown every daemon must still be
running (unless the test signalled it), must stop with exit code 0 on SIGTERM, must not have
printed a traceback, and must not have logged at ERROR level (per-connection trouble is DEBUG,
as in go-mmproxy) or written a line that is not JSON: each test checks those for free.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import pytest
from daemon_runner import DRAIN_TIMEOUT, HEADER_TIMEOUT, Daemon, StartDaemon
from netns import Backend, ClientAddresses, Net, NetNamespace, namespace


@pytest.fixture(scope="session")
def net() -> Iterator[Net]:
    """The session's namespace, ``mmproxy-test-<pid>``, deleted at the end."""
    with namespace(f"mmproxy-test-{os.getpid()}") as (ns, sockets):
        yield Net(ns, sockets)


@pytest.fixture(scope="session")
def addresses() -> ClientAddresses:
    """Unique fake client addresses for the whole session."""
    return ClientAddresses()


@pytest.fixture
def backend4(net: Net) -> Iterator[Backend]:
    """An echoing backend on 127.0.0.1 (the ``-4`` target)."""
    backend = Backend(net.sockets, "127.0.0.1")
    yield backend
    backend.close()


@pytest.fixture
def backend6(net: Net) -> Iterator[Backend]:
    """An echoing backend on ::1 (the ``-6`` target)."""
    backend = Backend(net.sockets, "::1")
    yield backend
    backend.close()


@pytest.fixture
def closed_port(net: Net) -> int:
    """A port on 127.0.0.1 in the namespace where nothing listens (a backend that is down)."""
    with net.sockets.server("127.0.0.1") as probe:
        return int(probe.getsockname()[1])


@pytest.fixture
def mmproxy(net: Net, backend4: Backend, backend6: Backend) -> Iterator[StartDaemon]:
    """Start mmproxy in the namespace: ``mmproxy(*extra_flags, listeners=N, ...)``.

    Defaults: listen on 127.0.0.1 with a kernel-chosen port, the two backends as ``-4``/``-6``,
    ``-v 2``, a 2 s header timeout, a 3 s drain timeout, JSON logs.
    """
    started: list[Daemon] = []

    def start(
        *extra: str,
        listeners: int = 1,
        listen: str = "127.0.0.1:0",
        target4: str | None = None,
        target6: str | None = None,
        verbose: int = 2,
        header_timeout: float = HEADER_TIMEOUT,
        drain_timeout: float = DRAIN_TIMEOUT,
        ns: NetNamespace | None = None,
        nofile: int | None = None,
        wrapper: Sequence[str] = (),
    ) -> Daemon:
        flags = [
            *("-l", listen),
            *("-4", target4 or backend4.target()),
            *("-6", target6 or backend6.target()),
            *("-v", str(verbose)),
            *("--header-timeout", str(header_timeout)),
            *("--drain-timeout", str(drain_timeout)),
            *("--log-format", "json"),
            *(("-listeners", str(listeners)) if listeners != 1 else ()),
            *extra,
        ]
        daemon = Daemon(ns or net.ns, flags, listeners=listeners, nofile=nofile, wrapper=wrapper)
        started.append(daemon)
        return daemon

    yield start
    problems = []
    for daemon in started:
        ours = not daemon.signalled  # the test left the daemon's lifecycle to the fixture
        alive = daemon.proc.poll() is None
        code = daemon.stop(timeout=DRAIN_TIMEOUT + 5)
        if "Traceback" in daemon.stderr:
            problems.append(f"traceback on stderr\n{daemon.describe()}")
        errors = [line for line in daemon.logs if line.get("level") == "ERROR" or "_raw" in line]
        if errors:
            problems.append(f"ERROR or non-JSON log lines: {errors}\n{daemon.describe()}")
        if ours and not alive:
            problems.append(f"exited during the test\n{daemon.describe()}")
        elif ours and code != 0:
            problems.append(f"exit code {code} after SIGTERM\n{daemon.describe()}")
    assert not problems, "\n\n".join(problems)
