"""contrib/'s recipes, run as shipped: TPROXY with nftables for ``-listen-transparent``, and the
backend on another host with ``-mark``.

Each test builds the two hosts of the recipe as two namespaces joined by a veth pair
(``interop.topology``: 198.51.100.1 is the mmproxy host, 198.51.100.2 the other one), loads the
recipe's nftables file unchanged with ``nft -f``, adds the routing contrib/README.md gives, and
checks what the backend saw.  A control run without the recipe's piece shows that piece is what
makes it work.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from daemon_runner import StartDaemon
from interop import CLIENT_V4, SERVER_V4, require, topology
from netns import Backend, ClientAddresses, Deadline, NamespaceSockets, NetNamespace, exchange
from test_tcp import header, send_allowing_reset

from mmproxy.protocol import InetAddress, ProxyHeader, encode

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"
ROUTING_TABLE = "123"  # the README's table, which the namespaces already have


def nft(ns: NetNamespace, recipe: str) -> None:
    """``nft -f contrib/RECIPE`` inside the namespace (the file as shipped)."""
    program = require("nft")["nft"]
    done = subprocess.run(
        ["ip", "netns", "exec", ns.name, program, "-f", str(CONTRIB / recipe)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def define(recipe: str, name: str) -> str:
    """The value a recipe ``define``s (the test follows the file's defaults)."""
    for line in (CONTRIB / recipe).read_text().splitlines():
        if line.startswith(f"define {name} = "):
            return line.split("=", 1)[1].split("#", 1)[0].strip()
    raise AssertionError(f"{recipe} defines no {name}")


@contextlib.contextmanager
def sockets_in(ns: NetNamespace) -> Iterator[NamespaceSockets]:
    made = NamespaceSockets(ns)
    try:
        yield made
    finally:
        made.close()


def test_tproxy_recipe_delivers_a_port_range_to_one_listener(
    mmproxy: StartDaemon, addresses: ClientAddresses
) -> None:
    """The load balancer connects to 203.0.113.10 on ports of the recipe's range, an address
    the mmproxy host does not have; TPROXY hands each connection, unchanged, to
    ``mmproxy -l 0.0.0.0:PORT -listen-transparent``, which relays it from the header's client.
    ``localAddr`` shows the address and port the balancer asked for."""
    port = int(define("tproxy.nft", "MMPROXY_PORT"))
    first, last = (int(n) for n in define("tproxy.nft", "PORTS").split("-"))
    mark = define("tproxy.nft", "TPROXY_MARK")
    service = "203.0.113.10"
    with topology(f"tproxy-{os.getpid()}") as topo, sockets_in(topo.client) as balancer:
        topo.client.ip("route", "add", "default", "via", SERVER_V4)
        nft(topo.server, "tproxy.nft")
        topo.server.ip("rule", "add", "fwmark", mark, "lookup", ROUTING_TABLE)
        backend = Backend(topo.server_sockets, "127.0.0.1")
        daemon = None
        try:
            daemon = mmproxy(
                "-listen-transparent",
                listen=f"0.0.0.0:{port}",
                target4=backend.target(),
                ns=topo.server,
            )
            seen = []
            for service_port in (first, last):
                source = addresses.v4(prefix="192.0.2")
                with balancer.connect((service, service_port)) as sock:
                    sock.sendall(header(source, (service, service_port), 2))
                    assert exchange(sock, b"tproxied", Deadline(10)) == b"tproxied"
                seen.append(source)
            assert backend.peers() == seen
            local = [
                line["localAddr"] for line in daemon.logs if line.get("msg") == "new connection"
            ]
            assert local == [f"{service}:{first}", f"{service}:{last}"], daemon.describe()
            # Control: a port outside the range is not redirected, and nothing listens there.
            with contextlib.suppress(ConnectionRefusedError, TimeoutError, OSError):
                balancer.connect((service, last + 1), timeout=2).close()
                raise AssertionError("a port outside the recipe's range reached a listener")
        finally:
            if daemon is not None:
                daemon.stop()  # before the namespaces go
            backend.close()


def test_remote_backend_recipe_brings_the_replies_back(
    mmproxy: StartDaemon, addresses: ClientAddresses
) -> None:
    """The backend runs on the other host (198.51.100.2, its default route via the mmproxy
    host).  With ``-mark`` and the recipe's rules, the backend sees the header's client and
    its replies reach mmproxy; without the rules the replies are not mmproxy's, the upstream
    connection never completes and the client is closed."""
    mark = define("remote-backend.nft", "MARK")
    reply_mark = define("remote-backend.nft", "REPLY_MARK")
    with topology(f"remote-{os.getpid()}") as topo, sockets_in(topo.client) as backend_host:
        topo.client.ip("route", "add", "default", "via", SERVER_V4)
        backend = Backend(backend_host, CLIENT_V4)
        daemons = []
        try:
            flags = ("-mark", mark, "--connect-timeout", "1")
            target = f"{CLIENT_V4}:{backend.port}"
            # Control first: -mark alone, no rules yet.
            bare = mmproxy(*flags, target4=target, verbose=1, ns=topo.server)
            daemons.append(bare)
            with topo.server_sockets.connect((bare.host, bare.port)) as sock:
                send_allowing_reset(
                    sock, header(addresses.v4(prefix="192.0.2"), (CLIENT_V4, 80), 1)
                )
                sock.settimeout(10)
                assert sock.recv(1) == b""  # closed: the backend's reply never reached mmproxy
            assert backend.peers() == []
            assert bare.wait_for(lambda line: line.get("reason") == "upstream_failed")

            nft(topo.server, "remote-backend.nft")
            topo.server.ip("rule", "add", "fwmark", reply_mark, "lookup", ROUTING_TABLE)
            daemon = mmproxy(*flags, target4=target, ns=topo.server)
            daemons.append(daemon)
            sources = [addresses.v4(prefix="192.0.2"), addresses.v4(prefix="203.0.113")]
            for source in sources:
                wire = encode(
                    ProxyHeader.proxy(InetAddress.of(*source), InetAddress.of(CLIENT_V4, 80))
                )
                with topo.server_sockets.connect((daemon.host, daemon.port)) as sock:
                    sock.sendall(wire + b"over there")
                    assert exchange(sock, b"", Deadline(10)) == b"over there"
            assert backend.peers() == sources
        finally:
            for started in daemons:
                started.stop()  # before the namespaces go
            backend.close()
