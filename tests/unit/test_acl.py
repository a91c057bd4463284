"""The allowed-subnets list: file format, strictness, errors and membership."""

from __future__ import annotations

import ipaddress
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmproxy.acl import AllowList, AllowListHolder, parse_network
from mmproxy.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "allowed-subnets.txt") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def load(tmp_path: Path, text: str) -> AllowList:
    return AllowList.from_file(write(tmp_path, text))


# --- the file format ---------------------------------------------------------


def test_reads_mixed_families_comments_blank_lines_and_whitespace(tmp_path: Path) -> None:
    acl = load(
        tmp_path,
        "# load balancers\n"
        "\n"
        "   192.0.2.0/24   \n"
        "\t2001:db8::/32\t# trailing comment\n"
        "198.51.100.7\n"
        "2001:db8:ffff::1   \n"
        "   # indented comment\n",
    )
    assert acl.cidrs == (
        "192.0.2.0/24",
        "198.51.100.7/32",
        "2001:db8::/32",
    )  # 2001:db8:ffff::1 is inside 2001:db8::/32 and merges away
    assert acl.count == 3
    assert not acl.allows_everyone


def test_bare_addresses_are_single_hosts(tmp_path: Path) -> None:
    acl = load(tmp_path, "198.51.100.7\n2001:db8::1\n")
    assert acl.cidrs == ("198.51.100.7/32", "2001:db8::1/128")
    assert acl.allows("198.51.100.7")
    assert not acl.allows("198.51.100.8")
    assert acl.allows("2001:db8::1")
    assert not acl.allows("2001:db8::2")


def test_host_bits_are_accepted_and_cleared(tmp_path: Path) -> None:
    # go-mmproxy's files may say 192.0.2.7/24; they must keep working.
    acl = load(tmp_path, "192.0.2.7/24\n2001:db8::5/32\n")
    assert acl.cidrs == ("192.0.2.0/24", "2001:db8::/32")
    assert acl.allows("192.0.2.200")


def test_ipv4_mapped_entries_become_ipv4(tmp_path: Path) -> None:
    acl = load(tmp_path, "::ffff:192.0.2.0/120\n::ffff:198.51.100.9\n")
    assert acl.cidrs == ("192.0.2.0/24", "198.51.100.9/32")
    assert acl.allows("192.0.2.1")
    assert acl.allows("::ffff:192.0.2.1")


def test_adjacent_entries_are_merged(tmp_path: Path) -> None:
    acl = load(tmp_path, "192.0.2.0/25\n192.0.2.128/25\n")
    assert acl.cidrs == ("192.0.2.0/24",)
    assert acl.count == 1


def test_prefix_length_with_leading_zero_is_accepted(tmp_path: Path) -> None:
    # Go's ParseCIDR reads the prefix length with dtoi, which takes "08".
    assert load(tmp_path, "203.0.113.0/024\n").cidrs == ("203.0.113.0/24",)


def test_crlf_line_endings_and_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "windows.txt"
    path.write_bytes(b"\xef\xbb\xbf192.0.2.0/24\r\n2001:db8::/32\r\n")
    assert AllowList.from_file(str(path)).cidrs == ("192.0.2.0/24", "2001:db8::/32")


def test_path_is_kept(tmp_path: Path) -> None:
    path = write(tmp_path, "192.0.2.0/24\n")
    assert AllowList.from_file(path).path == path


# --- strictness and error messages -------------------------------------------


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("10/8", "Expected 4 octets"),
        ("1.2.3", "Expected 4 octets"),
        ("01.2.3.4", "Leading zeros"),
        ("256.0.0.1", "256"),
        ("1.2.3.4/33", "prefix length 33 is out of range for IPv4 (0-32)"),
        ("2001:db8::/129", "prefix length 129 is out of range for IPv6 (0-128)"),
        ("1.2.3.4/", "missing prefix length"),
        ("/8", "missing address"),
        ("1.2.3.4/255.255.255.0", "is not a decimal number"),
        ("1.2.3.4/-1", "is not a decimal number"),
        ("1.2.3.4/1234", "prefix length 1234 is out of range"),
        ("2001:db8::/0129", "prefix length 0129 is out of range"),
        ("fe80::1%eth0", "scoped addresses"),
        ("fe80::%eth0/64", "scoped addresses"),
        ("example.com", "hostnames are not allowed"),
        ("localhost", "hostnames are not allowed"),
        ("2001:db8::1::1", "At most one '::'"),
        ("::ffff:0:0/95", "/96 or longer"),
        ("\u0661.2.3.4", "hostnames are not allowed"),  # a non-ASCII digit
    ],
)
def test_bad_token_is_reported_with_file_line_and_token(
    tmp_path: Path, token: str, reason: str
) -> None:
    path = write(tmp_path, f"# header\n192.0.2.0/24\n{token}\n")
    with pytest.raises(ConfigError) as caught:
        AllowList.from_file(path)
    message = str(caught.value)
    assert message.startswith(f'{path}:3: "{token}"')
    assert reason in message
    assert "\n" not in message


