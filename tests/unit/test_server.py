"""The servers' shared base: one stop sequence, the same answers from TCP and UDP."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import pytest
from test_config import GO_DEFAULTS

from mmproxy.acl import AllowList, AllowListHolder
from mmproxy.config import build_config
from mmproxy.server import Server
from mmproxy.tcp import TcpServer
from mmproxy.udp import UdpServer


def _server(protocol: str, sock: socket.socket) -> Server:
    flags = {"protocol": protocol, "listen": "127.0.0.1:0", "target4": "127.0.0.1:9"}
    config = build_config(**{**GO_DEFAULTS, **flags, "target6": "[::1]:9"})
    allow = AllowListHolder(AllowList.everyone())
    log = logging.getLogger(f"test-server-{protocol}")
    if protocol == "udp":
        return UdpServer(config, log, [sock], 8, allow)
    return TcpServer(config, log, [sock], 8, allow)


@pytest.fixture(params=["tcp", "udp"])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    kind = socket.SOCK_DGRAM if request.param == "udp" else socket.SOCK_STREAM
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind(("127.0.0.1", 0))
    if kind == socket.SOCK_STREAM:
        sock.listen()
    try:
        yield _server(request.param, sock)
    finally:
        sock.close()


def test_both_servers_start_serve_and_stop_through_one_sequence(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    server.start()
    assert server.healthy()
    assert server.capacity == 8
    assert server.live() == 0
    announced: list[str] = []
    with caplog.at_level(logging.INFO):
        server.stop("SIGTERM", announced.append)
    expected = "draining 0 connections" if server.protocol == "tcp" else "closing UDP flows"
    assert announced == [expected]
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0].startswith("stopping: no longer")
    assert messages[-1] == "stopped"
    assert not server.healthy()
