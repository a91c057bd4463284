"""The parser against the named corpus (tests/unit/corpus.py).

Every valid vector is fed whole, with payload after it, byte by byte and in
random segments; every invalid vector whole and byte by byte, with the early
rejection points the parser promises checked exactly.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator

import pytest
from corpus import (
    BLOCK4,
    INVALID,
    OK4,
    SIG,
    TCP4_BYTES,
    VALID,
    Invalid,
    Valid,
    by_id,
    crc32c_reference,
    h,
    line,
    v2,
    with_crc,
)

from mmproxy.crc32c import crc32c
from mmproxy.errors import HeaderError, MmproxyError, Reason
from mmproxy.protocol import (
    V1_MAX_LENGTH,
    V2_FIXED_LENGTH,
    V2_MAX_LENGTH,
    Command,
    Family,
    InetAddress,
    NeedMore,
    Parsed,
    ProxyHeader,
    Transport,
    UnixAddress,
    encode,
    parse,
    parse_complete,
)
from mmproxy.tlv import (
    PP2_SUBTYPE_SSL_CN,
    PP2_SUBTYPE_SSL_VERSION,
    Alpn,
    Authority,
    AwsVpceId,
    Crc32c,
    Noop,
    Ssl,
    UnknownTlv,
)

# Payload that looks like more headers: it must be left alone all the same.
PAYLOAD = (
    SIG + b"\x21\x11\x00\x0c" + b"PROXY TCP4 203.0.113.9 192.0.2.9 1 2\r\nGET / HTTP/1.1\r\n\r\n"
)

EARLY = [v for v in INVALID if v.reject_at is not None]
CANONICAL = [v for v in VALID if v.canonical]
NON_CANONICAL = [v for v in VALID if not v.canonical]


def _ids(vectors: list[Valid] | list[Invalid]) -> list[str]:
    return [v.id for v in vectors]


each_valid = pytest.mark.parametrize("vector", VALID, ids=_ids(VALID))
each_invalid = pytest.mark.parametrize("vector", INVALID, ids=_ids(INVALID))


def _expected(vector: Valid) -> Parsed:
    return Parsed(vector.header, vector.consumed)


def _first_rejection(data: bytes) -> tuple[int, HeaderError]:
    """Feed ``data`` one byte more at a time; the prefix length that raised, and the error."""
    view = memoryview(data)
    for length in range(1, len(data) + 1):
        try:
            result = parse(view[:length])
        except HeaderError as error:
            return length, error
        assert isinstance(result, NeedMore), f"prefix of {length} bytes parsed: {result}"
        assert result.at_least >= 1
    pytest.fail("never rejected, even whole")


def _segments(data: bytes, rng: random.Random) -> Iterator[bytes]:
    """Cut ``data`` as a network might: a mix of tiny, odd and MSS-sized segments."""
    sizes = [1, 1, 2, 3, 5, 12, 13, 15, 16, 17, 40, 107, 536, 1460, 65536]
    offset = 0
    while offset < len(data):
        size = rng.choice(sizes)
        yield data[offset : offset + size]
        offset += size


def _strip_crc_values(header: ProxyHeader) -> ProxyHeader:
    tlvs = tuple(Crc32c() if isinstance(t, Crc32c) else t for t in header.tlvs)
    return dataclasses.replace(header, tlvs=tlvs)


# ----------------------------------------------------------------- the corpus itself


def test_corpus_size() -> None:
    assert len(VALID) + len(INVALID) >= 150
    assert sum(v.version == 1 for v in VALID) >= 30
    assert sum(v.version == 2 for v in VALID) >= 60


def test_corpus_covers_every_early_rejection_kind() -> None:
    kinds = {v.reason for v in EARLY}
    assert {
        Reason.NOT_PROXY_PROTOCOL,
        Reason.V1_BAD_SYNTAX,
        Reason.V1_BAD_PROTOCOL,
        Reason.V2_BAD_VERSION,
        Reason.V2_BAD_COMMAND,
        Reason.V2_BAD_FAMILY,
        Reason.V2_SHORT_ADDRESS,
        Reason.V1_TOO_LONG,
    } <= kinds


def test_computed_crc_matches_protocol_md_literal() -> None:
    """The corpus' own CRC32C reproduces the independently generated PROTOCOL.md vector."""
    assert by_id("v2-crc-computed").data == by_id("v2-crc").data
    assert by_id("v2-crc").data[-4:] == h("d4 5a 11 b9")


def test_reference_crc_agrees_with_package_on_corpus() -> None:
    for vector in VALID + INVALID:
        assert crc32c_reference(vector.data) == crc32c(vector.data), vector.id


