"""Endpoints and the Config: parsing, validation and the summary."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from mmproxy.acl import AllowList
from mmproxy.config import Config, Endpoint, FlagError, build_config, parse_endpoint
from mmproxy.errors import ConfigError

V4, V6 = socket.AF_INET, socket.AF_INET6

GO_DEFAULTS: dict[str, Any] = {
    "protocol": "tcp",
    "listen": "0.0.0.0:8443",
    "target4": "127.0.0.1:443",
    "target6": "[::1]:443",
    "allowed_subnets": None,
    "listeners": 1,
    "mark": 0,
    "verbose": 0,
    "close_after": 60,
    "dynamic_destination": False,
    "listen_transparent": False,
    "header_timeout": 10.0,
    "log_format": "json",
}


def config(**overrides: Any) -> Config:
    return build_config(**{**GO_DEFAULTS, **overrides})


@pytest.fixture
def no_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything reaches the resolver."""

    def refuse(*args: object, **kwargs: object) -> object:
        raise AssertionError(f"getaddrinfo called with {args}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# --- Endpoint ----------------------------------------------------------------


def test_endpoint_v4() -> None:
    endpoint = Endpoint(ipaddress.IPv4Address("127.0.0.1"), 443)
    assert str(endpoint) == "127.0.0.1:443"
    assert endpoint.family == socket.AF_INET
    assert endpoint.sockaddr == ("127.0.0.1", 443)


def test_endpoint_v6() -> None:
    endpoint = Endpoint(ipaddress.IPv6Address("::1"), 443)
    assert str(endpoint) == "[::1]:443"
    assert endpoint.family == socket.AF_INET6
    assert endpoint.sockaddr == ("::1", 443, 0, 0)


def test_endpoint_is_frozen() -> None:
    endpoint = Endpoint(ipaddress.IPv4Address("127.0.0.1"), 443)
    with pytest.raises(dataclasses.FrozenInstanceError):
        endpoint.port = 80  # type: ignore[misc]


def test_endpoint_family_and_sockaddr_are_made_once_and_not_compared() -> None:
    v4 = Endpoint(ipaddress.IPv4Address("192.0.2.1"), 80)
    assert v4.sockaddr is v4.sockaddr, "worked out when it was made, not per use"
    assert v4 == Endpoint(ipaddress.IPv4Address("192.0.2.1"), 80)
    assert hash(v4) == hash(Endpoint(ipaddress.IPv4Address("192.0.2.1"), 80))
    assert repr(v4) == "Endpoint(host=IPv4Address('192.0.2.1'), port=80)"
    assert dataclasses.replace(v4, port=81).sockaddr == ("192.0.2.1", 81)


def test_endpoint_sockaddr_is_usable(no_dns: None) -> None:
    endpoint = parse_endpoint("127.0.0.1:0", flag="-l", allow_port_zero=True)
    with socket.socket(endpoint.family, socket.SOCK_STREAM) as sock:
        sock.bind(endpoint.sockaddr)
        assert sock.getsockname()[0] == "127.0.0.1"


# --- parse_endpoint ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "family", "expected"),
    [
        ("127.0.0.1:443", None, "127.0.0.1:443"),
        ("192.0.2.10:25578", V4, "192.0.2.10:25578"),
        ("[::1]:443", None, "[::1]:443"),
        ("[2001:db8::10]:25578", V6, "[2001:db8::10]:25578"),
        ("[2001:DB8:0:0::10]:1", V6, "[2001:db8::10]:1"),
        ("127.0.0.1:65535", V4, "127.0.0.1:65535"),
        ("127.0.0.1:0443", V4, "127.0.0.1:443"),  # Go reads the port as decimal too
        ("0.0.0.0:25577", None, "0.0.0.0:25577"),
        (":8443", None, "[::]:8443"),  # Go's ":port": every address, dual stack
        (":443", V4, "0.0.0.0:443"),
        (":443", V6, "[::]:443"),
    ],
)
def test_parse_endpoint_literals(
    no_dns: None, text: str, family: int | None, expected: str
) -> None:
    assert str(parse_endpoint(text, flag="-x", family=family)) == expected


def test_port_zero_only_when_allowed(no_dns: None) -> None:
    assert parse_endpoint("127.0.0.1:0", flag="-l", allow_port_zero=True).port == 0
    with pytest.raises(FlagError, match=r'^-4: "127\.0\.0\.1:0" has port 0, outside 1-65535$'):
        parse_endpoint("127.0.0.1:0", flag="-4")


