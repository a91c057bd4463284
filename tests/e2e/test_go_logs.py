"""go-mmproxy's log messages and fields, event by event, end to end.

Pipelines written for go-mmproxy match on ``msg`` and read its fields.  Each test here makes
one event happen for real (in the test namespace) and checks that mmproxy logged go-mmproxy's
message for it, at go-mmproxy's verbosity, with go-mmproxy's fields: every per-connection
record carries ``remoteAddr``, ``localAddr``, ``listenerNum``, ``protocol`` and ``listenAdr``,
as go-mmproxy's do.  The messages are written out here as literals, copied from go-mmproxy's
source (path-network/go-mmproxy tcp.go, udp.go, main.go), not taken from mmproxy's constants,
so that a change on mmproxy's side cannot pass unnoticed.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import test_udp
from daemon_runner import Daemon, LogLine, StartDaemon, run_to_exit
from netns import (
    Backend,
    ClientAddresses,
    Deadline,
    Net,
    exchange,
    reset_after_first_read,
    wait_closed,
)
from test_tcp import connect, header, send_allowing_reset
from test_udp import UdpRig, dgram_header, show

from mmproxy.protocol import InetAddress, ProxyHeader, Transport, encode
from mmproxy.tlv import (
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_SSL,
    PP2_SUBTYPE_SSL_CN,
    PP2_SUBTYPE_SSL_VERSION,
    Alpn,
    Authority,
    Ssl,
    SslString,
    UniqueId,
)

# go-mmproxy's per-connection fields (listenAdr, protocol and listenerNum come from the
# listener's logger, remoteAddr and localAddr from the connection's).
CONNECTION_FIELDS = ("remoteAddr", "localAddr", "listenerNum", "protocol", "listenAdr")
# A UDP flow's: the balancer is downstreamAddr there (mmproxy also writes remoteAddr).
UDP_FLOW_FIELDS = (
    "downstreamAddr",
    "clientAddr",
    "targetAddr",
    "listenerNum",
    "protocol",
    "listenAdr",
)

rig = test_udp.rig  # the UDP tests' fixture, shared


def records(daemon: Daemon, msg: str, count: int = 1, timeout: float = 5.0) -> list[LogLine]:
    found = daemon.wait_for(lambda line: line.get("msg") == msg, count, timeout)
    assert len(found) >= count, f"no {msg!r}\n{daemon.describe()}"
    return found


def assert_connection_fields(daemon: Daemon, line: LogLine, protocol: str = "tcp") -> None:
    fields = CONNECTION_FIELDS if protocol == "tcp" else UDP_FLOW_FIELDS
    missing = [name for name in fields if name not in line]
    assert not missing, (missing, line)
    assert line["level"] == "DEBUG", line
    assert line["protocol"] == protocol
    assert line["listenAdr"] == f"{daemon.host}:{daemon.port}"
    if protocol == "tcp":
        assert line["localAddr"] == f"{daemon.host}:{daemon.port}"


def messages(daemon: Daemon) -> list[str]:
    return [str(line.get("msg")) for line in list(daemon.logs)]


# ------------------------------------------------------------------------- TCP, -v 2


def test_a_relayed_connection_logs_each_state_change(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """The states of a good connection, in go-mmproxy's order, with its fields."""
    daemon = mmproxy(verbose=2)
    source = addresses.v4()
    with connect(net, daemon) as sock:
        sock.sendall(header(source, ("203.0.113.1", 443), 1) + b"hello")
        assert exchange(sock, b"", Deadline(10)) == b"hello"
    (closing,) = records(daemon, "connection closing")
    expected = [
        "new connection",
        "successfully parsed PROXY header",
        "successfully established upstream connection",
        "successfully set NoDelay on downstream connection",
        "successfully set NoDelay on upstream connection",
        "connection closing",
    ]
    per_connection = [line for line in daemon.logs if line.get("msg") in expected]
    assert [line["msg"] for line in per_connection] == expected, daemon.describe()
    for line in per_connection:
        assert_connection_fields(daemon, line)
        assert "dropConnection" not in line
    client, target = f"{source[0]}:{source[1]}", backend4.target()
    for line in per_connection[1:]:  # go-mmproxy adds them once the header is parsed
        assert (line["clientAddr"], line["targetAddr"]) == (client, target), line
    # mmproxy's own outcome rides on go-mmproxy's message as added fields.
    assert (closing["bytesToTarget"], closing["bytesToClient"]) == (5, 5)