# ----------------------------------------------------------------- valid: whole


@each_valid
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_valid_whole(vector: Valid, kind: type[bytes | bytearray | memoryview]) -> None:
    assert parse(kind(vector.data)) == _expected(vector)


@each_valid
def test_valid_followed_by_payload(vector: Valid) -> None:
    data = vector.data + PAYLOAD
    result = parse(data)
    assert result == _expected(vector)
    assert isinstance(result, Parsed)
    assert data[result.consumed :] == vector.data[vector.consumed :] + PAYLOAD


@each_valid
def test_valid_parse_complete(vector: Valid) -> None:
    assert parse_complete(vector.data) == _expected(vector)
    assert parse_complete(vector.data + PAYLOAD) == _expected(vector)


# ----------------------------------------------------------------- valid: in pieces


@each_valid
def test_valid_byte_by_byte(vector: Valid) -> None:
    view = memoryview(vector.data)
    for length in range(vector.consumed):
        result = parse(view[:length])
        assert isinstance(result, NeedMore), f"prefix of {length} bytes: {result}"
        missing = vector.consumed - length
        assert 1 <= result.at_least <= missing, length
        if vector.version == 2:
            if length >= V2_FIXED_LENGTH:
                assert result.at_least == missing, length
            else:  # len is not known yet: never ask past the fixed part
                assert result.at_least <= V2_FIXED_LENGTH - length, length
    for length in range(vector.consumed, len(vector.data) + 1):
        assert parse(view[:length]) == _expected(vector), length


@each_valid
@pytest.mark.parametrize("seed", range(6))
def test_valid_random_segments(vector: Valid, seed: int) -> None:
    """A reader that appends each segment to its buffer and parses the buffer again."""
    rng = random.Random(f"{vector.id}/{seed}")
    data = vector.data + PAYLOAD
    buffer = bytearray()
    for segment in _segments(data, rng):
        buffer += segment
        result = parse(buffer)
        if len(buffer) < vector.consumed:
            assert isinstance(result, NeedMore), len(buffer)
            assert 1 <= result.at_least <= vector.consumed - len(buffer)
        else:
            assert result == _expected(vector)
            assert bytes(buffer[vector.consumed :]) == data[vector.consumed : len(buffer)]
            return
    pytest.fail("the whole vector was fed without a Parsed answer")


@each_valid
def test_valid_reader_reading_exactly_at_least_never_overreads(vector: Valid) -> None:
    """Reading just ``at_least`` bytes each time takes the header and not one payload byte."""
    data = vector.data + PAYLOAD
    buffer = b""
    result = parse(buffer)
    while isinstance(result, NeedMore):
        buffer = data[: len(buffer) + result.at_least]
        assert len(buffer) <= vector.consumed
        result = parse(buffer)
    assert result == _expected(vector)
    assert len(buffer) == vector.consumed


def test_protocol_md_v1_split() -> None:
    pieces = [b"PRO", b"XY TCP4 192.0.2.1 19", b"8.51.100.7 56324 443\r\n"]
    assert b"".join(pieces) == OK4
    assert parse(pieces[0]) == NeedMore(1)
    assert parse(b"".join(pieces[:2])) == NeedMore(1)
    assert parse(b"".join(pieces)) == _expected(by_id("v1-ok-4"))


def test_protocol_md_v2_split() -> None:
    pieces = [TCP4_BYTES[:13], TCP4_BYTES[13:16], TCP4_BYTES[16:]]
    assert [len(p) for p in pieces] == [13, 3, 12]
    assert parse(pieces[0]) == NeedMore(3)
    assert parse(pieces[0] + pieces[1]) == NeedMore(12)
    assert parse(b"".join(pieces)) == _expected(by_id("v2-tcp4"))


# ----------------------------------------------------------------- truncation


def test_empty_input_needs_one_byte() -> None:
    assert parse(b"") == NeedMore(1)
    with pytest.raises(HeaderError) as info:
        parse_complete(b"")
    assert info.value.reason is Reason.INCOMPLETE


