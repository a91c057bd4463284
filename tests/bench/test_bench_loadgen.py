"""The load generator speaks the PROXY protocol correctly: its headers parse with mmproxy's own
parser, carry documentation-range client addresses that never repeat, and the request follows.

Runs the compiled ``loadgen`` against a small Python backend on the host's loopback (no
namespace needed: nothing here is relayed).
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Callable
from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest

from bench import build
from mmproxy.protocol import Family, InetAddress, Parsed, Transport, parse, parse_complete

REQUEST = b"HELLO\r\n"


class Recorder:
    """Accepts connections, keeps what each sent up to the request, answers, closes."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.1)
        self.port = self.server.getsockname()[1]
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set() and len(self.received) < 1000:
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while not data.endswith(REQUEST):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                self.received.append(data)
                conn.sendall(b"r" * 63 + b"\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.server.close()


@pytest.fixture(scope="module")
def loadgen() -> Path:
    return build.build()


def _connrate(loadgen: Path, port: int, *flags: str) -> None:
    result = subprocess.run(
        [
            *(str(loadgen), "connrate", "--connect", f"127.0.0.1:{port}"),
            *("--conns", "1", "--duration", "0.3", *flags),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert '"connections": ' in result.stdout


def _headers(data: list[bytes], version: str) -> list[tuple[str, int, int]]:
    """(client host, client port, destination port) of each recorded connection."""
    found = []
    for raw in data:
        result = parse(raw)
        assert isinstance(result, Parsed), raw
        assert result.header.version == int(version[1])
        assert raw[result.consumed :] == REQUEST  # the request follows the header at once
        source, destination = result.header.source, result.header.destination
        assert isinstance(source, InetAddress)
        assert isinstance(destination, InetAddress)
        assert source.host in ip_network("198.51.100.0/24")  # RFC 5737 documentation range
        assert destination.host == ip_address("127.0.0.1")
        found.append((str(source.host), source.port, destination.port))
    return found


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_headers_parse_and_client_addresses_advance(loadgen: Path, version: str) -> None:
    runs = []
    for flags in (("--addr-offset", "64001"), ("--dest-port", "443")):
        recorder = Recorder()
        try:
            _connrate(loadgen, recorder.port, "--proxy", version, *flags)
        finally:
            recorder.close()
        assert len(recorder.received) >= 2
        runs.append(_headers(recorder.received, version))
    # connection k of a run uses 198.51.100.(1 + k // 64000 % 254), port 1024 + k % 64000
    first, second = runs
    assert first[:2] == [("198.51.100.2", 1025, 0), ("198.51.100.2", 1026, 0)]
    assert second[:2] == [("198.51.100.1", 1024, 443), ("198.51.100.1", 1025, 443)]
    assert len(set(first)) == len(first)  # no address:port repeats within a run


def test_direct_mode_sends_no_header(loadgen: Path) -> None:
    recorder = Recorder()
    try:
        _connrate(loadgen, recorder.port, "--proxy", "none")
    finally:
        recorder.close()
    assert recorder.received
    assert set(recorder.received) == {REQUEST}


# ------------------------------------------------------------------------------- UDP

UDP_PAYLOAD = 64


class UdpEcho:
    """A UDP server on the host's loopback that keeps every datagram and sends back
    ``answer(datagram)`` (None: no reply), like a proxy that takes the header off."""

    def __init__(self, answer: Callable[[bytes], bytes | None]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self._answer = answer
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set() and len(self.received) < 100_000:
            try:
                data, sender = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            self.received.append((data, sender))
            reply = self._answer(data)
            if reply is not None:
                self.sock.sendto(reply, sender)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sock.close()


def _udp(loadgen: Path, port: int, *flags: str) -> dict[str, int]:
    result = subprocess.run(
        [str(loadgen), "udp", "--connect", f"127.0.0.1:{port}", "--duration", "0.3", *flags],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    figures: dict[str, int] = json.loads(result.stdout)
    return figures


def _strip_header(data: bytes) -> bytes:
    return data[parse_complete(data).consumed :]


def test_udp_headers_are_v2_dgram_one_fake_client_per_flow(loadgen: Path) -> None:
    server = UdpEcho(_strip_header)
    try:
        figures = _udp(
            loadgen,
            server.port,
            *("--proxy", "v2", "--conns", "3", "--window", "4"),
            *("--addr-offset", "64001", "--dest-port", "443"),
        )
    finally:
        server.close()
    clients: dict[tuple[str, int], set[tuple[str, int]]] = {}
    for data, sender in server.received:
        result = parse_complete(data)
        header = result.header
        assert header.version == 2
        assert header.transport is Transport.DGRAM
        assert header.family is Family.INET
        assert len(data) - result.consumed == UDP_PAYLOAD
        assert isinstance(header.source, InetAddress)
        assert isinstance(header.destination, InetAddress)
        assert header.source.host in ip_network("198.51.100.0/24")
        assert (header.destination.host, header.destination.port) == (ip_address("127.0.0.1"), 443)
        clients.setdefault((str(header.source.host), header.source.port), set()).add(sender)
    # flow k of a run is fake client k (from --addr-offset), and each flow is one socket
    assert sorted(clients) == [("198.51.100.2", port) for port in (1025, 1026, 1027)]
    senders = [next(iter(found)) for found in clients.values()]
    assert all(len(found) == 1 for found in clients.values())
    assert len(set(senders)) == 3
    assert figures["addresses_used"] == 3
    assert figures["mismatches"] == 0
    assert figures["errors"] == 0
    assert figures["sent"] == len(server.received)
    assert figures["received"] + figures["lost"] == figures["sent"]  # no timing: a stall may lose
    assert 0 < figures["datagrams"] <= figures["received"]


def test_udp_direct_sends_bare_payloads_and_counts_losses(loadgen: Path) -> None:
    server = UdpEcho(lambda data: None)  # answers nothing: everything is lost
    try:
        figures = _udp(loadgen, server.port, "--proxy", "none", "--conns", "2", "--window", "3")
    finally:
        server.close()
    assert len(server.received) == figures["sent"] == 6  # one window per flow, never refilled
    assert all(len(data) == UDP_PAYLOAD for data, _ in server.received)
    assert figures["received"] == figures["datagrams"] == 0
    assert figures["lost"] == 6
    assert figures["addresses_used"] == 0


def test_udp_replies_that_were_not_sent_are_mismatches(loadgen: Path) -> None:
    def corrupt(data: bytes) -> bytes:
        return data[:-1] + bytes([data[-1] ^ 0xFF])

    server = UdpEcho(corrupt)
    try:
        figures = _udp(loadgen, server.port, "--proxy", "none", "--window", "2")
    finally:
        server.close()
    assert figures["mismatches"] == 2  # the first window, answered wrongly: never refilled
    assert figures["received"] == 0
    assert figures["lost"] == 2


def test_udp_refuses_a_v1_header(loadgen: Path) -> None:
    result = subprocess.run(
        [str(loadgen), "udp", "--connect", "127.0.0.1:9", "--proxy", "v1", "--duration", "0.1"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "udp: --proxy none or v2" in result.stderr


# ------------------------------------------------------------------------- idle-active

PING = b"PING\r\n"


class Answerer:
    """Accepts connections; answers each one's first request with ``answer(request)``, then
    keeps it open (the client closes)."""

    def __init__(self, answer: Callable[[bytes], bytes]) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.1)
        self.port = self.server.getsockname()[1]
        self.requests: list[bytes] = []
        self.ended: list[bytes] = []  # what each connection sent after its request, to its end
        self._answer = answer
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stop.is_set() and len(self._threads) < 100:
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._serve, args=(conn,))
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            data = b""
            while not data.endswith(PING):
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            self.requests.append(data)
            conn.sendall(self._answer(data))
            rest = b""
            while chunk := conn.recv(4096):
                rest += chunk
            self.ended.append(rest)

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(10)
        for thread in self._threads:
            thread.join(10)
        self.server.close()


def _idle_active(loadgen: Path, port: int, conns: int) -> list[dict[str, object]]:
    """Run ``idle-active`` until its connections are opened, then close its stdin; its JSON
    lines (the ``opened`` event, then the result)."""
    argv = [
        *(str(loadgen), "idle-active", "--connect", f"127.0.0.1:{port}"),
        *("--conns", str(conns), "--duration", "20", "--proxy", "v1"),
    ]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None
        assert child.stdin is not None
        try:
            first = json.loads(child.stdout.readline())
            child.stdin.close()
            out = child.stdout.read()  # to its end: bounded by --duration
        finally:
            if child.wait(30) is None:
                child.kill()
    assert child.returncode == 0
    return [first, json.loads(out.strip().splitlines()[-1])]


def test_idle_active_connections_count_once_their_echo_is_back(loadgen: Path) -> None:
    server = Answerer(lambda request: PING)
    try:
        opened, result = _idle_active(loadgen, server.port, 5)
    finally:
        server.close()
    assert opened == {"event": "opened", "opened": 5, "failed": 0}
    assert result["alive"] == 5
    assert result["mismatches"] == 0
    assert len(server.requests) == 5
    for request in server.requests:  # the header, then the request at once
        parsed = parse(request)
        assert isinstance(parsed, Parsed)
        assert request[parsed.consumed :] == PING
    assert server.ended == [b""] * 5  # quiet after the echo: nothing more was sent


def test_idle_active_checks_the_echo(loadgen: Path) -> None:
    server = Answerer(lambda request: b"PONG\r\n")
    try:
        _opened, result = _idle_active(loadgen, server.port, 3)
    finally:
        server.close()
    assert result["mismatches"] == 3


def test_udp_idle_opens_each_flow_once_and_holds_it_until_stdin_closes(loadgen: Path) -> None:
    """One datagram per flow (sent again until echoed), a report, then silence until stdin ends."""
    dropped_once: set[bytes] = set()

    def answer(data: bytes) -> bytes | None:
        if data not in dropped_once:  # the first try of each flow is "lost": the client resends
            dropped_once.add(data)
            return None
        return _strip_header(data)

    server = UdpEcho(answer)
    argv = [str(loadgen), "udp-idle", "--connect", f"127.0.0.1:{server.port}"]
    argv += ["--proxy", "v2", "--conns", "5", "--duration", "20"]
    try:
        with subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        ) as child:
            assert child.stdout is not None
            assert child.stdin is not None
            try:
                opened = json.loads(child.stdout.readline())
                seen_while_held = len(server.received)
                child.stdin.close()
                final = json.loads(child.stdout.readline())
                assert child.wait(10) == 0
            finally:
                if child.poll() is None:
                    child.kill()
    finally:
        server.close()
    assert opened == {"event": "opened", "opened": 5, "failed": 0}
    assert seen_while_held == len(server.received) == 10, "two tries per flow, nothing more"
    senders = {sender for _, sender in server.received}
    sources = {parse_complete(data).header.source for data, _ in server.received}
    assert len(senders) == len(sources) == 5, "one socket and one fake client per flow"
    assert final["alive"] == 5
    assert final["mismatches"] == 0
