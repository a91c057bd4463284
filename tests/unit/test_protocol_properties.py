"""Property tests of the PROXY protocol parser and encoder (hypothesis).

Example counts are kept moderate (see MAX_EXAMPLES) so this file runs in a few
seconds; the corpus tests carry the named edge cases.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools

from corpus import SIG, crc32c_reference
from hypothesis import given, settings
from hypothesis import strategies as st

from mmproxy import protocol_v1
from mmproxy.crc32c import crc32c
from mmproxy.errors import HeaderError, Reason
from mmproxy.protocol import (
    V2_FIXED_LENGTH,
    Command,
    Family,
    InetAddress,
    IPAddress,
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
    TLV_HEADER_LENGTH,
    Alpn,
    Authority,
    AwsVpceId,
    AzureLinkId,
    Crc32c,
    GcpPscConnectionId,
    Netns,
    Noop,
    Ssl,
    SslString,
    Tlv,
    UniqueId,
    UnknownTlv,
    encode_tlvs,
)

# ----------------------------------------------------------------- strategies

# Only documentation ranges, plus the all-zero, all-one and loopback extremes.
DOC_V4 = [ipaddress.IPv4Network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")]
EXTREME_V4 = [ipaddress.IPv4Address(a) for a in ("0.0.0.0", "255.255.255.255", "127.0.0.1")]
EXTREME_V6 = [ipaddress.IPv6Address(a) for a in ("::", "::1", "ffff:" * 7 + "ffff")]
DOC_V6_PREFIX = 0x20010DB8 << 96

ipv4s: st.SearchStrategy[IPAddress] = st.one_of(
    st.tuples(st.sampled_from(DOC_V4), st.integers(0, 255)).map(lambda t: t[0][t[1]]),
    st.sampled_from(EXTREME_V4),
)
# 2001:db8::/32 built group by group, with many zero groups so that every
# "::" compression position shows up in v1 text.
ipv6s: st.SearchStrategy[IPAddress] = st.one_of(
    st.lists(st.one_of(st.just(0), st.integers(0, 0xFFFF)), min_size=6, max_size=6).map(
        lambda groups: ipaddress.IPv6Address(
            DOC_V6_PREFIX | int.from_bytes(b"".join(g.to_bytes(2, "big") for g in groups), "big")
        )
    ),
    st.sampled_from(EXTREME_V6),
    ipv4s.map(lambda a: ipaddress.IPv6Address(f"::ffff:{a}")),
)
ports = st.integers(0, 0xFFFF)
ascii_text = st.text(st.characters(codec="ascii"), max_size=24)
utf8_text = st.text(max_size=24)  # hypothesis leaves out surrogates, so it always encodes

# Codes with a decoder, and the SSL string sub-types: an UnknownTlv must avoid them.
TYPED_CODES = frozenset({0x01, 0x02, 0x03, 0x04, 0x05, 0x20, 0x30, 0xE0, 0xEA, 0xEE})
SSL_STRING_SUBTYPES = (0x21, 0x22, 0x23, 0x24, 0x25)

ssl_strings = st.one_of(
    st.builds(SslString, st.sampled_from((0x21, 0x23, 0x24, 0x25)), ascii_text),
    st.builds(SslString, st.just(0x22), utf8_text),
    st.builds(
        UnknownTlv,
        st.integers(0, 255).filter(lambda c: c not in SSL_STRING_SUBTYPES),
        st.binary(max_size=8),
    ),
)
typed_tlvs: st.SearchStrategy[Tlv] = st.one_of(
    st.builds(Alpn, st.binary(max_size=16)),
    st.builds(Authority, utf8_text),
    st.builds(Noop, st.binary(max_size=16)),
    st.builds(UniqueId, st.binary(max_size=128)),
    st.builds(Netns, ascii_text),
    st.builds(
        Ssl,
        st.integers(0, 0xFF),
        st.integers(0, 0xFFFFFFFF),
        st.lists(ssl_strings, max_size=4).map(tuple),
    ),
    st.builds(AwsVpceId, ascii_text),
    st.builds(AzureLinkId, st.integers(0, 0xFFFFFFFF)),
    st.builds(GcpPscConnectionId, st.integers(0, 2**64 - 1)),
    st.builds(
        UnknownTlv,
        st.integers(0, 255).filter(lambda c: c not in TYPED_CODES),
        st.binary(max_size=16),
    ),
)


@st.composite
def tlv_lists(draw: st.DrawFn, *, crc: bool | None = None) -> tuple[Tlv, ...]:
    """Random typed TLVs; with one Crc32c somewhere if ``crc`` (randomly if None)."""
    tlvs = draw(st.lists(typed_tlvs, max_size=6))
    want_crc = draw(st.booleans()) if crc is None else crc
    if want_crc:
        tlvs.insert(draw(st.integers(0, len(tlvs))), Crc32c(draw(st.integers(0, 0xFFFFFFFF))))
    return tuple(tlvs)


unix_paths = st.lists(st.integers(1, 255), max_size=108).map(bytes)  # no NUL inside


@st.composite
def v1_headers(draw: st.DrawFn) -> ProxyHeader:
    kind = draw(st.sampled_from(["TCP4", "TCP6", "UNKNOWN"]))
    if kind == "UNKNOWN":
        return ProxyHeader.local(version=1)
    hosts = ipv4s if kind == "TCP4" else ipv6s
    source = InetAddress(draw(hosts), draw(ports))
    destination = InetAddress(draw(hosts), draw(ports))
    return ProxyHeader.proxy(source, destination, version=1)


@st.composite
def v2_headers(draw: st.DrawFn, *, crc: bool | None = None) -> ProxyHeader:
    tlvs = draw(tlv_lists(crc=crc))
    kind = draw(st.sampled_from(["INET", "INET6", "UNIX", "UNSPEC", "LOCAL"]))
    if kind == "LOCAL":
        return ProxyHeader.local(tlvs=tlvs)
    if kind == "UNSPEC":
        return ProxyHeader(2, Command.PROXY, Family.UNSPEC, Transport.UNSPEC, tlvs=tlvs)
    transport = draw(st.sampled_from([Transport.STREAM, Transport.DGRAM]))
    if kind == "UNIX":
        source, destination = UnixAddress(draw(unix_paths)), UnixAddress(draw(unix_paths))
        return ProxyHeader(2, Command.PROXY, Family.UNIX, transport, source, destination, tlvs)
    hosts = ipv4s if kind == "INET" else ipv6s
    return ProxyHeader.proxy(
        InetAddress(draw(hosts), draw(ports)),
        InetAddress(draw(hosts), draw(ports)),
        transport=transport,
        tlvs=tlvs,
    )


any_headers = st.one_of(v1_headers(), v2_headers())


def _strip_crc_values(header: ProxyHeader) -> ProxyHeader:
    tlvs = tuple(Crc32c() if isinstance(t, Crc32c) else t for t in header.tlvs)
    return dataclasses.replace(header, tlvs=tlvs)


def _address_block_length(header: ProxyHeader) -> int:
    return {Family.UNSPEC: 0, Family.INET: 12, Family.INET6: 36, Family.UNIX: 216}[header.family]


def _tlv_offsets(header: ProxyHeader) -> list[tuple[int, Tlv]]:
    """Where each top-level TLV starts in encode(header)."""
    offset = V2_FIXED_LENGTH + _address_block_length(header)
    out = []
    for tlv in header.tlvs:
        out.append((offset, tlv))
        offset += TLV_HEADER_LENGTH + len(tlv.payload())
    return out


# ----------------------------------------------------------------- (a) round trip


@settings(deadline=None, max_examples=300)
@given(any_headers)
def test_round_trip(header: ProxyHeader) -> None:
    wire = encode(header)
    result = parse(wire)
    assert isinstance(result, Parsed)
    assert result.consumed == len(wire)
    assert _strip_crc_values(result.header) == _strip_crc_values(header)
    assert parse_complete(wire) == result


@settings(deadline=None, max_examples=100)
@given(v2_headers(crc=True))
def test_round_trip_crc_value_is_the_checksum_of_the_zeroed_header(header: ProxyHeader) -> None:
    wire = encode(header)
    at = next(offset for offset, tlv in _tlv_offsets(header) if isinstance(tlv, Crc32c))
    at += TLV_HEADER_LENGTH
    zeroed = wire[:at] + bytes(4) + wire[at + 4 :]
    expected = crc32c_reference(zeroed)
    assert wire[at : at + 4] == expected.to_bytes(4, "big")
    result = parse(wire)
    assert isinstance(result, Parsed)
    assert result.header.find(Crc32c) == Crc32c(expected)


# ----------------------------------------------------------------- (b) any split


@settings(deadline=None, max_examples=200)
@given(any_headers, st.binary(max_size=16), st.data())
def test_any_split_parses_as_whole(
    header: ProxyHeader, payload: bytes, data: st.DataObject
) -> None:
    wire = encode(header)
    stream = wire + payload
    whole = parse(stream)
    assert isinstance(whole, Parsed)
    assert whole.consumed == len(wire)
    cuts = data.draw(
        st.lists(st.integers(1, len(stream) - 1), max_size=8, unique=True).map(sorted),
        label="cuts",
    )
    bounds = [0, *cuts, len(stream)]
    buffer = bytearray()
    for start, end in itertools.pairwise(bounds):
        buffer += stream[start:end]
        result = parse(buffer)
        if len(buffer) < len(wire):
            assert isinstance(result, NeedMore)
            assert 1 <= result.at_least <= len(wire) - len(buffer)
        else:
            assert result == whole
    assert len(buffer) == len(stream)


# ----------------------------------------------------------------- (c) never crashes


def _outcome(data: bytes) -> NeedMore | Parsed | HeaderError:
    """What parse answers, with a refusal returned instead of raised."""
    try:
        return parse(data)
    except HeaderError as error:
        return error


def _complete_outcome(data: bytes) -> Parsed | HeaderError:
    try:
        return parse_complete(data)
    except HeaderError as error:
        return error


def _check_total(data: bytes) -> None:
    """parse answers NeedMore, Parsed or HeaderError, consistently, and nothing else.

    Any other exception propagates and fails the test.
    """
    result = _outcome(data)
    if isinstance(result, HeaderError):
        assert isinstance(result.reason, Reason)
        assert isinstance(result.detail, str)
        assert result.detail
        assert result.reason.value in str(result)
        # rejection is final: more bytes never make it acceptable
        assert isinstance(_outcome(data + b"\r\n" + bytes(64)), HeaderError)
        assert isinstance(_complete_outcome(data), HeaderError)
        # the reason does not depend on how the bytes were split: the first
        # prefix that is refused is refused for the same reason as the whole
        first = next(
            e for n in range(len(data) + 1) if isinstance(e := _outcome(data[:n]), HeaderError)
        )
        assert first.reason is result.reason, (first, result)
        return
    if isinstance(result, NeedMore):
        assert result.at_least >= 1
        complete = _complete_outcome(data)
        assert isinstance(complete, HeaderError)
        assert complete.reason is Reason.INCOMPLETE
        return
    assert isinstance(result, Parsed)
    assert 0 < result.consumed <= len(data)
    # the header stands alone: what follows it does not change it ...
    assert parse(data[: result.consumed]) == result
    assert parse_complete(data) == result
    # ... and no prefix of it was refused (early rejection never rejects a valid header)
    for length in range(result.consumed):
        assert isinstance(parse(data[:length]), NeedMore)
    # encoding what was parsed gives something that parses to the same header
    reparsed = parse(encode(result.header))
    assert isinstance(reparsed, Parsed)
    assert _strip_crc_values(reparsed.header) == _strip_crc_values(result.header)


@settings(deadline=None, max_examples=400)
@given(st.binary(max_size=300))
def test_arbitrary_bytes(data: bytes) -> None:
    _check_total(data)


@settings(deadline=None, max_examples=400)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_after_v2_signature(data: bytes) -> None:
    _check_total(SIG + data)


@settings(deadline=None, max_examples=400)
@given(st.binary(max_size=120))
def test_arbitrary_bytes_after_proxy(data: bytes) -> None:
    _check_total(b"PROXY " + data)


V1_ALPHABET = "PROXYTCP46UNKOW0123456789abcdefABCDEF.:% \r\n\t\x00"


@settings(deadline=None, max_examples=400)
@given(
    st.sampled_from(["", "TCP4 ", "TCP6 ", "UNKNOWN", "TCP4 192.0.2.1 ", "TCP6 2001:db8::"]),
    st.text(V1_ALPHABET, max_size=110),
)
def test_v1_like_text(start: str, rest: str) -> None:
    _check_total(("PROXY " + start + rest).encode("latin-1"))


_V1_NUMBERS = st.one_of(
    st.integers(0, 300).map(str), st.sampled_from(["00", "01", "007", "+1", "-1", " 1", "65536"])
)


@settings(deadline=None, max_examples=600)
@given(
    st.lists(_V1_NUMBERS, min_size=4, max_size=4),
    st.lists(_V1_NUMBERS, min_size=4, max_size=4),
    _V1_NUMBERS,
    st.one_of(st.integers(0, 70000).map(str), _V1_NUMBERS),
)
def test_v1_tcp4_fast_path_agrees_with_the_full_check(
    source: list[str], destination: list[str], source_port: str, destination_port: str
) -> None:
    """The one-match path for TCP4 lines gives what the field-by-field check gives: the
    same header, or (declining) the full check's refusal."""
    line = (
        f"PROXY TCP4 {'.'.join(source)} {'.'.join(destination)} {source_port} {destination_port}"
    ).encode()
    fast = protocol_v1._tcp4_line(line)
    try:
        family = protocol_v1._check_v1(line, complete=True)
    except HeaderError:
        assert fast is None
        return
    assert family is Family.INET
    _, _, src, dst, sport, dport = line.split(b" ")
    assert fast is not None
    assert fast.source == InetAddress(ipaddress.IPv4Address(src.decode()), int(sport))
    assert fast.destination == InetAddress(ipaddress.IPv4Address(dst.decode()), int(dport))


