"""Loopback TCP sockets for the relay's unit tests (splice needs real sockets)."""

from __future__ import annotations

import socket

WAIT = 10.0  # seconds any single read may wait


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected loopback TCP sockets."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    return a, b


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Read exactly ``size`` bytes (each read waiting at most :data:`WAIT`)."""
    sock.settimeout(WAIT)
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"end of stream after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)
