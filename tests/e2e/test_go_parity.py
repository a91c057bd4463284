"""mmproxy and the real go-mmproxy side by side: the same events give the same log messages.

Debian's go-mmproxy (2.1, README's install command installs it) and mmproxy run in the test
namespace with the same flags; each scenario makes one event happen to each of them, and the
messages go-mmproxy logged (its records are zap's, on stderr) must be exactly the go-mmproxy
messages mmproxy logged, in the same order, each record carrying at least go-mmproxy's keys
with the same values where they do not depend on a port the kernel chose.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_runner import LogLine, StartDaemon
from interop import require
from netns import (
    Backend,
    ClientAddresses,
    Deadline,
    Net,
    NetNamespace,
    reset_after_first_read,
    wait_closed,
)
from test_tcp import header, send_allowing_reset
from test_udp import UdpBackend, dgram_header

from mmproxy import logs

# zap's own keys, and what mmproxy spells otherwise (slog's ``time``): not part of the vocabulary.
GO_ONLY_KEYS = {"ts", "caller", "stacktrace", "level"}
# Values that depend on the connection (ports the kernel chose), compared as keys only.
PER_CONNECTION = {"remoteAddr", "localAddr", "error"}
GO_MESSAGES = {value for name, value in vars(logs).items() if name.startswith("MSG_")}


class GoMmproxy:
    """/usr/bin/go-mmproxy in a namespace; its zap JSON records (stderr), parsed."""

    def __init__(self, ns: NetNamespace, flags: list[str]) -> None:
        program = require("go-mmproxy")["go-mmproxy"]
        self.logs: list[LogLine] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns.name, program, *flags],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        assert self.wait_for("listening"), self.logs

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with contextlib.suppress(ValueError), self._cond:
                self.logs.append(json.loads(line))
                self._cond.notify_all()

    def wait_for(self, msg: str, timeout: float = 5.0) -> bool:
        deadline = Deadline(timeout)
        with self._cond:
            while not any(line.get("msg") == msg for line in self.logs):
                if deadline.expired() or self.proc.poll() is not None:
                    return False
                self._cond.wait(min(0.1, deadline.remaining()))
            return True

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def go_mmproxy(net: Net) -> Iterator[Callable[[list[str]], GoMmproxy]]:
    started: list[GoMmproxy] = []

    def start(flags: list[str]) -> GoMmproxy:
        started.append(GoMmproxy(net.ns, flags))
        return started[-1]

    yield start
    for proc in started:
        proc.stop()


def free_port(net: Net) -> int:
    with net.sockets.server("127.0.0.1") as probe:
        return int(probe.getsockname()[1])


def connection_records(records: list[LogLine]) -> list[LogLine]:
    """The per-connection records in go-mmproxy's vocabulary (start-up lines left out)."""
    return [
        line
        for line in records
        if line.get("msg") in GO_MESSAGES and line["msg"] not in ("listening", "allowed subnet")
    ]


def relayed(net: Net, port: int, addresses: ClientAddresses) -> None:
    with net.sockets.connect(("127.0.0.1", port)) as sock:
        sock.sendall(header(addresses.v4(), ("203.0.113.1", 443), 1) + b"hi")
        sock.settimeout(10)
        assert sock.recv(2) == b"hi"


def unknown(net: Net, port: int, addresses: ClientAddresses) -> None:
    with net.sockets.connect(("127.0.0.1", port)) as sock:
        sock.sendall(b"PROXY UNKNOWN\r\nhi")
        sock.settimeout(10)
        assert sock.recv(2) == b"hi"


def bad_header(net: Net, port: int, addresses: ClientAddresses) -> None:
    with net.sockets.connect(("127.0.0.1", port)) as sock:
        send_allowing_reset(sock, b"GET / HTTP/1.0\r\n\r\n")
        wait_closed(sock, 5)


def silent(net: Net, port: int, addresses: ClientAddresses) -> None:
    with net.sockets.connect(("127.0.0.1", port)) as sock:
        sock.shutdown(socket.SHUT_WR)
        wait_closed(sock, 5)


def refused(net: Net, port: int, addresses: ClientAddresses) -> None:
    """A header and a byte, then wait for mmproxy to close (refused, or the backend reset)."""
    with net.sockets.connect(("127.0.0.1", port)) as sock:
        send_allowing_reset(sock, header(addresses.v4(), ("203.0.113.1", 443), 1) + b"x")
        wait_closed(sock, 5)


