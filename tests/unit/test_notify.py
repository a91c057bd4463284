"""sd_notify: the datagrams systemd's Type=notify expects, on path and abstract sockets."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmproxy import notify


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound to a path, like systemd's /run/systemd/notify."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        yield sock, path


def test_ready_reaches_a_path_socket(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    assert notify.notify(notify.READY, "STATUS=serving", environ={"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving"


def test_abstract_socket_name() -> None:
    name = f"mmproxy-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert notify.notify(notify.STOPPING, environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"STOPPING=1"


@pytest.mark.parametrize("value", [None, "", "@", "relative/path", "vsock:2:1234"])
def test_without_a_usable_socket_nothing_is_sent(value: str | None) -> None:
    environ = {} if value is None else {"NOTIFY_SOCKET": value}
    assert notify.notify_socket(environ) is None
    assert notify.notify(notify.READY, environ=environ) is False


def test_reads_the_process_environment(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify.notify(notify.READY)
    assert sock.recv(4096) == b"READY=1"


def test_a_named_socket_that_is_gone_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):  # noqa: PT011 - ENOENT or ECONNREFUSED, both OSError
        notify.notify(notify.READY, environ={"NOTIFY_SOCKET": str(tmp_path / "missing")})