@pytest.mark.parametrize(
    ("text", "family", "message"),
    [
        ("[::1]:443", V4, '-x: "[::1]:443" is not an IPv4 address:port'),
        ("127.0.0.1:443", V6, '-x: "127.0.0.1:443" is not an IPv6 address:port'),
        # go-mmproxy checks To4() == nil, which also refuses IPv4-mapped addresses.
        ("[::ffff:127.0.0.1]:443", V6, '-x: "[::ffff:127.0.0.1]:443" is not an IPv6 address:port'),
        ("127.0.0.1", None, '-x: "127.0.0.1" has no port (expected host:port)'),
        ("127.0.0.1:", None, '-x: "127.0.0.1:" has an invalid port "" (expected a decimal number)'),
        ("127.0.0.1:65536", None, '-x: "127.0.0.1:65536" has port 65536, outside 1-65535'),
        ("127.0.0.1:-1", None, '-x: "127.0.0.1:-1" has an invalid port "-1"'),
        ("127.0.0.1:+1", None, '-x: "127.0.0.1:+1" has an invalid port "+1"'),
        ("127.0.0.1:https", None, '-x: "127.0.0.1:https" has an invalid port "https"'),
        ("127.0.0.1:123456", None, '-x: "127.0.0.1:123456" has an invalid port "123456"'),
        ("::1:443", None, "an IPv6 address needs brackets"),
        ("[::1]443", None, '-x: "[::1]443" is not an address:port (expected [IPv6]:port)'),
        ("[::1", V6, '-x: "[::1" is not an IPv6 address:port (expected [IPv6]:port)'),
        ("[127.0.0.1]:443", None, 'has "127.0.0.1" in brackets, which is not an IPv6 address'),
        ("[fe80::1%eth0]:443", V6, "zone ids are not supported"),
        ("1.2.3:443", None, 'has "1.2.3", which is neither an IP address nor a hostname'),
        ("01.2.3.4:443", None, "neither an IP address nor a hostname"),
        ("256.0.0.1:443", None, "neither an IP address nor a hostname"),
        ("127.1:443", None, "neither an IP address nor a hostname"),
        ("0x7f000001:443", None, 'has "0x7f000001", which is not a valid IPv4 address'),
        ("bad host:443", None, "neither an IP address nor a hostname"),
        ("-host:443", None, "neither an IP address nor a hostname"),
        ("", None, '-x: "" has no port'),
    ],
)
def test_parse_endpoint_errors(no_dns: None, text: str, family: int | None, message: str) -> None:
    with pytest.raises(FlagError) as caught:
        parse_endpoint(text, flag="-x", family=family)
    assert message in str(caught.value)
    assert str(caught.value).startswith("-x: ")
    assert caught.value.flag == "-x"
    assert isinstance(caught.value, ConfigError)


def test_parse_endpoint_rejects_unknown_family() -> None:
    with pytest.raises(ValueError, match="family"):
        parse_endpoint("127.0.0.1:1", flag="-x", family=socket.AF_UNIX)


def fake_resolver(
    monkeypatch: pytest.MonkeyPatch, answers: list[tuple[int, str]]
) -> list[tuple[object, ...]]:
    """Make getaddrinfo answer ``answers`` (family, address), filtered as the real one does."""
    calls: list[tuple[object, ...]] = []

    def getaddrinfo(host: str, port: int, family: int = 0, *rest: object) -> list[Any]:
        calls.append((host, port, family, *rest))
        infos = []
        for answer_family, address in answers:
            if family in (0, answer_family):
                sockaddr = (address, port) if answer_family == V4 else (address, port, 0, 0)
                infos.append((answer_family, socket.SOCK_STREAM, 6, "", sockaddr))
        if not infos:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return infos

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return calls