def test_header_without_addresses_logs_unknown_client(
    net: Net, mmproxy: StartDaemon, backend4: Backend
) -> None:
    daemon = mmproxy(verbose=2)
    with connect(net, daemon) as sock:
        sock.sendall(b"PROXY UNKNOWN\r\nping")
        assert exchange(sock, b"", Deadline(10)) == b"ping"
    (parsed,) = records(daemon, "successfully parsed PROXY header")
    assert parsed["clientAddr"] == "UNKNOWN"
    assert parsed["targetAddr"] == backend4.target()
    (closing,) = records(daemon, "connection closing")
    assert closing["clientAddr"] == "UNKNOWN"


def test_tlvs_are_logged_with_stable_names_and_bounded(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """At -v 2 the parsed-header record names the TLVs an operator looks for; none can make
    the line grow without bound (a 1,000-character AUTHORITY is cut to 256)."""
    daemon = mmproxy(verbose=2)
    source = addresses.v4()
    unique = os.urandom(64)
    ssl = Ssl(
        PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN,
        0,
        (SslString(PP2_SUBTYPE_SSL_VERSION, "TLSv1.3"), SslString(PP2_SUBTYPE_SSL_CN, "client1")),
    )
    long_host = "a" * 1000
    wire = encode(
        ProxyHeader.proxy(
            InetAddress.of(*source),
            InetAddress.of("203.0.113.1", 443),
            tlvs=(Alpn(b"h2"), Authority(long_host), UniqueId(unique), ssl),
        )
    )
    with connect(net, daemon) as sock:
        sock.sendall(wire + b"x")
        assert exchange(sock, b"", Deadline(10)) == b"x"
    (parsed,) = records(daemon, "successfully parsed PROXY header")
    assert parsed["tlvAlpn"] == "h2"
    assert parsed["tlvUniqueId"] == unique.hex()
    assert parsed["tlvSsl"] is True
    assert parsed["tlvSslVerified"] is True
    assert parsed["tlvSslVersion"] == "TLSv1.3"
    assert parsed["tlvSslCn"] == "client1"
    authority = parsed["tlvAuthority"]
    assert len(authority) == 256
    assert authority.startswith("aaa")
    assert authority.endswith("...")


# ------------------------------------------------------------------- TCP failures, -v 1


def test_origin_not_in_allowed_subnets(
    net: Net, mmproxy: StartDaemon, addresses: ClientAddresses, tmp_path: Path
) -> None:
    subnets = tmp_path / "allowed.txt"
    subnets.write_text("127.0.0.1/32\n")
    daemon = mmproxy("-allowed-subnets", str(subnets), verbose=1)
    sock = net.sockets.new_socket()
    with sock:
        sock.bind(("127.0.0.2", 0))
        sock.settimeout(10)
        sock.connect((daemon.host, daemon.port))
        send_allowing_reset(sock, header(addresses.v4(), ("203.0.113.1", 443), 1))
        wait_closed(sock, 5)
    (line,) = records(daemon, "connection origin not in allowed subnets")
    assert_connection_fields(daemon, line)
    assert line["remoteAddr"].startswith("127.0.0.2:")
    assert line["dropConnection"] is True
    assert line["reason"] == "not_allowed"  # mmproxy's own code, added
    (subnet,) = records(daemon, "allowed subnet")  # go-mmproxy's start-up line per entry
    assert (subnet["level"], subnet["subnet"]) == ("INFO", "127.0.0.1/32")


@pytest.mark.parametrize(
    ("wire", "msg", "reason"),
    [
        pytest.param(b"GET / HTTP/1.0\r\n\r\n", "failed to parse PROXY header", None, id="parse"),
        pytest.param(b"", "failed to read PROXY header", "incomplete", id="read-eof"),
    ],
)
def test_header_failures(
    net: Net, mmproxy: StartDaemon, wire: bytes, msg: str, reason: str | None
) -> None:
    """A header that is not one is a parse failure; a peer that leaves before sending a byte
    is a failed read, as in go-mmproxy."""
    daemon = mmproxy(verbose=1)
    with connect(net, daemon) as sock:
        send_allowing_reset(sock, wire)
        sock.shutdown(socket.SHUT_WR)
        wait_closed(sock, 5)
    (line,) = records(daemon, msg)
    assert_connection_fields(daemon, line)
    assert line["dropConnection"] is True
    assert line["error"]
    if reason:
        assert line["reason"] == reason


def test_header_timeout_is_a_failed_read(net: Net, mmproxy: StartDaemon) -> None:
    daemon = mmproxy(verbose=1, header_timeout=0.5)
    with connect(net, daemon) as sock:
        wait_closed(sock, 5)
    (line,) = records(daemon, "failed to read PROXY header")
    assert line["reason"] == "header_timeout"
    assert line["dropConnection"] is True


def test_upstream_connection_failure(
    net: Net, mmproxy: StartDaemon, addresses: ClientAddresses, closed_port: int
) -> None:
    daemon = mmproxy(target4=f"127.0.0.1:{closed_port}", verbose=1)
    source = addresses.v4()
    with connect(net, daemon) as sock:
        send_allowing_reset(sock, header(source, ("203.0.113.1", 443), 1))
        wait_closed(sock, 10)
    (line,) = records(daemon, "failed to establish upstream connection")
    assert_connection_fields(daemon, line)
    assert line["dropConnection"] is True
    assert "refused" in line["error"].lower()
    assert line["reason"] == "upstream_failed"


def test_connection_broken(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:

    daemon = mmproxy(verbose=1)
    backend4.handler = reset_after_first_read
    with connect(net, daemon) as sock:
        sock.sendall(header(addresses.v4(), ("203.0.113.1", 443), 1) + b"anyone?")
        wait_closed(sock, 5)
    (line,) = records(daemon, "connection broken")
    assert_connection_fields(daemon, line)
    assert line["dropConnection"] is True
    assert line["error"]
    assert "bytesToTarget" in line


def test_verbosity_1_logs_failures_but_no_state_changes(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """go-mmproxy's -v 1: errors of individual connections, no state changes."""
    daemon = mmproxy(verbose=1)
    with connect(net, daemon) as sock:
        sock.sendall(header(addresses.v4(), ("203.0.113.1", 443), 1) + b"fine")
        assert exchange(sock, b"", Deadline(10)) == b"fine"
    with connect(net, daemon) as sock:
        send_allowing_reset(sock, b"nonsense\r\n")
        wait_closed(sock, 5)
    records(daemon, "failed to parse PROXY header")
    assert backend4.wait_done()
    said = messages(daemon)
    for state in ("new connection", "successfully parsed PROXY header", "connection closing"):
        assert state not in said, daemon.describe()


def test_verbosity_0_logs_no_connection(net: Net, mmproxy: StartDaemon) -> None:
    daemon = mmproxy(verbose=0)
    with connect(net, daemon) as sock:
        send_allowing_reset(sock, b"nonsense\r\n")
        wait_closed(sock, 5)
    assert daemon.stop(timeout=10) == 0
    assert "failed to parse PROXY header" not in messages(daemon)
    assert not [line for line in daemon.logs if line.get("level") == "DEBUG"]


# ------------------------------------------------------------------------ start-up


def test_listening_and_failed_to_bind(net: Net, mmproxy: StartDaemon) -> None:
    """``listening`` per socket (INFO, with go-mmproxy's listener fields); a taken port is
    ``failed to bind listener`` (ERROR), and start-up stops with exit code 1."""
    daemon = mmproxy(verbose=0)
    (listening,) = daemon.listening
    assert listening["level"] == "INFO"
    assert (listening["listenerNum"], listening["protocol"]) == (0, "tcp")
    assert listening["listenAdr"] == f"{daemon.host}:{daemon.port}"
    taken = f"{daemon.host}:{daemon.port}"
    refused = run_to_exit(net.ns, "-l", taken)
    assert refused.returncode == 1, refused
    assert "Traceback" not in refused.stderr
    lines = [json.loads(line) for line in refused.stdout.splitlines()]
    (failed,) = [line for line in lines if line["level"] == "ERROR"]
    assert failed["msg"] == "failed to bind listener"
    assert failed["listenAdr"] == taken
    assert "in use" in failed["error"]


# ------------------------------------------------------------------------------ UDP


def test_udp_new_connection(rig: UdpRig) -> None:
    """go-mmproxy's UDP ``new connection``, with its ``downstreamAddr`` (the balancer)."""
    daemon = rig.start(verbose=2)
    balancer = rig.balancer(daemon)
    client = rig.addresses.v4()
    balancer.send(dgram_header(client) + b"hi")
    assert balancer.recv() == show(client).encode() + b"|hi"
    (line,) = records(daemon, "new connection")
    assert_connection_fields(daemon, line, protocol="udp")
    balancer_address = show(balancer.sock.getsockname())
    assert line["downstreamAddr"] == balancer_address
    assert line["remoteAddr"] == balancer_address
    assert line["clientAddr"] == show(client)
    assert line["targetAddr"] == rig.udp4.target()


def test_udp_refusals(rig: UdpRig, tmp_path: Path) -> None:
    allowed = tmp_path / "allowed.txt"
    allowed.write_text("127.0.0.1/32\n")
    daemon = rig.start("-allowed-subnets", str(allowed), verbose=1)
    outsider, insider = rig.balancer(daemon, "127.0.0.2"), rig.balancer(daemon, "127.0.0.1")
    outsider.send(dgram_header(rig.addresses.v4()) + b"no")
    insider.send(b"not a header")
    (refused,) = records(daemon, "packet origin not in allowed subnets")
    assert refused["remoteAddr"].startswith("127.0.0.2:")
    assert (refused["protocol"], refused["listenAdr"]) == ("udp", f"{daemon.host}:{daemon.port}")
    (bad,) = records(daemon, "failed to parse PROXY header")
    assert bad["remoteAddr"] == show(insider.sock.getsockname())
    assert bad["error"]


def _loopback_subnets(tmp_path: Path) -> str:
    """-dynamic-destination needs -allowed-subnets (README: Security); the tests' balancers
    connect from loopback."""
    subnets = tmp_path / "subnets"
    subnets.write_text("127.0.0.0/8\n")
    return str(subnets)


def test_unusable_destination_is_an_upstream_failure(
    net: Net, mmproxy: StartDaemon, addresses: ClientAddresses, tmp_path: Path
) -> None:
    """-dynamic-destination with port 0 in the header: go-mmproxy would dial it and fail."""
    daemon = mmproxy(
        "-dynamic-destination", "-allowed-subnets", _loopback_subnets(tmp_path), verbose=1
    )
    with connect(net, daemon) as sock:
        send_allowing_reset(sock, header(addresses.v4(), ("127.0.0.1", 0), 2))
        wait_closed(sock, 5)
    (line,) = records(daemon, "failed to establish upstream connection")
    assert line["reason"] == "bad_destination"
    assert line["targetAddr"] == "127.0.0.1:0"


def test_udp_unusable_destination_is_a_failed_connect(rig: UdpRig, tmp_path: Path) -> None:
    subnets = _loopback_subnets(tmp_path)
    daemon = rig.start("-dynamic-destination", "-allowed-subnets", subnets, verbose=1)
    balancer = rig.balancer(daemon)
    balancer.send(dgram_header(rig.addresses.v4(), ("127.0.0.1", 0)) + b"nowhere")
    (line,) = records(daemon, "failed to connect to upstream")
    assert (line["reason"], line["dropDatagram"]) == ("bad_destination", True)
    assert line["protocol"] == "udp"


def test_udp_header_on_tcp_is_a_parse_failure(
    net: Net, mmproxy: StartDaemon, addresses: ClientAddresses
) -> None:
    """A DGRAM header on the TCP listener: go-mmproxy's parser refuses it, so the records say
    the header failed to parse, never that it was parsed."""
    daemon = mmproxy(verbose=2)
    wire = encode(
        ProxyHeader.proxy(
            InetAddress.of(*addresses.v4()),
            InetAddress.of("203.0.113.1", 53),
            transport=Transport.DGRAM,
        )
    )
    with connect(net, daemon) as sock:
        send_allowing_reset(sock, wire + b"x")
        wait_closed(sock, 5)
    (line,) = records(daemon, "failed to parse PROXY header")
    assert line["reason"] == "wrong_transport"
    assert "successfully parsed PROXY header" not in messages(daemon)