@each_valid
def test_parse_complete_refuses_truncated_datagram(vector: Valid) -> None:
    lengths = set(range(min(vector.consumed, 20)))
    lengths |= {vector.consumed // 2, vector.consumed - 2, vector.consumed - 1}
    for length in sorted(n for n in lengths if 0 <= n < vector.consumed):
        with pytest.raises(HeaderError) as info:
            parse_complete(vector.data[:length])
        assert info.value.reason is Reason.INCOMPLETE, length
        assert info.value.detail
        assert Reason.INCOMPLETE.value in str(info.value)


def test_protocol_md_v2_trunc() -> None:
    data = h("0d0a0d0a000d0a515549540a 21 11 000c c0000201 c633")
    assert parse(data) == NeedMore(6)
    with pytest.raises(HeaderError) as info:
        parse_complete(data)
    assert info.value.reason is Reason.INCOMPLETE


def test_protocol_md_v1_nocrlf() -> None:
    data = b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443"
    assert parse(data) == NeedMore(1)
    assert parse(data + b"\r") == NeedMore(1)
    with pytest.raises(HeaderError) as info:
        parse_complete(data + b"\r")
    assert info.value.reason is Reason.INCOMPLETE


def test_v1_unknown_waits_for_crlf_up_to_the_cap() -> None:
    data = b"PROXY UNKNOWN " + b"z" * (V1_MAX_LENGTH - 15)
    assert len(data) == V1_MAX_LENGTH - 1
    assert parse(data) == NeedMore(1)
    with pytest.raises(HeaderError) as info:
        parse(data + b"z")
    assert info.value.reason is Reason.V1_TOO_LONG


# ----------------------------------------------------------------- invalid


@each_invalid
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_invalid_whole(vector: Invalid, kind: type[bytes | bytearray | memoryview]) -> None:
    with pytest.raises(HeaderError) as info:
        parse(kind(vector.data))
    error = info.value
    assert error.reason is vector.reason
    assert isinstance(error, MmproxyError)
    assert isinstance(error.detail, str)
    assert error.detail.strip()
    assert vector.reason.value in str(error)


@each_invalid
def test_invalid_parse_complete(vector: Invalid) -> None:
    with pytest.raises(HeaderError) as info:
        parse_complete(vector.data)
    assert info.value.reason is vector.reason


@each_invalid
def test_invalid_byte_by_byte_never_parses(vector: Invalid) -> None:
    rejected_at, error = _first_rejection(vector.data)
    assert rejected_at <= len(vector.data)
    assert error.detail
    # The parser keeps no state: once refused, every longer prefix is refused too.
    view = memoryview(vector.data)
    for length in range(rejected_at, len(vector.data) + 1):
        with pytest.raises(HeaderError):
            parse(view[:length])


@pytest.mark.parametrize("vector", EARLY, ids=_ids(EARLY))
def test_early_rejection_at_the_first_bad_byte(vector: Invalid) -> None:
    assert vector.reject_at is not None
    before = vector.data[: vector.reject_at - 1]
    assert isinstance(parse(before), NeedMore)
    with pytest.raises(HeaderError):
        parse(vector.data[: vector.reject_at])
    assert _first_rejection(vector.data)[0] == vector.reject_at


@each_invalid
@pytest.mark.parametrize("seed", range(3))
def test_invalid_random_segments(vector: Invalid, seed: int) -> None:
    rng = random.Random(f"{vector.id}/{seed}")
    rejected_at = _first_rejection(vector.data)[0]
    buffer = bytearray()
    for segment in _segments(vector.data, rng):
        buffer += segment
        if len(buffer) < rejected_at:
            assert isinstance(parse(buffer), NeedMore)
        else:
            with pytest.raises(HeaderError):
                parse(buffer)
            return
    pytest.fail("never rejected")


def test_v2_short_address_refused_without_the_body() -> None:
    """PROTOCOL.md: "...21 11 0000" with nothing after crashed path-network/go-mmproxy."""
    for fam, length in ((0x11, 0), (0x21, 35), (0x31, 215), (0x12, 8)):
        with pytest.raises(HeaderError) as info:
            parse(v2(0x21, fam, length=length))
        assert info.value.reason is Reason.V2_SHORT_ADDRESS
        assert str(length) in info.value.detail


def test_v2_local_with_short_length_is_not_refused() -> None:
    assert parse(v2(0x20, 0x21, length=0)) == Parsed(ProxyHeader.local(), 16)
    assert parse(v2(0x20, 0x31, length=12)) == NeedMore(12)


# ----------------------------------------------------------------- client / find

CLIENTS = [
    ("v1-ok-4", InetAddress.of("192.0.2.1", 56324)),
    ("v1-ok-6", InetAddress.of("2001:db8::1", 40000)),
    ("v1-tcp6-mapped-v4", InetAddress.of("::ffff:192.0.2.1", 56324)),
    ("v1-port0", InetAddress.of("0.0.0.0", 0)),
    ("v1-unk-short", None),
    ("v1-unk-max", None),
    ("v2-tcp4", InetAddress.of("192.0.2.1", 56324)),
    ("v2-udp4", InetAddress.of("203.0.113.5", 5353)),
    ("v2-tcp6", InetAddress.of("2001:db8::1", 40000)),
    ("v2-udp6", InetAddress.of("2001:db8:1::53", 5353)),
    ("v2-tcp6-extremes", InetAddress.of("::", 65535)),
    ("v2-unix", None),
    ("v2-unix-dgram", None),
    ("v2-unspec", None),
    ("v2-unspec-tlvs", None),
    ("v2-local", None),
    ("v2-local-addr", None),
    ("v2-local-fam-ff-junk", None),
    ("v2-crc-local-inet", None),
]


@pytest.mark.parametrize(("vector_id", "client"), CLIENTS, ids=[c[0] for c in CLIENTS])
def test_client(vector_id: str, client: InetAddress | None) -> None:
    result = parse(by_id(vector_id).data)
    assert isinstance(result, Parsed)
    assert result.header.client == client


@each_valid
def test_client_follows_command_and_family(vector: Valid) -> None:
    header = vector.header
    if header.command is Command.LOCAL or header.family in (Family.UNSPEC, Family.UNIX):
        assert header.client is None
    else:
        assert header.client == header.source
        assert isinstance(header.destination, InetAddress)
    if header.family is Family.UNIX:
        assert isinstance(header.source, UnixAddress)
        assert isinstance(header.destination, UnixAddress)
    assert (header.source is None) == (header.destination is None)


def test_address_text() -> None:
    assert str(InetAddress.of("192.0.2.1", 56324)) == "192.0.2.1:56324"
    assert str(InetAddress.of("2001:db8::1", 40000)) == "[2001:db8::1]:40000"
    assert str(UnixAddress(b"/run/a.sock")) == "unix:/run/a.sock"
    assert str(UnixAddress(b"/tmp/\xff")) == "unix:/tmp/\\xff"


def test_find_first_of_each_type() -> None:
    header = by_id("v2-tlv").header
    assert header.find(Alpn) == Alpn(b"h2")
    assert header.find(Authority) == Authority("example.com")
    assert header.find(Noop) == Noop(bytes(3))
    assert header.find(Ssl) is None
    assert header.find(Crc32c) is None

    repeated = by_id("v2-repeated-types").header
    assert repeated.find(Alpn) == Alpn(b"h2")
    assert repeated.find(Authority) == Authority("a.example")
    assert repeated.find(Ssl) == Ssl(0x01, 0)


def test_find_ssl_strings() -> None:
    ssl = by_id("v2-ssl").header.find(Ssl)
    assert isinstance(ssl, Ssl)
    assert ssl.text(PP2_SUBTYPE_SSL_VERSION) == "TLSv1.3"
    assert ssl.text(PP2_SUBTYPE_SSL_CN) == "example.com"
    assert ssl.client_used_tls
    assert ssl.certificate_verified


def test_find_vendor_and_unknown() -> None:
    assert by_id("v2-aws").header.find(AwsVpceId) == AwsVpceId("vpce-0123456789abcdef0")
    fallback = by_id("v2-aws-subtype-2").header
    assert fallback.find(AwsVpceId) is None
    assert fallback.find(UnknownTlv) == UnknownTlv(0xEA, b"\x02vpce-1")
    assert by_id("v2-unknown-types").header.find(UnknownTlv) == UnknownTlv(0x00, b"\x00")
    crc = by_id("v2-crc").header.find(Crc32c)
    assert crc == Crc32c(0xD45A11B9)


def test_find_on_headers_without_tlvs() -> None:
    for vector_id in ("v1-ok-4", "v1-unk-short", "v2-local-addr", "v2-tcp4"):
        assert by_id(vector_id).header.find(Alpn) is None


# ----------------------------------------------------------------- encode


@pytest.mark.parametrize("vector", CANONICAL, ids=_ids(CANONICAL))
def test_encode_reproduces_canonical_vector(vector: Valid) -> None:
    assert encode(vector.header) == vector.data[: vector.consumed]


@each_valid
def test_encode_then_parse_gives_the_header_back(vector: Valid) -> None:
    wire = encode(vector.header)
    result = parse(wire)
    assert isinstance(result, Parsed)
    assert result.consumed == len(wire)
    assert _strip_crc_values(result.header) == _strip_crc_values(vector.header)


@pytest.mark.parametrize("vector", NON_CANONICAL, ids=_ids(NON_CANONICAL))
def test_encode_normalises_non_canonical_vector(vector: Valid) -> None:
    wire = encode(vector.header)
    assert wire != vector.data[: vector.consumed]
    assert encode(parse_complete(wire).header) == wire  # the canonical form is a fixed point


def test_encode_recomputes_crc() -> None:
    """Whatever checksum the Crc32c TLV holds, encode writes the right one."""
    source, destination = InetAddress.of("192.0.2.1", 56324), InetAddress.of("198.51.100.7", 443)
    for stale in (0, 1, 0xD45A11B9, 0xFFFFFFFF):
        wire = encode(ProxyHeader.proxy(source, destination, tlvs=(Crc32c(stale),)))
        assert wire == by_id("v2-crc").data


def test_encode_v2_max_and_over() -> None:
    source, destination = InetAddress.of("192.0.2.1", 1), InetAddress.of("198.51.100.7", 2)
    biggest = ProxyHeader.proxy(source, destination, tlvs=(Noop(bytes(0xFFFF - 15)),))
    assert len(encode(biggest)) == V2_MAX_LENGTH
    too_big = ProxyHeader.proxy(source, destination, tlvs=(Noop(bytes(0xFFFF - 14)),))
    with pytest.raises(ValueError, match="65535"):
        encode(too_big)


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (ProxyHeader(3, Command.PROXY, Family.UNSPEC, Transport.UNSPEC), "version 3"),
        (ProxyHeader(1, Command.LOCAL, Family.UNSPEC, Transport.UNSPEC), "LOCAL"),
        (ProxyHeader(1, Command.PROXY, Family.UNSPEC, Transport.UNSPEC, tlvs=(Noop(),)), "TLV"),
        (
            ProxyHeader.proxy(
                InetAddress.of("192.0.2.1", 1),
                InetAddress.of("198.51.100.7", 2),
                version=1,
                transport=Transport.DGRAM,
            ),
            "TCP",
        ),
        (ProxyHeader(2, Command.PROXY, Family.INET, Transport.STREAM), "INET needs"),
        (ProxyHeader(2, Command.PROXY, Family.UNIX, Transport.STREAM), "UNIX needs"),
    ],
    ids=["v3", "v1-local", "v1-tlvs", "v1-dgram", "v2-inet-no-address", "v2-unix-no-path"],
)
def test_encode_refuses_inexpressible_headers(header: ProxyHeader, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode(header)


def test_proxy_constructor_refuses_mixed_families() -> None:
    with pytest.raises(ValueError, match="one address family"):
        ProxyHeader.proxy(InetAddress.of("192.0.2.1", 1), InetAddress.of("2001:db8::1", 2))


def test_local_constructor() -> None:
    assert encode(ProxyHeader.local()) == SIG + h("20 00 0000")
    assert encode(ProxyHeader.local(version=1)) == line("PROXY UNKNOWN")
    assert ProxyHeader.local().client is None


def test_crc_helper_places_checksum_where_the_parser_reads_it() -> None:
    data, crc = with_crc(0x21, 0x11, BLOCK4)
    assert data[-7:-4] == h("03 0004")
    assert data[-4:] == crc.payload()


# ----------------------------------------------------------------- encoder bounds
# encode() promises ValueError for a header that cannot be expressed, rather
# than bytes that would parse as something else.


def test_encode_refuses_unix_path_longer_than_108_bytes() -> None:
    """A 109-byte path is written unpadded, shifting every later byte of the header."""
    header = ProxyHeader(
        2,
        Command.PROXY,
        Family.UNIX,
        Transport.STREAM,
        UnixAddress(b"/" + b"a" * 108),
        UnixAddress(b"/b"),
    )
    with pytest.raises(ValueError):  # noqa: PT011 - the message is the owner's choice
        encode(header)


@pytest.mark.parametrize("port", [-1, 65536], ids=["port-minus-1", "port-65536"])
@pytest.mark.parametrize("version", [1, 2], ids=["v1", "v2"])
def test_encode_refuses_port_out_of_range(version: int, port: int) -> None:
    header = ProxyHeader.proxy(
        InetAddress.of("192.0.2.1", port), InetAddress.of("198.51.100.7", 443), version=version
    )
    with pytest.raises(ValueError):  # noqa: PT011 - the message is the owner's choice
        encode(header)


@pytest.mark.parametrize("version", [1, 2], ids=["v1", "v2"])
def test_encode_refuses_addresses_of_the_other_family(version: int) -> None:
    """INET with IPv6 hosts would write a 36-byte block under a 12-byte family."""
    header = ProxyHeader(
        version,
        Command.PROXY,
        Family.INET,
        Transport.STREAM,
        InetAddress.of("2001:db8::1", 1),
        InetAddress.of("2001:db8::2", 2),
    )
    with pytest.raises(ValueError, match="is not an INET address"):
        encode(header)
