"""mmproxy behind the real load balancers, from Debian's packages: HAProxy and nginx.

curl, in a client namespace of its own, fetches a page through HAProxy (``send-proxy``,
``send-proxy-v2``, and over TLS ``send-proxy-v2-ssl-cn`` and ``proxy-v2-options`` with TLVs),
through nginx's stream module (``proxy_protocol on``), or straight from mmproxy with
``curl --haproxy-protocol``.  The backend is nginx http, which answers and logs the peer
address it sees: that must be the client namespace's address and curl's own port.  The
topology is drawn in :mod:`interop`.

One set of servers serves the whole module (starting them costs a second or two each); every
request has its own path, so each test reads only its own lines from the logs.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemon_runner import DRAIN_TIMEOUT, HEADER_TIMEOUT, RELAYS, Daemon
from interop import (
    BACKEND_PORT,
    CLIENT_CN,
    CLIENT_V4,
    CLIENT_V6,
    MMPROXY_PORT,
    SERVER_V4,
    SERVER_V6,
    TAP_PORT,
    TLS_NAME,
    Fetched,
    HaproxyPorts,
    Server,
    Topology,
    backend_nginx_conf,
    curl,
    haproxy_cfg,
    make_certificate,
    nginx_stream_conf,
    nginx_stream_module,
    require,
    running,
    tap_to,
    topology,
    wait_for_line,
)
from netns import Backend

from mmproxy.header import host_port
from mmproxy.protocol import InetAddress, Parsed, ProxyHeader, parse
from mmproxy.tlv import (
    PP2_SUBTYPE_SSL_CIPHER,
    PP2_SUBTYPE_SSL_CN,
    PP2_SUBTYPE_SSL_KEY_ALG,
    PP2_SUBTYPE_SSL_SIG_ALG,
    PP2_SUBTYPE_SSL_VERSION,
    Alpn,
    Authority,
    Crc32c,
    Ssl,
    UniqueId,
)

HAPROXY = HaproxyPorts()
NGINX_STREAM_PORT = 8005
_request_ids = itertools.count(1)


@dataclass(frozen=True)
class Stack:
    """What every interop test shares: the namespaces, the backend, mmproxy and the tap."""

    topo: Topology
    workdir: Path  # one directory per server under it
    tools: dict[str, str]
    backend: Server
    mmproxy: Daemon
    tap: Backend

    @property
    def access_log(self) -> Path:
        return self.workdir / "backend" / "access.log"


def server_directory(workdir: Path, name: str) -> Path:
    directory = workdir / name
    directory.mkdir()
    return directory


@pytest.fixture(scope="module", params=RELAYS)
def stack(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    """The whole stack, once per relay (``--relay``): every interop test runs on both."""
    tools = require("haproxy", "nginx", "curl", "openssl")
    workdir = tmp_path_factory.mktemp("interop")
    with topology(str(os.getpid())) as topo:
        directory = server_directory(workdir, "backend")
        conf = directory / "nginx.conf"
        conf.write_text(backend_nginx_conf(directory))
        error_log = directory / "error.log"
        with running(
            "backend-nginx",
            topo.server,
            [tools["nginx"], "-e", str(error_log), "-c", str(conf), "-g", "daemon off;"],
            directory,
            topo.server_sockets,
            ready=[("127.0.0.1", BACKEND_PORT), ("::1", BACKEND_PORT)],
            logs=[error_log],
        ) as backend:
            allowed = server_directory(workdir, "mmproxy") / "allowed-subnets.txt"
            # The balancers connect from loopback; curl --haproxy-protocol from the client.
            allowed.write_text(f"127.0.0.0/8\n{CLIENT_V4}\n{CLIENT_V6}\n")
            daemon = Daemon(
                topo.server,
                [
                    *("-l", f"[::]:{MMPROXY_PORT}"),
                    *("-4", f"127.0.0.1:{BACKEND_PORT}"),
                    *("-6", f"[::1]:{BACKEND_PORT}"),
                    *("-allowed-subnets", str(allowed)),
                    *("-v", "2"),
                    *("--header-timeout", str(HEADER_TIMEOUT)),
                    *("--drain-timeout", str(DRAIN_TIMEOUT)),
                    *("--log-format", "json"),
                    *("--relay", request.param),
                ],
            )
            try:
                target = ("127.0.0.1", MMPROXY_PORT)
                tap = Backend(
                    topo.server_sockets, "127.0.0.1", TAP_PORT, tap_to(topo.server_sockets, target)
                )
                try:
                    yield Stack(topo, workdir, tools, backend, daemon, tap)
                finally:
                    tap.close()
            finally:
                alive = daemon.proc.poll() is None
                code = daemon.stop(timeout=DRAIN_TIMEOUT + 5)
                errors = [line for line in daemon.logs if line.get("level") == "ERROR"]
                assert alive, f"mmproxy exited during the tests\n{daemon.describe()}"
                assert code == 0, f"mmproxy exit code {code} after SIGTERM\n{daemon.describe()}"
                assert "Traceback" not in daemon.stderr, daemon.describe()
                assert not errors, f"mmproxy logged errors\n{daemon.describe()}"


@pytest.fixture(scope="module")
def haproxy(stack: Stack) -> Iterator[Server]:
    directory = server_directory(stack.workdir, "haproxy")
    openssl = stack.tools["openssl"]
    server_pem = make_certificate(openssl, directory, "server", TLS_NAME)
    client_pem = make_certificate(openssl, directory, "client", CLIENT_CN)
    cfg = directory / "haproxy.cfg"
    cfg.write_text(haproxy_cfg(server_pem, client_pem, HAPROXY))
    argv = [stack.tools["haproxy"], "-db", "-f", str(cfg), "-p", str(directory / "haproxy.pid")]
    ready = [
        *((SERVER_V4, port) for port in (HAPROXY.v1, HAPROXY.v2, HAPROXY.ssl_cn, HAPROXY.tlvs)),
        *((SERVER_V6, port) for port in (HAPROXY.v1, HAPROXY.v2)),
    ]
    sockets = stack.topo.server_sockets
    with running("haproxy", stack.topo.server, argv, directory, sockets, ready) as server:
        yield server


@pytest.fixture(scope="module")
def nginx_stream(stack: Stack) -> Iterator[Server]:
    directory = server_directory(stack.workdir, "nginx-stream")
    nginx = stack.tools["nginx"]
    conf = directory / "nginx.conf"
    conf.write_text(nginx_stream_conf(directory, nginx_stream_module(nginx), NGINX_STREAM_PORT))
    error_log = directory / "error.log"
    argv = [nginx, "-e", str(error_log), "-c", str(conf), "-g", "daemon off;"]
    ready = [(SERVER_V4, NGINX_STREAM_PORT), (SERVER_V6, NGINX_STREAM_PORT)]
    sockets = stack.topo.server_sockets
    logs = [error_log]
    with running(
        "nginx-stream", stack.topo.server, argv, directory, sockets, ready, logs
    ) as server:
        yield server


# ------------------------------------------------------------------------- helpers


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def new_path(case: str) -> str:
    """A request path no other request of the session uses."""
    return f"/{case}/{os.getpid()}-{next(_request_ids)}"


def assert_backend_saw_client(
    stack: Stack, fetched: Fetched, path: str, client: str, *servers: Server
) -> None:
    """The page came back, and the backend and mmproxy both saw curl's own address and port."""
    context = "\n\n".join([fetched.output, *(s.describe() for s in servers)])
    host, port = fetched.local
    assert host == client, f"curl connected from {host}, not {client}\n{context}"
    assert fetched.status == 200, context
    assert fetched.body == f"backend saw {client} {port}\n", context
    line = f"{client} {port} {path} 200"
    lines = wait_for_line(stack.access_log, line)
    assert line in lines, f"backend access log lacks {line!r}: {lines[-10:]}\n{context}"
    client_addr = host_port(client, port)
    daemon = stack.mmproxy
    established = daemon.wait_for(
        lambda log: (
            log.get("msg") == "successfully established upstream connection"
            and log.get("clientAddr") == client_addr
        )
    )
    assert established, f"mmproxy logged no connection from {client_addr}\n{daemon.describe()}"


