"""The load generator speaks the PROXY protocol correctly: its headers parse with mmproxy's own
parser, carry documentation-range client addresses that never repeat, and the request follows.

Runs the compiled ``loadgen`` against a small Python backend on the host's loopback (no
namespace needed: nothing here is relayed).
"""

from __future__ import annotations

import socket
import subprocess
import threading
from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest

from bench import build
from mmproxy.protocol import InetAddress, Parsed, parse

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
