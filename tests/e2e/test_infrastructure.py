"""Self-tests of the e2e harness, without mmproxy.

Why: when an e2e test fails, these say whether the harness (namespace, policy routes,
in-namespace sockets, recording backend) works on this machine.  If a transparent socket bound
to a documentation address reaches the backend and gets its answer back, the routes mmproxy
relies on are in place and a failure elsewhere is mmproxy's.
"""

from __future__ import annotations

import os
import socket
import threading

import pytest
from netns import Backend, ClientAddresses, Deadline, Net, recv_to_eof


def _namespace_inode(tid: int | None = None) -> int:
    path = f"/proc/self/task/{tid}/ns/net" if tid else "/proc/self/ns/net"
    return os.stat(path).st_ino


def test_socket_thread_is_in_the_namespace(net: Net) -> None:
    """The helper thread lives in the test namespace; the test's own thread does not."""
    inside = net.sockets.call(lambda: _namespace_inode(threading.get_native_id()))
    assert inside == os.stat(net.ns.path).st_ino
    assert inside != _namespace_inode()


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_spoofed_source_reaches_backend_and_back(
    net: Net, backend4: Backend, backend6: Backend, addresses: ClientAddresses, v6: bool
) -> None:
    """A transparent socket bound to 198.51.100.x (or 2001:db8::x) talks to the backend both
    ways: the policy routes work before mmproxy is involved at all."""
    source, backend = (addresses.v6(), backend6) if v6 else (addresses.v4(), backend4)
    with net.sockets.transparent_connect(source, backend.address) as sock:
        sock.sendall(b"ping")
        sock.shutdown(socket.SHUT_WR)
        assert recv_to_eof(sock, Deadline(5)) == b"ping"
    assert backend.peers() == [source]