def test_hostname_is_resolved_once_for_the_wanted_family(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_resolver(monkeypatch, [(V6, "2001:db8::7"), (V4, "192.0.2.7")])
    assert str(parse_endpoint("backend.example:25578", flag="-4", family=V4)) == "192.0.2.7:25578"
    assert str(parse_endpoint("backend.example:25578", flag="-6", family=V6)) == (
        "[2001:db8::7]:25578"
    )
    # Without a family the resolver's first answer wins.
    assert str(parse_endpoint("backend.example:1", flag="-l")) == "[2001:db8::7]:1"
    assert [call[:3] for call in calls] == [
        ("backend.example", 25578, V4),
        ("backend.example", 25578, V6),
        ("backend.example", 1, socket.AF_UNSPEC),
    ]


def test_hostname_without_an_address_of_the_family(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_resolver(monkeypatch, [(V4, "192.0.2.7")])
    with pytest.raises(FlagError) as caught:
        parse_endpoint("v4only.example:443", flag="-6", family=V6)
    assert str(caught.value) == (
        '-6: "v4only.example:443" cannot be resolved: "v4only.example": Name or service not known'
    )


def test_real_localhost_resolves_to_loopback() -> None:
    endpoint = parse_endpoint("localhost:443", flag="-4", family=V4)
    assert endpoint.host.is_loopback
    assert endpoint.family == socket.AF_INET


# --- build_config ------------------------------------------------------------


def test_go_mmproxy_defaults() -> None:
    built = config()
    assert built.protocol == "tcp"
    assert str(built.listen) == "0.0.0.0:8443"
    assert str(built.target4) == "127.0.0.1:443"
    assert str(built.target6) == "[::1]:443"
    assert built.allow_list.allows_everyone
    assert (built.listeners, built.mark, built.verbose, built.close_after) == (1, 0, 0, 60)
    assert built.dynamic_destination is False
    assert built.listen_transparent is False
    assert built.header_timeout == 10.0
    assert built.log_format == "json"


def test_config_is_frozen_and_comparable() -> None:
    built = config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.verbose = 2  # type: ignore[misc]
    assert built == config()
    assert hash(built) == hash(config())
    assert built != config(verbose=1)


def test_empty_allowed_subnets_allows_everyone() -> None:
    assert config(allowed_subnets="").allow_list == AllowList.everyone()


def test_allowed_subnets_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "path-prefixes.txt"
    path.write_text("192.0.2.0/24\n2001:db8::/32\n")
    built = config(allowed_subnets=str(path))
    assert built.allow_list.path == str(path)
    assert built.allow_list.cidrs == ("192.0.2.0/24", "2001:db8::/32")


def test_allowed_subnets_errors_name_the_flag_and_the_line(tmp_path: Path) -> None:
    path = tmp_path / "allowed.txt"
    path.write_text("192.0.2.0/24\n10/8\n")
    with pytest.raises(FlagError) as caught:
        config(allowed_subnets=str(path))
    assert str(caught.value).startswith(f'-allowed-subnets: {path}:2: "10/8"')
    assert caught.value.flag == "-allowed-subnets"


def test_missing_allowed_subnets_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.txt"
    with pytest.raises(FlagError) as caught:
        config(allowed_subnets=str(path))
    assert str(caught.value) == f"-allowed-subnets: {path}: No such file or directory"


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        ({"protocol": "sctp"}, "-p"),
        ({"protocol": "TCP"}, "-p"),
        ({"protocol": ""}, "-p"),
        ({"listen": "nowhere"}, "-l"),
        ({"target4": "[::1]:443"}, "-4"),
        ({"target6": "127.0.0.1:443"}, "-6"),
        ({"listeners": 0}, "-listeners"),
        ({"listeners": 1025}, "-listeners"),
        ({"listeners": -1}, "-listeners"),
        ({"mark": -1}, "-mark"),
        ({"mark": 2**32}, "-mark"),
        ({"verbose": -1}, "-v"),
        ({"verbose": 3}, "-v"),
        ({"close_after": -1}, "-close-after"),
        ({"close_after": 2**31}, "-close-after"),
        ({"header_timeout": 0.0}, "--header-timeout"),
        ({"header_timeout": -1.0}, "--header-timeout"),
        ({"header_timeout": 3600.5}, "--header-timeout"),
        ({"header_timeout": float("nan")}, "--header-timeout"),
        ({"header_timeout": float("inf")}, "--header-timeout"),
        ({"log_format": "xml"}, "--log-format"),
        ({"connect_timeout": 0.0}, "--connect-timeout"),
        ({"connect_timeout": float("nan")}, "--connect-timeout"),
        ({"connect_timeout": 3600.5}, "--connect-timeout"),
        ({"drain_timeout": -0.5}, "--drain-timeout"),
        ({"drain_timeout": float("inf")}, "--drain-timeout"),
        ({"drain_timeout": 86400.5}, "--drain-timeout"),
        ({"idle_timeout": -1.0}, "--idle-timeout"),
        ({"idle_timeout": float("nan")}, "--idle-timeout"),
        ({"idle_timeout": 7 * 86400.0 + 1}, "--idle-timeout"),
        ({"log_format": "JSON"}, "--log-format"),
        ({"udp_header": "all"}, "--udp-header"),
        ({"udp_header": "First"}, "--udp-header"),
        ({"max_udp_flows": -1}, "--max-udp-flows"),
        ({"max_udp_flows": (1 << 20) + 1}, "--max-udp-flows"),
        ({"relay": "ebpf"}, "--relay"),
        ({"relay": "Sockmap"}, "--relay"),
    ],
)
def test_each_invalid_value_names_its_flag(overrides: dict[str, Any], flag: str) -> None:
    with pytest.raises(FlagError) as caught:
        config(**overrides)
    assert caught.value.flag == flag
    assert str(caught.value).startswith(f"{flag}: ")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "overrides",
    [
        {"protocol": "udp"},
        {"listeners": 1024},
        {"mark": 2**32 - 1},
        {"verbose": 2},
        {"close_after": 0},
        {"header_timeout": 0.001},
        {"header_timeout": 3600.0},
        {"log_format": "text"},
        {"connect_timeout": 0.001},
        {"drain_timeout": 0.0},
        {"drain_timeout": 86400.0},
        {"idle_timeout": 0.0},
        {"idle_timeout": 0.5},
        {"relay": "sockmap"},
        {"relay": "auto"},
        {"idle_timeout": 7 * 86400.0},
        {"listen": "127.0.0.1:0"},
        {"udp_header": "first"},
        {"max_connections": 0},
        {"max_connections": 1 << 24},
        {"max_udp_flows": 0},
        {"max_udp_flows": 1 << 20},
    ],
)
def test_boundary_values_are_accepted(overrides: dict[str, Any]) -> None:
    built = config(**overrides)
    for key, value in overrides.items():
        actual = getattr(built, key)
        assert (str(actual) if key == "listen" else actual) == value