@st.composite
def v2_structured(draw: st.DrawFn) -> bytes:
    """A v2 fixed part that passes its checks, then a body of loosely formed TLVs."""
    ver_cmd = draw(st.sampled_from([0x20, 0x21]))
    fam = draw(st.sampled_from([0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32, 0x13, 0xFF]))
    block = draw(st.sampled_from([0, 12, 36, 216]))
    body = bytearray(draw(st.binary(min_size=block, max_size=block)))
    for _ in range(draw(st.integers(0, 4))):
        code = draw(st.sampled_from([0x01, 0x02, 0x03, 0x04, 0x05, 0x20, 0x30, 0xE0, 0xEA, 0xEE]))
        value = draw(st.binary(max_size=12))
        if code == 0x20:  # an SSL value with loosely formed sub-TLVs
            value = draw(st.binary(min_size=5, max_size=5)) + b"".join(
                bytes([draw(st.integers(0x20, 0x26))])
                + draw(st.integers(0, 8)).to_bytes(2, "big")
                + draw(st.binary(max_size=8))
                for _ in range(draw(st.integers(0, 3)))
            )
        length = draw(st.one_of(st.just(len(value)), st.integers(0, len(value) + 2)))
        body += bytes([code]) + length.to_bytes(2, "big") + value
    size = draw(st.one_of(st.just(len(body)), st.integers(0, len(body) + 2)))
    return SIG + bytes([ver_cmd, fam]) + size.to_bytes(2, "big") + bytes(body)


