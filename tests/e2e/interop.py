"""Real HAProxy, nginx and curl around mmproxy: two namespaces, config files, processes.

The topology (made by :func:`topology`)::

    client namespace                server namespace (lo up, the README's policy routes)
    198.51.100.2  ---- veth ----  198.51.100.1   load balancer (HAProxy or nginx stream)
    2001:db8::2                   2001:db8::1      |  PROXY header (HAProxy's through a tap
                                                   v  that records what it relays)
                                  mmproxy [::]:MMPROXY_PORT (also reachable from the client)
                                                   |  from the client's address (IP_TRANSPARENT)
                                                   v
                                  backend nginx http 127.0.0.1 / [::1] : BACKEND_PORT

Both namespaces are private to the test, so the ports are fixed.  Every server runs in the
foreground in its own session (process group) with its own directory for its configuration,
pid file and logs; :class:`Server` waits until it accepts connections and kills its group at
the end.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from netns import (
    BackendConnection,
    Deadline,
    Handler,
    NamespaceSockets,
    NetNamespace,
    Peer,
    run_ip,
)

CLIENT_V4 = "198.51.100.2"
SERVER_V4 = "198.51.100.1"
CLIENT_V6 = "2001:db8::2"
SERVER_V6 = "2001:db8::1"
BACKEND_PORT = 8080
MMPROXY_PORT = 25577
TAP_PORT = 25578  # a recording relay between HAProxy and mmproxy
# The name curl asks for in TLS (SNI), resolved to the server's address with --resolve.
TLS_NAME = "lb.example"
CLIENT_CN = "interop-client"

# Where Debian puts the servers; PATH of a root shell has them, other shells may not.
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def require(*names: str) -> dict[str, str]:
    """The full path of each program; missing ones fail the test in CI and skip it elsewhere."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    found = {name: shutil.which(name, path=search) for name in names}
    missing = sorted(name for name, path in found.items() if path is None)
    if missing:
        reason = (
            f"interop tests need {', '.join(missing)} (Debian packages: see README's install"
            " command: haproxy nginx libnginx-mod-stream curl openssl)"
        )
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return {name: path for name, path in found.items() if path is not None}