SCENARIOS: dict[str, tuple[Callable[[Net, int, ClientAddresses], None], str, str]] = {
    # name: (what the client does, daemon setup, go-mmproxy's last message for it)
    "relayed": (relayed, "", "connection closing"),
    "unknown-client": (unknown, "", "connection closing"),
    "backend-reset": (refused, "reset", "connection broken"),
    "bad-header": (bad_header, "", "failed to parse PROXY header"),
    "silent": (silent, "", "failed to read PROXY header"),
    "not-allowed": (refused, "subnets", "connection origin not in allowed subnets"),
    "backend-down": (refused, "down", "failed to establish upstream connection"),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_same_event_same_messages_as_go_mmproxy(
    scenario: str,
    net: Net,
    mmproxy: StartDaemon,
    go_mmproxy: Callable[[list[str]], GoMmproxy],
    backend4: Backend,
    addresses: ClientAddresses,
    closed_port: int,
    tmp_path: Path,
) -> None:
    act, setup, last = SCENARIOS[scenario]
    flags = ["-v", "2", "-6", "[::1]:9"]
    target = f"127.0.0.1:{closed_port}" if setup == "down" else backend4.target()
    flags += ["-4", target]
    if setup == "reset":
        backend4.handler = reset_after_first_read
    if setup == "subnets":
        subnets = tmp_path / "subnets.txt"
        subnets.write_text("192.0.2.0/24\n")  # go-mmproxy 2.1 takes no comment lines
        flags += ["-allowed-subnets", str(subnets)]
    go_port, our_port = free_port(net), free_port(net)
    go = go_mmproxy(["-l", f"127.0.0.1:{go_port}", *flags])
    ours = mmproxy(*flags, listen=f"127.0.0.1:{our_port}", target4=target)

    act(net, go_port, addresses)
    act(net, our_port, addresses)
    assert go.wait_for(last), go.logs
    assert ours.wait_for(lambda line: line.get("msg") == last), ours.describe()

    theirs = connection_records(go.logs)
    mine = connection_records(list(ours.logs))
    assert [line["msg"] for line in mine] == [line["msg"] for line in theirs], (theirs, mine)
    for go_line, our_line in zip(theirs, mine, strict=True):
        expected: dict[str, Any] = {
            key: value for key, value in go_line.items() if key not in GO_ONLY_KEYS
        }
        missing = sorted(set(expected) - set(our_line))
        assert not missing, (go_line["msg"], missing, our_line)
        for key in set(expected) - PER_CONNECTION - {"listenAdr", "clientAddr"}:
            assert our_line[key] == expected[key], (key, go_line, our_line)
        if expected.get("clientAddr") == "UNKNOWN":
            assert our_line["clientAddr"] == "UNKNOWN", our_line
        assert our_line["listenAdr"] == f"127.0.0.1:{our_port}"
        assert expected.get("listenAdr") == f"127.0.0.1:{go_port}"


def test_udp_same_messages_as_go_mmproxy(
    net: Net,
    mmproxy: StartDaemon,
    go_mmproxy: Callable[[list[str]], GoMmproxy],
    addresses: ClientAddresses,
) -> None:
    """-p udp: a datagram that is not PROXY v2, then a good one that opens a flow."""
    backend = UdpBackend(net, "127.0.0.1")
    try:
        flags = ["-p", "udp", "-v", "2", "-4", backend.target(), "-6", "[::1]:9"]
        go_port, our_port = free_port(net), free_port(net)
        go = go_mmproxy(["-l", f"127.0.0.1:{go_port}", *flags])
        ours = mmproxy(*flags, listen=f"127.0.0.1:{our_port}", target4=backend.target())
        for daemon_port in (go_port, our_port):
            with net.sockets.new_socket(socket.AF_INET, socket.SOCK_DGRAM) as balancer:
                balancer.bind(("127.0.0.1", 0))
                balancer.sendto(b"no header here", ("127.0.0.1", daemon_port))
                balancer.sendto(dgram_header(addresses.v4()) + b"hi", ("127.0.0.1", daemon_port))
                balancer.settimeout(10)
                assert balancer.recv(4096).endswith(b"|hi")
        assert go.wait_for("new connection"), go.logs
        assert ours.wait_for(lambda line: line.get("msg") == "new connection"), ours.describe()
        theirs = connection_records(go.logs)
        mine = connection_records(list(ours.logs))
        assert [line["msg"] for line in mine] == [line["msg"] for line in theirs], (theirs, mine)
        for go_line, our_line in zip(theirs, mine, strict=True):
            missing = sorted(set(go_line) - GO_ONLY_KEYS - set(our_line))
            assert not missing, (go_line["msg"], missing, our_line)
            if "targetAddr" in go_line:
                assert our_line["targetAddr"] == go_line["targetAddr"]
    finally:
        backend.close()