def test_checks_follow_flag_order() -> None:
    # The first bad flag in go-mmproxy's order is the one reported.
    with pytest.raises(FlagError) as caught:
        config(protocol="x", listen="x", listeners=0)
    assert caught.value.flag == "-p"


def test_summary_is_json_serialisable(tmp_path: Path) -> None:
    path = tmp_path / "allowed.txt"
    path.write_text("192.0.2.0/24\n198.51.100.0/24\n")
    built = config(
        protocol="udp",
        listen="[::]:25577",
        allowed_subnets=str(path),
        mark=123,
        verbose=2,
        close_after=30,
        header_timeout=2.5,
        log_format="text",
        connect_timeout=1.5,
        drain_timeout=0.0,
        metrics="127.0.0.1:9100",
        no_routing_check=True,
        idle_timeout=600.0,
    )
    summary = json.loads(json.dumps(built.summary()))
    assert summary == {
        "protocol": "udp",
        "listen": "[::]:25577",
        "target4": "127.0.0.1:443",
        "target6": "[::1]:443",
        "allowedSubnets": str(path),
        "allowedSubnetsCount": 2,
        "listeners": 1,
        "mark": 123,
        "verbose": 2,
        "closeAfter": 30,
        "dynamicDestination": False,
        "listenTransparent": False,
        "headerTimeout": 2.5,
        "logFormat": "text",
        "connectTimeout": 1.5,
        "drainTimeout": 0.0,
        "udpHeader": "every",
        "maxUdpFlows": 0,
        "metrics": "127.0.0.1:9100",
        "routingCheck": False,
        "idleTimeout": 600.0,
        "relay": "splice",
        "allowedDestinations": None,
        "maxConnections": 0,
    }


def test_summary_when_everyone_is_allowed() -> None:
    summary = config().summary()
    assert summary["allowedSubnets"] is None
    assert summary["allowedSubnetsCount"] is None


def test_dynamic_destination_needs_allowed_subnets(tmp_path: Path) -> None:
    with pytest.raises(FlagError) as caught:
        config(dynamic_destination=True)
    assert caught.value.flag == "-dynamic-destination"
    assert "-allowed-subnets" in caught.value.reason
    subnets = tmp_path / "subnets"
    subnets.write_text("192.0.2.0/24\n")
    built = config(dynamic_destination=True, allowed_subnets=str(subnets))
    assert built.dynamic_destination is True
    assert built.allowed_destinations is None  # this host's own addresses


def test_allowed_destinations_is_read_and_checked(tmp_path: Path) -> None:
    subnets = tmp_path / "subnets"
    subnets.write_text("192.0.2.0/24\n")
    listed = tmp_path / "destinations"
    listed.write_text("10.0.0.0/8 # the backends\n")
    built = config(
        dynamic_destination=True, allowed_subnets=str(subnets), allowed_destinations=str(listed)
    )
    assert built.allowed_destinations is not None
    assert built.allowed_destinations.cidrs == ("10.0.0.0/8",)
    assert built.summary()["allowedDestinations"] == str(listed)
    with pytest.raises(FlagError) as caught:
        config(allowed_destinations=str(listed))
    assert caught.value.flag == "--allowed-destinations"
    listed.write_text("10.0.0.0/33\n")
    with pytest.raises(FlagError) as caught:
        config(
            dynamic_destination=True,
            allowed_subnets=str(subnets),
            allowed_destinations=str(listed),
        )
    assert f"{listed}:1" in str(caught.value)


def test_max_connections_out_of_range() -> None:
    with pytest.raises(FlagError) as caught:
        config(max_connections=-1)
    assert caught.value.flag == "--max-connections"