def program_output(argv: Sequence[str]) -> str:
    """What a short-lived program prints, stdout then stderr (nginx -V writes to stderr)."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
    return result.stdout + result.stderr


# ------------------------------------------------------------------------ namespaces


class ClientNamespace(NetNamespace):
    """A namespace with loopback up and nothing else: the client side needs no routes."""

    def create(self) -> None:
        run_ip("netns", "add", self.name)
        self._created = True
        self.ip("link", "set", "lo", "up")


@dataclass(frozen=True)
class Topology:
    client: ClientNamespace
    server: NetNamespace
    server_sockets: NamespaceSockets


@contextlib.contextmanager
def topology(tag: str) -> Iterator[Topology]:
    """The client and server namespaces joined by a veth pair; both deleted at the end."""
    server = NetNamespace(f"mmpx-srv-{tag}")
    client = ClientNamespace(f"mmpx-cli-{tag}")
    try:
        server.create()
        client.create()
        # Made inside the server namespace, so the names cannot clash with the host's links.
        server.ip("link", "add", "veth-srv", "type", "veth", "peer", "name", "veth-cli",
                  "netns", client.name)  # fmt: skip
        for ns, link, v4, v6 in (
            (server, "veth-srv", SERVER_V4, SERVER_V6),
            (client, "veth-cli", CLIENT_V4, CLIENT_V6),
        ):
            ns.ip("addr", "add", f"{v4}/24", "dev", link)
            ns.ip("-6", "addr", "add", f"{v6}/64", "dev", link, "nodad")
            ns.ip("link", "set", link, "up")
        sockets = NamespaceSockets(server)
        try:
            yield Topology(client, server, sockets)
        finally:
            sockets.close()
    finally:
        client.delete()  # deleting a namespace deletes its end of the veth pair, and the pair
        server.delete()


# --------------------------------------------------------------------------- servers


class Server:
    """One foreground server process inside a namespace, its output in ``DIRECTORY/NAME.out``.

    ``directory`` is the server's own (configuration, pid file, logs) and its working directory.
    """

    def __init__(
        self,
        name: str,
        ns: NetNamespace,
        argv: Sequence[str],
        directory: Path,
        logs: Sequence[Path] = (),
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.output = directory / f"{name}.out"
        self.logs = [self.output, *logs]
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", ns.name, *self.argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=directory,
                start_new_session=True,  # its own process group: teardown kills all of it
            )

    def describe(self) -> str:
        """The command line and every log it wrote, for assertion messages."""
        parts = [f"{self.name}: {' '.join(self.argv)} (exit code {self.proc.poll()})"]
        for path in self.logs:
            text = path.read_text(errors="replace") if path.exists() else "(not written)"
            parts.append(f"--- {path.name}\n{text[-4000:]}")
        return "\n".join(parts)

    def wait_ready(
        self, sockets: NamespaceSockets, addresses: Sequence[Peer], timeout: float = 15.0
    ) -> None:
        """Poll-connect to each address from inside the namespace until all of them accept."""
        deadline = Deadline(timeout)
        pending = list(addresses)
        while pending:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited at start-up\n{self.describe()}")
            if deadline.expired():
                raise AssertionError(f"{self.name} not listening on {pending}\n{self.describe()}")
            try:
                sockets.connect(pending[0], timeout=max(0.1, deadline.remaining())).close()
            except OSError:
                time.sleep(0.05)
            else:
                pending.pop(0)

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM the group, SIGKILL it if it lingers; the exit code (idempotent)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode


@contextlib.contextmanager
def running(
    name: str,
    ns: NetNamespace,
    argv: Sequence[str],
    directory: Path,
    sockets: NamespaceSockets,
    ready: Sequence[Peer],
    logs: Sequence[Path] = (),
) -> Iterator[Server]:
    """A :class:`Server` that listens on ``ready``, stopped when the block ends, even on error."""
    server = Server(name, ns, argv, directory, logs)
    try:
        server.wait_ready(sockets, ready)
        yield server
    finally:
        server.stop()


# ------------------------------------------------------------------- configurations


def make_certificate(openssl: str, directory: Path, name: str, common_name: str) -> Path:
    """A throwaway self-signed P-256 certificate; returns ``NAME.pem`` (certificate + key).

    ``NAME.crt`` and ``NAME.key`` are written too, for curl's ``--cert``/``--key``.
    """
    crt, key, pem = (directory / f"{name}.{ext}" for ext in ("crt", "key", "pem"))
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", f"/CN={common_name}",
         "-addext", f"subjectAltName=DNS:{common_name}",
         "-keyout", str(key), "-out", str(crt)],
        capture_output=True, check=True, timeout=30,
    )  # fmt: skip
    pem.write_bytes(crt.read_bytes() + key.read_bytes())
    return pem


def backend_nginx_conf(directory: Path) -> str:
    """The backend: nginx http, answering and logging the peer address it sees.

    Everything it writes goes under ``directory``: ``nginx.pid``, ``error.log``, ``access.log``
    and its temporary directories (made here), nothing under /var/lib/nginx.
    """
    temp = directory / "temp"
    temp.mkdir(exist_ok=True)
    temp_paths = "\n".join(
        f"    {kind}_temp_path {temp}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format peer '$remote_addr $remote_port $request_uri $status';
    access_log {directory}/access.log peer;
{temp_paths}
    server {{
        listen 127.0.0.1:{BACKEND_PORT};
        listen [::1]:{BACKEND_PORT};
        default_type text/plain;
        location / {{
            return 200 "backend saw $remote_addr $remote_port\\n";
        }}
    }}
}}
"""


def nginx_stream_conf(directory: Path, stream_module: str | None, port: int) -> str:
    """nginx as the load balancer: the stream module with ``proxy_protocol on``.

    It writes ``nginx.pid`` and ``error.log`` under ``directory``.
    """
    load = f"load_module {stream_module};\n" if stream_module else ""
    return f"""\
{load}worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{ worker_connections 256; }}
stream {{
    server {{
        listen {SERVER_V4}:{port};
        listen [{SERVER_V6}]:{port};
        proxy_pass 127.0.0.1:{MMPROXY_PORT};
        proxy_protocol on;
        proxy_connect_timeout 5s;
        proxy_timeout 30s;
    }}
}}
"""


def nginx_stream_module(nginx: str) -> str | None:
    """The ``load_module`` path when this nginx builds the stream module as a dynamic module.

    Debian's does (package libnginx-mod-stream); a static build needs no line.
    """
    flags = program_output([nginx, "-V"]).split()
    if "--with-stream=dynamic" not in flags:
        return None
    modules = next(
        (flag.split("=", 1)[1] for flag in flags if flag.startswith("--modules-path=")),
        "/usr/lib/nginx/modules",
    )
    return f"{modules}/ngx_stream_module.so"


@dataclass(frozen=True)
class HaproxyPorts:
    v1: int = 8001  # send-proxy
    v2: int = 8002  # send-proxy-v2
    ssl_cn: int = 8443  # TLS, send-proxy-v2-ssl-cn
    tlvs: int = 8444  # TLS, send-proxy-v2 with proxy-v2-options


