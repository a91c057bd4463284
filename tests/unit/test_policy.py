"""The trust policy (mmproxy.policy): which sources a header may claim, where it may send us."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmproxy import metrics, policy
from mmproxy.acl import AllowList
from mmproxy.config import Config, Endpoint, build_config
from mmproxy.errors import Refusal, RefusedError
from mmproxy.protocol import InetAddress, ProxyHeader

PEER = ipaddress.ip_address("127.0.0.1")
LOOPBACK_TABLE = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def make_config(tmp_path: Path, *, dynamic: bool = False, **overrides: Any) -> Config:
    subnets = tmp_path / "subnets"
    subnets.write_text("127.0.0.0/8\n")
    values: dict[str, Any] = {
        "protocol": "tcp",
        "listen": "127.0.0.1:0",
        "target4": "127.0.0.1:443",
        "target6": "[::1]:443",
        "allowed_subnets": str(subnets),
        "listeners": 1,
        "mark": 0,
        "verbose": 0,
        "close_after": 60,
        "dynamic_destination": dynamic,
        "listen_transparent": False,
        "header_timeout": 1.0,
        "log_format": "json",
        **overrides,
    }
    return build_config(**values)


def proxy(source: tuple[str, int], destination: tuple[str, int]) -> ProxyHeader:
    if ":" in source[0] and ":" not in destination[0]:
        destination = (f"::ffff:{destination[0]}", destination[1])
    return ProxyHeader.proxy(InetAddress.of(*source), InetAddress.of(*destination))


class FakeTable:
    """A local table the test edits, read by LocalAddresses through ``load``."""

    def __init__(self, networks: list[Any]) -> None:
        self.networks = list(networks)
        self.reads = 0

    def load(self) -> list[Any]:
        self.reads += 1
        return list(self.networks)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def local(networks: list[Any] = LOOPBACK_TABLE) -> policy.LocalAddresses:
    return policy.LocalAddresses(FakeTable(networks).load, Clock())


# ------------------------------------------------------------------ sources

FORGED = [
    "127.0.0.1",
    "127.0.0.5",
    "127.255.255.254",
    "::1",
    "0.0.0.0",
    "0.1.2.3",
    "::",
    "224.0.0.1",
    "239.255.255.250",
    "ff02::1",
    "255.255.255.255",
    "::ffff:127.0.0.5",
    "::ffff:0.0.0.0",
    "::ffff:224.0.0.1",
    "::ffff:255.255.255.255",
]


@pytest.mark.parametrize("source", FORGED)
def test_sources_no_client_can_have_are_refused(tmp_path: Path, source: str) -> None:
    config = make_config(tmp_path)
    with pytest.raises(RefusedError) as caught:
        policy.decide(proxy((source, 1234), ("192.0.2.1", 443)), PEER, config, None)
    assert caught.value.reason == Refusal.BAD_SOURCE
    assert str(policy.plain_address(ipaddress.ip_address(source))) in caught.value.detail


@pytest.mark.parametrize(
    "source", ["198.51.100.7", "2001:db8::7", "::ffff:203.0.113.9", "10.1.2.3"]
)
def test_real_client_sources_pass_to_the_default_target(tmp_path: Path, source: str) -> None:
    config = make_config(tmp_path)
    route = policy.decide(proxy((source, 1234), ("192.0.2.1", 443)), PEER, config, None)
    host = policy.plain_address(ipaddress.ip_address(source))
    assert route.source == (host, 1234)
    assert route.target == (config.target4 if host.version == 4 else config.target6)


def test_local_headers_keep_the_peer_whatever_it_is(tmp_path: Path) -> None:
    """LOCAL carries no source: the balancer's own (loopback) address is not a forgery."""
    config = make_config(tmp_path)
    route = policy.decide(ProxyHeader.local(), PEER, config, None)
    assert route == policy.Route(None, config.target4)


ipv4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
ipv6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)


@given(st.one_of(ipv4, ipv6))
def test_a_source_is_refused_exactly_when_it_is_of_a_forbidden_kind(host: IPAddress) -> None:
    plain = policy.plain_address(host)
    forbidden = (
        plain.is_loopback
        or plain.is_unspecified
        or plain.is_multicast
        or plain == ipaddress.IPv4Address("255.255.255.255")
        or (plain.version == 4 and int(plain) >> 24 == 0)
    )
    assert (policy.unusable_source(plain) is not None) == forbidden


@given(ipv4)
def test_an_ipv4_source_and_its_mapped_form_get_the_same_answer(
    host: ipaddress.IPv4Address,
) -> None:
    mapped = ipaddress.IPv6Address(f"::ffff:{host}")
    assert policy.unusable_source(policy.plain_address(mapped)) == policy.unusable_source(host)


# ------------------------------------------------------------------ destinations


def test_without_the_file_only_this_hosts_addresses_are_destinations(tmp_path: Path) -> None:
    config = make_config(tmp_path, dynamic=True)
    destinations = policy.Destinations(None, local())
    client = ("198.51.100.7", 1)
    route = policy.decide(proxy(client, ("127.0.0.2", 8080)), PEER, config, destinations)
    assert route.target == Endpoint(ipaddress.ip_address("127.0.0.2"), 8080)
    for outside in ("169.254.169.254", "10.0.0.1", "192.0.2.1"):
        with pytest.raises(RefusedError) as caught:
            policy.decide(proxy(client, (outside, 80)), PEER, config, destinations)
        assert caught.value.reason == Refusal.BAD_DESTINATION
        assert "not an address of this host" in caught.value.detail