def header_through_tap(stack: Stack, client: tuple[str, int]) -> ProxyHeader:
    """The PROXY header that reached mmproxy through the tap for this client address:port."""
    headers = []
    for conn in stack.tap.wait_done():
        result = parse(bytes(conn.head))  # raises if HAProxy sent something mmproxy rejects
        assert isinstance(result, Parsed), f"incomplete header: {bytes(conn.head)!r}"
        headers.append(result.header)
        source = result.header.client
        if source is not None and (str(source.host), source.port) == client:
            return result.header
    raise AssertionError(f"no header from {client} reached the tap: {headers}")


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("client", [CLIENT_V4, CLIENT_V6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize(
    ("option", "port"),
    [("send-proxy", HAPROXY.v1), ("send-proxy-v2", HAPROXY.v2)],
    ids=["send-proxy", "send-proxy-v2"],
)
def test_haproxy_plain(stack: Stack, haproxy: Server, option: str, port: int, client: str) -> None:
    server = SERVER_V4 if client == CLIENT_V4 else SERVER_V6
    path = new_path(f"haproxy-{option}")
    fetched = curl(
        stack.topo.client, stack.tools["curl"], f"http://{url_host(server)}:{port}{path}"
    )
    assert_backend_saw_client(stack, fetched, path, client, haproxy)
    header = header_through_tap(stack, fetched.local)
    assert header.version == (1 if option == "send-proxy" else 2), header
    assert header.destination == InetAddress.of(server, port), header


def fetch_tls(stack: Stack, port: int, path: str) -> Fetched:
    """curl over TLS to HAProxy, with SNI and a client certificate (both self-signed)."""
    certificates = stack.workdir / "haproxy"
    return curl(
        stack.topo.client,
        stack.tools["curl"],
        f"https://{TLS_NAME}:{port}{path}",
        *("--insecure", "--resolve", f"{TLS_NAME}:{port}:{SERVER_V4}", "--http1.1"),
        *("--cert", str(certificates / "client.crt"), "--key", str(certificates / "client.key")),
    )


def test_haproxy_send_proxy_v2_ssl_cn(stack: Stack, haproxy: Server) -> None:
    """``send-proxy-v2-ssl-cn``: the SSL TLV carries the TLS version and the client's CN."""
    path = new_path("haproxy-ssl-cn")
    fetched = fetch_tls(stack, HAPROXY.ssl_cn, path)
    assert_backend_saw_client(stack, fetched, path, CLIENT_V4, haproxy)
    header = header_through_tap(stack, fetched.local)
    ssl = header.find(Ssl)
    assert ssl is not None, header
    assert ssl.client_used_tls, ssl
    assert ssl.certificate_verified, ssl
    assert (ssl.text(PP2_SUBTYPE_SSL_VERSION) or "").startswith("TLSv1."), ssl
    assert ssl.text(PP2_SUBTYPE_SSL_CN) == CLIENT_CN, ssl


def test_haproxy_proxy_v2_options_tlvs(stack: Stack, haproxy: Server) -> None:
    """``proxy-v2-options``: SSL with its sub-TLVs, AUTHORITY (SNI), UNIQUE_ID and a CRC32C."""
    path = new_path("haproxy-tlvs")
    fetched = fetch_tls(stack, HAPROXY.tlvs, path)
    assert_backend_saw_client(stack, fetched, path, CLIENT_V4, haproxy)
    header = header_through_tap(stack, fetched.local)
    ssl = header.find(Ssl)
    assert ssl is not None, header
    assert ssl.client_used_tls, ssl
    assert ssl.text(PP2_SUBTYPE_SSL_CN) == CLIENT_CN, ssl
    for subtype in (PP2_SUBTYPE_SSL_VERSION, PP2_SUBTYPE_SSL_CIPHER):
        assert ssl.text(subtype), (subtype, ssl)
    assert ssl.text(PP2_SUBTYPE_SSL_SIG_ALG) == "ecdsa-with-SHA256", ssl  # OpenSSL's name
    assert ssl.text(PP2_SUBTYPE_SSL_KEY_ALG) == "EC256", ssl
    assert header.find(Authority) == Authority(TLS_NAME), header
    assert header.find(Crc32c) is not None, header  # parse() checked the sum
    unique = header.find(UniqueId)
    assert unique is not None, header
    assert unique.unique_id, header
    assert header.find(Alpn) == Alpn(b"http/1.1"), header


@pytest.mark.parametrize("client", [CLIENT_V4, CLIENT_V6], ids=["ipv4", "ipv6"])
def test_nginx_stream_proxy_protocol(stack: Stack, nginx_stream: Server, client: str) -> None:
    server = SERVER_V4 if client == CLIENT_V4 else SERVER_V6
    path = new_path("nginx-stream")
    url = f"http://{url_host(server)}:{NGINX_STREAM_PORT}{path}"
    fetched = curl(stack.topo.client, stack.tools["curl"], url)
    assert_backend_saw_client(stack, fetched, path, client, nginx_stream)


@pytest.mark.parametrize("client", [CLIENT_V4, CLIENT_V6], ids=["ipv4", "ipv6"])
def test_curl_haproxy_protocol_directly(stack: Stack, client: str) -> None:
    """curl's ``--haproxy-protocol`` sends a v1 header with its own address, to mmproxy."""
    server = SERVER_V4 if client == CLIENT_V4 else SERVER_V6
    path = new_path("curl-haproxy-protocol")
    url = f"http://{url_host(server)}:{MMPROXY_PORT}{path}"
    fetched = curl(stack.topo.client, stack.tools["curl"], url, "--haproxy-protocol")
    assert_backend_saw_client(stack, fetched, path, client)