def test_two_tokens_on_a_line_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "192.0.2.0/24 198.51.100.0/24\n")
    with pytest.raises(ConfigError, match="one address or CIDR per line") as caught:
        AllowList.from_file(path)
    assert str(caught.value).startswith(f"{path}:1: ")
    assert '"192.0.2.0/24" "198.51.100.0/24"' in str(caught.value)


def test_comma_separated_entries_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "192.0.2.0/24,198.51.100.0/24\n")
    with pytest.raises(ConfigError, match=rf"^{path}:1: "):
        AllowList.from_file(path)


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.txt")
    with pytest.raises(ConfigError) as caught:
        AllowList.from_file(path)
    assert str(caught.value) == f"{path}: No such file or directory"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        AllowList.from_file(str(tmp_path))
    assert str(caught.value) == f"{tmp_path}: Is a directory"


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing here\n   # still nothing\n"])
def test_a_file_without_entries_fails_closed(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        AllowList.from_file(path)
    assert str(caught.value).startswith(f"{path}: no subnets listed")


def test_non_utf8_line_is_reported_by_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"192.0.2.0/24\n# caf\xe9\n")
    with pytest.raises(ConfigError) as caught:
        AllowList.from_file(str(path))
    assert str(caught.value) == f"{path}:2: not UTF-8 text"


def test_the_first_bad_line_is_the_one_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "192.0.2.0/24\nbad-one\nbad-two\n")
    with pytest.raises(ConfigError, match=rf'^{path}:2: "bad-one"'):
        AllowList.from_file(path)


# --- membership --------------------------------------------------------------


@pytest.fixture
def acl(tmp_path: Path) -> AllowList:
    return load(tmp_path, "192.0.2.0/24\n203.0.113.128/25\n2001:db8:1::/48\n")


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [
        ("192.0.2.0", True),
        ("192.0.2.255", True),
        ("192.0.3.0", False),
        ("203.0.113.127", False),
        ("203.0.113.128", True),
        ("198.51.100.1", False),
        ("2001:db8:1::1", True),
        ("2001:db8:1:ffff:ffff:ffff:ffff:ffff", True),
        ("2001:db8:2::1", False),
        ("::1", False),
        ("127.0.0.1", False),
        # A dual-stack socket reports IPv4 peers in IPv4-mapped form.
        ("::ffff:192.0.2.1", True),
        ("::ffff:c000:201", True),
        ("::ffff:198.51.100.1", False),
        # getpeername adds the scope to link-local peers; it does not change the answer.
        ("2001:db8:1::1%eth0", True),
        ("fe80::1%eth0", False),
    ],
)
def test_allows(acl: AllowList, peer: str, allowed: bool) -> None:
    assert acl.allows(peer) is allowed


@pytest.mark.parametrize("garbage", ["", "not-an-ip", "192.0.2", "192.0.2.1:443", "[::1]"])
def test_anything_but_an_address_is_refused(acl: AllowList, garbage: str) -> None:
    assert acl.allows(garbage) is False


def test_ipv4_compatible_address_is_not_mapped(acl: AllowList) -> None:
    # ::192.0.2.1 (deprecated "IPv4-compatible") is a plain IPv6 address, not a mapped one.
    assert acl.allows("::192.0.2.1") is False


def test_everyone() -> None:
    acl = AllowList.everyone()
    assert acl.allows_everyone
    assert acl.path is None
    assert acl.cidrs == ()
    assert acl.count == 0
    assert bool(acl)  # never falsy, so "if allow_list:" cannot mean "nobody"
    for peer in ("192.0.2.1", "2001:db8::1", "::ffff:198.51.100.1", "garbage"):
        assert acl.allows(peer)


def test_repeated_lookups_give_the_same_answer(acl: AllowList) -> None:
    # The answers are cached; the cache must not change them.
    for _ in range(3):
        assert acl.allows("192.0.2.9")
        assert not acl.allows("198.51.100.9")


def test_concurrent_reads_agree(acl: AllowList) -> None:
    peers = [f"192.0.2.{i}" for i in range(256)] + [f"198.51.100.{i}" for i in range(256)]
    peers += [f"::ffff:192.0.2.{i}" for i in range(256)]
    expected = [not p.startswith("198.") for p in peers]
    results: list[list[bool]] = []
    lock = threading.Lock()

    def worker() -> None:
        answers = [acl.allows(peer) for peer in peers]
        with lock:
            results.append(answers)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [expected] * 8