@pytest.mark.parametrize(
    ("destination", "why"),
    [
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("192.0.2.1", "not in --allowed-destinations"),
    ],
)
def test_the_file_replaces_the_local_rule_but_never_allows_the_unusable(
    tmp_path: Path, destination: str, why: str
) -> None:
    config = make_config(tmp_path, dynamic=True)
    everything = why != "not in --allowed-destinations"
    listed = AllowList.from_lines(["0.0.0.0/0" if everything else "10.0.0.0/8"], source="d")
    destinations = policy.Destinations(listed)
    with pytest.raises(RefusedError) as caught:
        policy.decide(proxy(("198.51.100.7", 1), (destination, 80)), PEER, config, destinations)
    assert caught.value.reason == Refusal.BAD_DESTINATION
    assert why in caught.value.detail


def test_a_listed_destination_need_not_be_local(tmp_path: Path) -> None:
    config = make_config(tmp_path, dynamic=True)
    destinations = policy.Destinations(AllowList.from_lines(["10.0.0.0/8"], source="d"))
    route = policy.decide(proxy(("198.51.100.7", 1), ("10.9.8.7", 80)), PEER, config, destinations)
    assert route.target == Endpoint(ipaddress.ip_address("10.9.8.7"), 80)


def test_port_zero_and_a_family_mismatch_are_bad_destinations(tmp_path: Path) -> None:
    config = make_config(tmp_path, dynamic=True)
    destinations = policy.Destinations(None, local())
    for source, destination in ((("198.51.100.7", 1), ("127.0.0.1", 0)),):
        with pytest.raises(RefusedError) as caught:
            policy.decide(proxy(source, destination), PEER, config, destinations)
        assert caught.value.reason == Refusal.BAD_DESTINATION
    header = ProxyHeader.proxy(InetAddress.of("198.51.100.7", 1), InetAddress.of("127.0.0.1", 80))
    mixed = ProxyHeader(**{**_fields(header), "destination": InetAddress.of("::1", 80)})
    with pytest.raises(RefusedError) as caught:
        policy.decide(mixed, PEER, config, destinations)
    assert "differ in family" in caught.value.detail


def _fields(header: ProxyHeader) -> dict[str, Any]:
    return {name: getattr(header, name) for name in header.__dataclass_fields__}


def test_without_dynamic_destination_the_header_destination_is_ignored(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    route = policy.decide(proxy(("198.51.100.7", 1), ("169.254.169.254", 80)), PEER, config, None)
    assert route.target == config.target4


def test_a_caller_without_destinations_fails_closed(tmp_path: Path) -> None:
    config = make_config(tmp_path, dynamic=True)
    with pytest.raises(RefusedError):
        policy.decide(proxy(("198.51.100.7", 1), ("127.0.0.1", 80)), PEER, config, None)


# ------------------------------------------------------------------ the local table


def test_local_addresses_follow_the_table_once_the_snapshot_is_old() -> None:
    table = FakeTable(LOOPBACK_TABLE)
    clock = Clock()
    addresses = policy.LocalAddresses(table.load, clock, max_age=1.0)
    new = ipaddress.ip_address("203.0.113.9")
    generation = addresses.generation
    assert new not in addresses
    table.networks.append(ipaddress.ip_network("203.0.113.9/32"))
    assert new not in addresses, "within max_age the snapshot stands (no read per lookup)"
    assert table.reads == 1
    clock.now += 1.0
    assert new in addresses
    assert addresses.generation == generation + 1
    table.networks.pop()
    clock.now += 1.0
    assert new not in addresses
    assert addresses.generation == generation + 2


def test_a_failed_read_keeps_the_last_snapshot() -> None:
    table = FakeTable(LOOPBACK_TABLE)
    clock = Clock()
    addresses = policy.LocalAddresses(table.load, clock, max_age=1.0)

    def broken() -> list[Any]:
        raise OSError("netlink is gone")

    addresses._load = broken
    clock.now += 5
    assert ipaddress.ip_address("127.0.0.1") in addresses
    assert ipaddress.ip_address("192.0.2.1") not in addresses


def test_the_real_local_table_holds_loopback() -> None:
    """Read over netlink from this namespace: 127.0.0.0/8 is always in the local table."""
    addresses = policy.LocalAddresses()
    assert ipaddress.ip_address("127.0.0.3") in addresses
    assert ipaddress.ip_address("192.0.2.1") not in addresses


def test_reload_changes_the_generation(tmp_path: Path) -> None:
    listed = tmp_path / "destinations"
    listed.write_text("10.0.0.0/8\n")
    destinations = policy.Destinations(AllowList.from_file(str(listed)))
    before = destinations.generation()
    assert destinations.why_not(ipaddress.ip_address("192.0.2.1")) is not None
    listed.write_text("192.0.2.0/24\n")
    destinations.reload()
    assert destinations.generation() != before
    assert destinations.why_not(ipaddress.ip_address("192.0.2.1")) is None


def test_every_policy_reason_is_a_declared_metric_label() -> None:
    assert set(policy.REASONS) <= set(metrics.HEADER_REASONS)