@settings(deadline=None, max_examples=500)
@given(v2_structured(), st.binary(max_size=8))
def test_v2_structured_bytes(header: bytes, payload: bytes) -> None:
    _check_total(header + payload)


# ----------------------------------------------------------------- (d) CRC mutations

# TLVs whose value may hold any bytes (or falls back to UnknownTlv): a flipped
# value byte can only be caught by the checksum.
OPAQUE = (Alpn, Noop, UniqueId, UnknownTlv, AwsVpceId, AzureLinkId, GcpPscConnectionId, Crc32c)


def _mutation_regions(header: ProxyHeader) -> tuple[set[int], set[int]]:
    """(positions where a change must give V2_BAD_CRC, positions where parsing may diverge).

    A change anywhere else (signature, ver_cmd, a checked value) must be refused,
    for any reason.  Diverging positions: the fam byte (LOCAL ignores an
    invalid family, TLVs included), the length, and TLV headers (a type or
    length change can hide the CRC TLV inside another TLV's value).
    """
    crc_only = set(range(V2_FIXED_LENGTH, V2_FIXED_LENGTH + _address_block_length(header)))
    diverging = {13, 14, 15}
    for offset, tlv in _tlv_offsets(header):
        diverging |= set(range(offset, offset + TLV_HEADER_LENGTH))
        if isinstance(tlv, OPAQUE):
            value = offset + TLV_HEADER_LENGTH
            crc_only |= set(range(value, value + len(tlv.payload())))
    return crc_only, diverging