def test_equality_and_hash(tmp_path: Path) -> None:
    path = write(tmp_path, "192.0.2.0/24\n")
    assert AllowList.from_file(path) == AllowList.from_file(path)
    assert hash(AllowList.from_file(path)) == hash(AllowList.from_file(path))
    assert AllowList.everyone() == AllowList.everyone()
    assert AllowList.from_file(path) != AllowList.everyone()
    assert "everyone" in repr(AllowList.everyone())
    assert "cidrs=1" in repr(AllowList.from_file(path))


def test_from_lines_names_its_source() -> None:
    with pytest.raises(ConfigError, match=r'^inline:2: "nope"'):
        AllowList.from_lines(["192.0.2.0/24", "nope"], source="inline")
    assert AllowList.from_lines(["192.0.2.0/24"], source="inline").path == "inline"


# --- parse_network and properties ---------------------------------------------


def test_parse_network_normalises() -> None:
    assert parse_network("192.0.2.7/24") == ipaddress.ip_network("192.0.2.0/24")
    assert parse_network("2001:db8::1") == ipaddress.ip_network("2001:db8::1/128")
    assert parse_network("::ffff:203.0.113.0/120") == ipaddress.ip_network("203.0.113.0/24")
    assert parse_network("::ffff:0:0/96") == ipaddress.ip_network("0.0.0.0/0")


@given(st.integers(0, 255), st.integers(0, 32))
def test_any_prefix_of_documentation_net_round_trips(last: int, prefix: int) -> None:
    token = f"192.0.2.{last}/{prefix}"
    network = parse_network(token)
    assert network == ipaddress.ip_network(token, strict=False)
    acl = AllowList.from_lines([token], source="generated")
    assert acl.allows(f"192.0.2.{last}")
    assert acl.allows(f"::ffff:192.0.2.{last}")


DOCUMENTATION_NETS = ("192.0.2", "198.51.100", "203.0.113")


@given(st.sampled_from(DOCUMENTATION_NETS), st.integers(0, 255))
def test_mapped_peer_matches_exactly_like_its_ipv4_form(net: str, last: int) -> None:
    acl = AllowList.from_lines(["192.0.2.0/24", "198.51.100.0/25"], source="generated")
    address = f"{net}.{last}"
    expected = net == "192.0.2" or (net == "198.51.100" and last < 128)
    assert acl.allows(address) is expected
    assert acl.allows(f"::ffff:{address}") is expected


# --- reload (SIGHUP) -------------------------------------------------------------


def test_holder_reload_swaps_in_the_new_file(tmp_path: Path) -> None:
    path = write(tmp_path, "192.0.2.0/24\n")
    holder = AllowListHolder(AllowList.from_file(path))
    before = holder.current
    write(tmp_path, "198.51.100.0/24\n2001:db8::/32\n")
    new = holder.reload()
    assert new is not None
    assert holder.current is new
    assert new.count == 2
    assert new.path == path
    assert not new.allows("192.0.2.1")
    assert new.allows("198.51.100.1")
    assert before.allows("192.0.2.1")  # the old list itself never changes


def test_holder_reload_with_an_error_keeps_the_old_list(tmp_path: Path) -> None:
    path = write(tmp_path, "192.0.2.0/24\n")
    holder = AllowListHolder(AllowList.from_file(path))
    before = holder.current
    write(tmp_path, "198.51.100.0/24\n# fine so far\nnot-an-address\n")
    with pytest.raises(ConfigError, match=rf"^{path}:3: "):
        holder.reload()
    assert holder.current is before
    (tmp_path / "allowed-subnets.txt").unlink()
    with pytest.raises(ConfigError, match=rf"^{path}: "):
        holder.reload()
    assert holder.current is before


def test_holder_without_a_file_has_nothing_to_reload() -> None:
    holder = AllowListHolder(AllowList.everyone())
    assert holder.reload() is None
    assert holder.current.allows_everyone


def test_holder_readers_see_one_whole_list_or_the_other(tmp_path: Path) -> None:
    """Readers racing a stream of swaps only ever see one of the two complete lists."""
    first = AllowList.from_lines(["192.0.2.0/24"], source="first")
    second = AllowList.from_lines(["198.51.100.0/24"], source="second")
    holder = AllowListHolder(first)
    seen: set[tuple[bool, bool]] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            current = holder.current
            seen.add((current.allows("192.0.2.9"), current.allows("198.51.100.9")))

    readers = [threading.Thread(target=read) for _ in range(4)]
    for reader in readers:
        reader.start()
    try:
        for i in range(2000):
            new, old = (second, first) if i % 2 == 0 else (first, second)
            assert holder.replace(new) is old
    finally:
        stop.set()
        for reader in readers:
            reader.join(5)
    assert seen <= {(True, False), (False, True)}
    assert seen
