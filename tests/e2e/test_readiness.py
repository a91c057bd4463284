"""systemd end to end: READY=1 once the daemon listens, STOPPING=1 at drain, WATCHDOG=1 while
its acceptors serve, and the unit's two capabilities being all it needs.

A datagram socket bound to a path plays systemd's notification socket (``$NOTIFY_SOCKET``).
The path is a file, so it reaches across the network namespace (an abstract name would not:
abstract unix names belong to a network namespace; the unit tests cover those).
"""

from __future__ import annotations

import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_runner import StartDaemon, run_to_exit
from netns import Backend, ClientAddresses, Deadline, Net, exchange
from test_tcp import header


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """The socket, named in NOTIFY_SOCKET for the daemons this test starts."""
    with tempfile.TemporaryDirectory(prefix="mmproxy-notify-") as directory:
        path = str(Path(directory) / "notify")  # short: unix socket paths end at 108 bytes
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(10)
            monkeypatch.setenv("NOTIFY_SOCKET", path)
            yield sock


def messages(sock: socket.socket) -> list[str]:
    """The next datagram, split into its assignments."""
    return sock.recv(4096).decode().split("\n")


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_ready_then_stopping(
    notify_socket: socket.socket, mmproxy: StartDaemon, protocol: str
) -> None:
    daemon = mmproxy("-p", protocol, listeners=2)
    ready = messages(notify_socket)
    assert ready[0] == "READY=1"
    assert any(item.startswith("STATUS=") for item in ready)
    # READY=1 follows the "ready" log line, which follows every listener.
    assert [line.get("msg") for line in daemon.logs].count("listening") == 2
    assert daemon.wait_for(lambda line: line.get("msg") == "ready", timeout=5)

    daemon.signal(signal.SIGTERM)
    stopping = messages(notify_socket)
    assert stopping[0] == "STOPPING=1"
    assert daemon.wait(10) == 0
    notify_socket.settimeout(0.5)
    with pytest.raises(TimeoutError):
        notify_socket.recv(4096)  # nothing else was sent


def test_a_vanished_notify_socket_is_a_warning(
    monkeypatch: pytest.MonkeyPatch, mmproxy: StartDaemon, tmp_path: Path
) -> None:
    """systemd gone, or a stale variable: the daemon serves anyway and says why once."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    daemon = mmproxy()
    warned = daemon.wait_for(lambda line: line.get("msg", "").startswith("cannot notify systemd"))
    assert warned, daemon.describe()
    assert warned[0]["level"] == "WARN"


def test_watchdog_pings_only_while_accepting(
    notify_socket: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
    mmproxy: StartDaemon,
    net: Net,
    addresses: ClientAddresses,
) -> None:
    """With systemd's WatchdogSec= (WATCHDOG_USEC, here 0.2 s) the daemon sends WATCHDOG=1
    every half period while its acceptors serve; once they stop (the drain), it goes silent
    even though the process still runs."""
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    daemon = mmproxy(drain_timeout=10)
    assert messages(notify_socket)[0] == "READY=1"
    for _ in range(3):
        assert messages(notify_socket) == ["WATCHDOG=1"]
    held = net.sockets.connect((daemon.host, daemon.port))  # keeps the drain going
    with held:
        held.sendall(header(addresses.v4(), ("203.0.113.1", 443), 1) + b"hold")
        held.settimeout(10)
        assert held.recv(4) == b"hold"  # relayed: a live connection
        daemon.signal(signal.SIGTERM)
        while (said := messages(notify_socket))[0] == "WATCHDOG=1":
            pass  # pings sent before the signal was handled
        assert said[0] == "STOPPING=1"
        notify_socket.settimeout(0.5)  # five ping periods
        with pytest.raises(TimeoutError):
            notify_socket.recv(4096)
        assert daemon.proc.poll() is None, "still draining, yet silent"
    assert daemon.wait(10) == 0


def unit_capabilities() -> list[str]:
    unit = (Path(__file__).resolve().parents[2] / "contrib" / "mmproxy.service").read_text()
    (line,) = [line for line in unit.splitlines() if line.startswith("CapabilityBoundingSet=")]
    return line.split("=", 1)[1].split()


def only(capabilities: list[str]) -> list[str]:
    """``setpriv`` keeping just ``capabilities`` (as the unit's CapabilityBoundingSet= does)."""
    setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"  # util-linux: always on Debian
    keep = ",".join(f"+{name.removeprefix('CAP_').lower()}" for name in capabilities)
    return [setpriv, f"--bounding-set=-all,{keep}", "--inh-caps=-all"]


def test_the_units_capabilities_are_enough(
    mmproxy: StartDaemon, net: Net, backend4: Backend, addresses: ClientAddresses
) -> None:
    """With no capability but the unit's two, mmproxy listens on port 443 and relays from the
    client's address; without CAP_NET_BIND_SERVICE the port is refused, with one log line."""
    capabilities = unit_capabilities()
    assert set(capabilities) == {"CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"}
    without = [name for name in capabilities if name != "CAP_NET_BIND_SERVICE"]
    refused = run_to_exit(net.ns, "-l", "127.0.0.1:443", wrapper=only(without))
    assert refused.returncode == 1, refused
    assert "Permission denied" in refused.stdout, refused.stdout

    daemon = mmproxy(listen="127.0.0.1:443", wrapper=only(capabilities))
    assert daemon.port == 443
    source = addresses.v4()
    with net.sockets.connect((daemon.host, daemon.port)) as sock:
        sock.sendall(header(source, ("203.0.113.1", 443), 2) + b"low port")
        assert exchange(sock, b"", Deadline(10)) == b"low port"
    assert backend4.peers() == [source]


def test_watchdog_pings_in_udp_mode(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch, mmproxy: StartDaemon
) -> None:
    """-p udp: the dispatchers are what the pings vouch for."""
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    daemon = mmproxy("-p", "udp", listeners=2)
    assert messages(notify_socket)[0] == "READY=1"
    for _ in range(3):
        assert messages(notify_socket) == ["WATCHDOG=1"]
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(10) == 0