@settings(deadline=None, max_examples=400)
@given(v2_headers(crc=True), st.data())
def test_single_byte_mutation_with_crc(header: ProxyHeader, data: st.DataObject) -> None:
    wire = encode(header)
    position = data.draw(st.integers(0, len(wire) - 1), label="position")
    new = data.draw(st.integers(0, 255).filter(lambda b: b != wire[position]), label="byte")
    mutated = wire[:position] + bytes([new]) + wire[position + 1 :]
    crc_only, diverging = _mutation_regions(header)
    result = _outcome(mutated)
    if isinstance(result, HeaderError):
        if position in crc_only:
            assert result.reason is Reason.V2_BAD_CRC
        return
    assert position in diverging, f"mutation at {position} accepted: {result}"
    assert not isinstance(result, NeedMore) or position in (14, 15)


# ----------------------------------------------------------------- (e) CRC32C


def test_crc32c_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c_reference(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    assert crc32c(b"\xff" * 32) == 0x62A8AB43  # RFC 3720 B.4: 32 bytes of ones
    assert crc32c(bytes(range(32))) == 0x46DD794E  # RFC 3720 B.4: incrementing


@settings(deadline=None, max_examples=200)
@given(st.binary(max_size=512))
def test_crc32c_matches_bitwise_reference(data: bytes) -> None:
    expected = crc32c_reference(data)
    assert crc32c(data) == expected
    assert crc32c(bytearray(data)) == expected
    assert crc32c(memoryview(data)) == expected


@settings(deadline=None, max_examples=100)
@given(st.binary(min_size=1, max_size=64), st.data())
def test_crc32c_detects_any_single_byte_change(data: bytes, choices: st.DataObject) -> None:
    position = choices.draw(st.integers(0, len(data) - 1))
    new = choices.draw(st.integers(0, 255).filter(lambda b: b != data[position]))
    changed = data[:position] + bytes([new]) + data[position + 1 :]
    assert crc32c(changed) != crc32c(data)


def test_tlv_offsets_helper() -> None:
    """The offsets the mutation test relies on point at the encoded TLV headers."""
    header = ProxyHeader.proxy(
        InetAddress.of("192.0.2.1", 1),
        InetAddress.of("198.51.100.7", 2),
        tlvs=(Alpn(b"h2"), Crc32c(), Noop(b"x")),
    )
    wire = encode(header)
    offsets = [offset for offset, _ in _tlv_offsets(header)]
    assert offsets == [28, 33, 40]
    assert [wire[offset] for offset in offsets] == [0x01, 0x03, 0x04]
    assert wire[28:] == encode_tlvs(header.tlvs)[:5] + wire[33:]