def haproxy_cfg(server_pem: Path, client_ca: Path, ports: HaproxyPorts) -> str:
    """HAProxy in TCP mode, one frontend per way of sending the PROXY header.

    The TLS frontends terminate TLS with a throwaway certificate and ask for a client
    certificate (optional), so that the SSL TLV has a common name to carry.  Every backend
    goes through the recording tap (a byte-for-byte relay to mmproxy), so a test can read the
    header mmproxy received.
    """
    tls = f"ssl crt {server_pem} ca-file {client_ca} verify optional alpn http/1.1"
    tap = f"127.0.0.1:{TAP_PORT}"
    options = "ssl,cert-cn,ssl-cipher,cert-sig,cert-key,authority,crc32c,unique-id"
    return f"""\
global
    log stdout format raw local0 info
    maxconn 256

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend v1
    bind {SERVER_V4}:{ports.v1}
    bind [{SERVER_V6}]:{ports.v1}
    default_backend v1
backend v1
    server mmproxy {tap} send-proxy

frontend v2
    bind {SERVER_V4}:{ports.v2}
    bind [{SERVER_V6}]:{ports.v2}
    default_backend v2
backend v2
    server mmproxy {tap} send-proxy-v2

frontend ssl_cn
    bind {SERVER_V4}:{ports.ssl_cn} {tls}
    default_backend ssl_cn
backend ssl_cn
    server mmproxy {tap} send-proxy-v2-ssl-cn

frontend tlvs
    bind {SERVER_V4}:{ports.tlvs} {tls}
    unique-id-format %{{+X}}o%ci:%cp_%fi:%fp_%Ts_%rt:%pid
    default_backend tlvs
backend tlvs
    server mmproxy {tap} send-proxy-v2 proxy-v2-options {options}
"""


def tap_to(sockets: NamespaceSockets, target: Peer) -> Handler:
    """A :class:`~netns.Backend` handler that relays each connection on to ``target``.

    Put between a load balancer and mmproxy, the backend's ``head`` of each connection is the
    PROXY header exactly as mmproxy received it.
    """

    def handler(conn: BackendConnection) -> None:
        with sockets.connect(target) as upstream:
            _pump(conn, upstream)

    return handler


def _pump(conn: BackendConnection, upstream: socket.socket) -> None:
    """Copy both ways until both sides have half-closed (bounded by the connection deadline)."""
    with selectors.DefaultSelector() as selector:
        selector.register(conn.sock, selectors.EVENT_READ, "down")
        selector.register(upstream, selectors.EVENT_READ, "up")
        while selector.get_map() and not conn.deadline.expired():
            for key, _ in selector.select(min(0.5, conn.deadline.remaining())):
                if key.data == "down":
                    data = conn.recv()
                    if data:
                        upstream.settimeout(max(0.01, conn.deadline.remaining()))
                        upstream.sendall(data)
                    else:
                        upstream.shutdown(socket.SHUT_WR)
                        selector.unregister(conn.sock)
                else:
                    upstream.settimeout(max(0.01, conn.deadline.remaining()))
                    data = upstream.recv(65536)
                    if data:
                        conn.send(data)
                    else:
                        conn.shut_wr()
                        selector.unregister(upstream)


# -------------------------------------------------------------------------- clients


@dataclass(frozen=True)
class Fetched:
    """What curl reported: the status, the body, and the address:port it connected from."""

    status: int
    body: str
    local: Peer
    output: str  # everything curl printed, for messages


WRITE_OUT = "\n%{http_code} %{local_ip} %{local_port}"


def curl(client: NetNamespace, curl_path: str, url: str, *options: str) -> Fetched:
    """GET ``url`` with curl from inside ``client``; bounded by curl's and our own timeouts."""
    argv = ["ip", "netns", "exec", client.name, curl_path, "-sS", "--max-time", "15",
            "--connect-timeout", "5", "-w", WRITE_OUT, *options, url]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    output = f"$ {' '.join(argv)}\nexit {result.returncode}\n{result.stdout}\n{result.stderr}"
    if result.returncode != 0:
        raise AssertionError(f"curl failed\n{output}")
    body, _, tail = result.stdout.rpartition("\n")  # the body, then WRITE_OUT's line
    status, local_ip, local_port = tail.split()
    return Fetched(int(status), body, (local_ip, int(local_port)), output)


def wait_for_line(path: Path, wanted: str, timeout: float = 10.0) -> list[str]:
    """The lines of ``path`` once one equals ``wanted`` (nginx writes its log after replying)."""
    deadline = Deadline(timeout)
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if wanted in lines or deadline.expired():
            return lines
        time.sleep(0.05)
