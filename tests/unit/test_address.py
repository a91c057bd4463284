"""One address type and one host:port formatter, in go-mmproxy's form."""

from __future__ import annotations

import ipaddress

import pytest

from mmproxy.config import Endpoint, parse_endpoint
from mmproxy.header import InetAddress, host_port


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [
        ("192.0.2.1", 443, "192.0.2.1:443"),
        ("2001:db8::1", 443, "[2001:db8::1]:443"),
        ("::ffff:192.0.2.1", 0, "[::ffff:192.0.2.1]:0"),
        ("fe80::1%lo", 53, "[fe80::1%lo]:53"),  # a recvfrom sender with a scope id
    ],
)
def test_host_port_is_go_s_join_host_port(host: str, port: int, text: str) -> None:
    assert host_port(host, port) == text


@pytest.mark.parametrize("host", ["198.51.100.7", "2001:db8::7"])
def test_header_addresses_and_endpoints_are_one_type_written_one_way(host: str) -> None:
    parsed = ipaddress.ip_address(host)
    header = InetAddress(parsed, 8080)
    endpoint = parse_endpoint(str(header), flag="-l")
    assert isinstance(endpoint, InetAddress)
    assert isinstance(endpoint, Endpoint)
    assert (endpoint.host, endpoint.port) == (header.host, header.port)
    assert str(endpoint) == str(header) == host_port(host, 8080)
