"""Named PROXY protocol vectors (v1 and v2), valid and invalid, for the parser tests.

Plain data and a few builders, no tests.  Every byte string is assembled from
readable parts: v1 lines as text, v2 headers as signature + ver_cmd + fam + len
+ address block + TLVs, with hex written in spaced groups.  CRC32C values are
computed here by :func:`crc32c_reference`, an implementation independent of
``mmproxy.crc32c`` (most significant bit first, unreflected polynomial), except
for the literal vectors copied from /work/shared/PROTOCOL.md section 5, which
were generated independently and are kept byte for byte.

Addresses are from the documentation ranges (192.0.2.0/24, 198.51.100.0/24,
203.0.113.0/24, 2001:db8::/32) plus the all-zero, all-one and loopback extremes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from mmproxy.errors import Reason
from mmproxy.protocol import Command, Family, InetAddress, ProxyHeader, Transport, UnixAddress
from mmproxy.tlv import (
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
)

# ----------------------------------------------------------------- vector types


@dataclass(frozen=True)
class Valid:
    """A header that must parse.  ``data`` may carry payload after the header."""

    id: str
    data: bytes
    header: ProxyHeader
    consumed: int
    # encode(header) gives back data[:consumed] exactly (no junk, canonical text).
    canonical: bool

    @property
    def version(self) -> int:
        return 1 if self.data[:1] == b"P" else 2


@dataclass(frozen=True)
class Invalid:
    """Bytes that must be refused with ``reason`` when fed whole.

    ``reject_at``, when set, is the length of the shortest prefix that must
    already be refused (early rejection): no byte after it may be waited for.
    """

    id: str
    data: bytes
    reason: Reason
    reject_at: int | None = None


def ok(
    vector_id: str,
    header_bytes: bytes,
    header: ProxyHeader,
    *,
    payload: bytes = b"",
    canonical: bool = True,
) -> Valid:
    return Valid(vector_id, header_bytes + payload, header, len(header_bytes), canonical)


def bad(vector_id: str, data: bytes, reason: Reason, reject_at: int | None = None) -> Invalid:
    return Invalid(vector_id, data, reason, reject_at)


# ----------------------------------------------------------------- CRC32C


def _reflect(value: int, width: int) -> int:
    out = 0
    for _ in range(width):
        out = (out << 1) | (value & 1)
        value >>= 1
    return out


def crc32c_reference(data: bytes | bytearray | memoryview) -> int:
    """CRC32C bit by bit, MSB first with the unreflected polynomial 0x1EDC6F41.

    The Castagnoli CRC is defined on reflected data (RFC 4960 appendix B), so
    each input byte and the final register are bit-reversed.  Deliberately
    unlike the table-driven reflected loop in mmproxy.crc32c.
    """
    crc = 0xFFFFFFFF
    for byte in bytes(data):
        crc ^= _reflect(byte, 8) << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1EDC6F41) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return _reflect(crc, 32) ^ 0xFFFFFFFF


# ----------------------------------------------------------------- builders

SIG = bytes.fromhex("0d 0a 0d 0a 00 0d 0a 51 55 49 54 0a")  # \r\n\r\n\0\r\nQUIT\n
CRLF = b"\r\n"


def h(spaced_hex: str) -> bytes:
    """Bytes from hex written with any spaces, e.g. ``h("c0 00 02 01")``."""
    return bytes.fromhex(spaced_hex)


def line(text: str) -> bytes:
    """A v1 line from ASCII text, CRLF appended."""
    return text.encode("ascii") + CRLF


def v2(ver_cmd: int, fam: int, body: bytes = b"", *, length: int | None = None) -> bytes:
    """Signature, ver_cmd, fam, len (defaults to len(body)) and body."""
    size = len(body) if length is None else length
    return SIG + bytes([ver_cmd, fam]) + size.to_bytes(2, "big") + body


def tlv(code: int, value: bytes = b"", *, length: int | None = None) -> bytes:
    """One TLV: type, big-endian length (defaults to len(value)), value."""
    size = len(value) if length is None else length
    return bytes([code]) + size.to_bytes(2, "big") + value


def ssl_value(client: int, verify: int, *subs: bytes) -> bytes:
    """The value of a PP2_TYPE_SSL TLV: client u8, verify u32be, sub-TLVs."""
    return bytes([client]) + verify.to_bytes(4, "big") + b"".join(subs)


def inet4(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + sport.to_bytes(2, "big")
        + dport.to_bytes(2, "big")
    )


def inet6(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + sport.to_bytes(2, "big")
        + dport.to_bytes(2, "big")
    )


def unix(src: bytes, dst: bytes) -> bytes:
    """Two 108-byte NUL-padded unix paths."""
    return src.ljust(108, b"\0") + dst.ljust(108, b"\0")


def with_crc(
    ver_cmd: int, fam: int, block: bytes, before: bytes = b"", after: bytes = b"", *, xor: int = 0
) -> tuple[bytes, Crc32c]:
    """A v2 header whose TLV area is ``before`` + CRC32C + ``after``.

    The checksum is computed over the header with its own 4 bytes zeroed and
    then XORed with ``xor`` (non-zero to corrupt it).  Returns the bytes and
    the Crc32c TLV the parser must report.
    """
    zeroed = v2(ver_cmd, fam, block + before + tlv(0x03, bytes(4)) + after)
    at = 16 + len(block) + len(before) + 3
    checksum = crc32c_reference(zeroed) ^ xor
    return zeroed[:at] + checksum.to_bytes(4, "big") + zeroed[at + 4 :], Crc32c(checksum)


def first(data: bytes, marker: bytes) -> int:
    """Length of the shortest prefix of ``data`` that ends with ``marker``."""
    return data.index(marker) + len(marker)


def bad_at(vector_id: str, data: bytes, reason: Reason, marker: bytes, extra: int = 0) -> Invalid:
    """An invalid vector that must be refused once ``marker`` (and ``extra`` more bytes) arrived."""
    return Invalid(vector_id, data, reason, first(data, marker) + extra)


# ----------------------------------------------------------------- expected headers

V1_UNKNOWN = ProxyHeader(1, Command.PROXY, Family.UNSPEC, Transport.UNSPEC)


def v1_proxy(src: str, dst: str, sport: int, dport: int) -> ProxyHeader:
    """Arguments in the order of the v1 line: addresses, then ports."""
    return ProxyHeader.proxy(InetAddress.of(src, sport), InetAddress.of(dst, dport), version=1)


def v2_proxy(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    *,
    transport: Transport = Transport.STREAM,
    tlvs: tuple[Tlv, ...] = (),
) -> ProxyHeader:
    return ProxyHeader.proxy(
        InetAddress.of(src, sport), InetAddress.of(dst, dport), transport=transport, tlvs=tlvs
    )


def v2_unix(
    src: bytes, dst: bytes, *, transport: Transport = Transport.STREAM, tlvs: tuple[Tlv, ...] = ()
) -> ProxyHeader:
    return ProxyHeader(
        2, Command.PROXY, Family.UNIX, transport, UnixAddress(src), UnixAddress(dst), tlvs
    )


def v2_unspec(tlvs: tuple[Tlv, ...] = ()) -> ProxyHeader:
    return ProxyHeader(2, Command.PROXY, Family.UNSPEC, Transport.UNSPEC, tlvs=tlvs)


def v2_local(tlvs: tuple[Tlv, ...] = ()) -> ProxyHeader:
    return ProxyHeader.local(tlvs=tlvs)


# ================================================================= v1, valid

TCP4_LINE = "PROXY TCP4 192.0.2.1 198.51.100.7 56324 443"
TCP6_LINE = "PROXY TCP6 2001:db8::1 2001:db8::2 40000 8443"
FFFF = ":".join(["ffff"] * 8)  # 39 characters, the longest plain IPv6 text
FFFF_V4 = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"  # 45, the longest IPv6 text
HTTP_REQUEST = b"GET / HTTP/1.0\r\nHost: example.com\r\n\r\n"

V1_VALID: list[Valid] = [
    # PROTOCOL.md 5.1
    ok("v1-ok-4", line(TCP4_LINE), v1_proxy("192.0.2.1", "198.51.100.7", 56324, 443)),
    ok("v1-ok-6", line(TCP6_LINE), v1_proxy("2001:db8::1", "2001:db8::2", 40000, 8443)),
    ok(
        "v1-ok-6max",
        line(f"PROXY TCP6 {FFFF} {FFFF} 65535 65535"),
        v1_proxy(FFFF, FFFF, 65535, 65535),
    ),
    ok("v1-unk-short", line("PROXY UNKNOWN"), V1_UNKNOWN),
    ok(
        "v1-unk-max",
        line(f"PROXY UNKNOWN {FFFF} {FFFF} 65535 65535"),
        V1_UNKNOWN,
        canonical=False,
    ),
    ok("v1-unk-junk", line("PROXY UNKNOWN whatever here"), V1_UNKNOWN, canonical=False),
    ok(
        "v1-payload",
        line(TCP4_LINE),
        v1_proxy("192.0.2.1", "198.51.100.7", 56324, 443),
        payload=HTTP_REQUEST,
    ),
    ok("v1-port0", line("PROXY TCP4 0.0.0.0 0.0.0.0 0 0"), v1_proxy("0.0.0.0", "0.0.0.0", 0, 0)),
    # TCP4: octets and ports at every digit-count boundary
    ok(
        "v1-tcp4-max",
        line("PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535"),
        v1_proxy("255.255.255.255", "255.255.255.255", 65535, 65535),
    ),
    ok(
        "v1-tcp4-loopback",
        line("PROXY TCP4 127.0.0.1 127.0.0.1 1 2"),
        v1_proxy("127.0.0.1", "127.0.0.1", 1, 2),
    ),
    ok(
        "v1-tcp4-octets-9-10",
        line("PROXY TCP4 192.0.2.9 192.0.2.10 9 10"),
        v1_proxy("192.0.2.9", "192.0.2.10", 9, 10),
    ),
    ok(
        "v1-tcp4-octets-99-100",
        line("PROXY TCP4 198.51.100.99 198.51.100.100 99 100"),
        v1_proxy("198.51.100.99", "198.51.100.100", 99, 100),
    ),
    ok(
        "v1-tcp4-octets-199-200",
        line("PROXY TCP4 203.0.113.199 203.0.113.200 999 1000"),
        v1_proxy("203.0.113.199", "203.0.113.200", 999, 1000),
    ),
    ok(
        "v1-tcp4-octets-249-250",
        line("PROXY TCP4 192.0.2.249 192.0.2.250 9999 10000"),
        v1_proxy("192.0.2.249", "192.0.2.250", 9999, 10000),
    ),
    ok(
        "v1-tcp4-octet-255-port-65534",
        line("PROXY TCP4 192.0.2.255 203.0.113.0 65534 65535"),
        v1_proxy("192.0.2.255", "203.0.113.0", 65534, 65535),
    ),
    ok(
        "v1-tcp4-same-ports",
        line("PROXY TCP4 203.0.113.5 203.0.113.5 443 443"),
        v1_proxy("203.0.113.5", "203.0.113.5", 443, 443),
    ),
    # TCP6 in its many text forms
    ok(
        "v1-tcp6-full",
        line(
            "PROXY TCP6 2001:0db8:0000:0000:0000:0000:0000:0001"
            " 2001:0db8:0000:0000:0000:0000:0000:0002 40000 8443"
        ),
        v1_proxy("2001:db8::1", "2001:db8::2", 40000, 8443),
        canonical=False,
    ),
    ok(
        "v1-tcp6-upper",
        line("PROXY TCP6 2001:DB8::1 2001:DB8::ABCD 40000 8443"),
        v1_proxy("2001:db8::1", "2001:db8::abcd", 40000, 8443),
        canonical=False,
    ),
    ok(
        "v1-tcp6-mixed-case",
        line("PROXY TCP6 2001:dB8:AbCd::eF01 2001:Db8::fFfF 1 2"),
        v1_proxy("2001:db8:abcd::ef01", "2001:db8::ffff", 1, 2),
        canonical=False,
    ),
    ok(
        "v1-tcp6-mapped-v4",
        line("PROXY TCP6 ::ffff:192.0.2.1 ::ffff:198.51.100.7 56324 443"),
        v1_proxy("::ffff:c000:201", "::ffff:c633:6407", 56324, 443),
        canonical=True,  # the encoder writes mapped addresses in mixed notation (RFC 5952)
    ),
    ok(
        "v1-tcp6-compat-v4",
        line("PROXY TCP6 ::192.0.2.1 ::203.0.113.9 1 2"),
        v1_proxy("::c000:201", "::cb00:7109", 1, 2),
        canonical=False,
    ),
    ok(
        "v1-tcp6-six-groups-v4",
        line("PROXY TCP6 2001:db8:0:0:0:0:192.0.2.1 2001:db8:1:2:3:4:198.51.100.7 1 2"),
        v1_proxy("2001:db8::c000:201", "2001:db8:1:2:3:4:c633:6407", 1, 2),
        canonical=False,
    ),
    ok("v1-tcp6-unspecified", line("PROXY TCP6 :: :: 0 0"), v1_proxy("::", "::", 0, 0)),
    ok("v1-tcp6-loopback", line("PROXY TCP6 ::1 ::1 1 65535"), v1_proxy("::1", "::1", 1, 65535)),
    ok(
        "v1-tcp6-trailing-dcolon",
        line("PROXY TCP6 2001:db8:: 2001:db8:1:: 80 443"),
        v1_proxy("2001:db8::", "2001:db8:1::", 80, 443),
    ),
    ok(
        "v1-tcp6-dcolon-one-group",
        line("PROXY TCP6 2001:db8:1:2:3:4:5:: 2001:db8::2:3:4:5:6 80 443"),
        v1_proxy("2001:db8:1:2:3:4:5:0", "2001:db8:0:2:3:4:5:6", 80, 443),
        canonical=False,
    ),
    ok(
        "v1-tcp6-short-groups",
        line("PROXY TCP6 2001:db8:0:0:1:0:0:1 2001:db8:a:b:c:d:e:f 80 443"),
        v1_proxy("2001:db8::1:0:0:1", "2001:db8:a:b:c:d:e:f", 80, 443),
        canonical=False,
    ),
    ok(
        "v1-tcp6-zero-padded-groups",
        line("PROXY TCP6 2001:0db8::0001 2001:0db8:0000::000a 80 443"),
        v1_proxy("2001:db8::1", "2001:db8::a", 80, 443),
        canonical=False,
    ),
    ok(
        "v1-tcp6-107",  # the longest line the cap allows: 45 + 36 address characters
        line(f"PROXY TCP6 {FFFF_V4} ffff:ffff:ffff:ffff:ffff:ffff:ffff:: 65535 65535"),
        v1_proxy(FFFF, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:0", 65535, 65535),
        canonical=False,
    ),
    # UNKNOWN: anything (but CRLF) may follow, up to 107 bytes in all
    ok("v1-unk-space", line("PROXY UNKNOWN "), V1_UNKNOWN, canonical=False),
    ok(
        "v1-unk-tcp4-fields",
        line("PROXY UNKNOWN 192.0.2.1 198.51.100.7 56324 443"),
        V1_UNKNOWN,
        canonical=False,
    ),
    ok(
        "v1-unk-107-junk",
        b"PROXY UNKNOWN " + b"a" * 91 + CRLF,
        V1_UNKNOWN,
        canonical=False,
    ),
    ok(
        "v1-unk-binary",
        b"PROXY UNKNOWN \x00\xff\t\x7f bare\ncr\rend" + CRLF,
        V1_UNKNOWN,
        canonical=False,
    ),
    # payload handling: consumed stops at the first CRLF
    ok(
        "v1-payload-crlf",
        line(TCP4_LINE),
        v1_proxy("192.0.2.1", "198.51.100.7", 56324, 443),
        payload=b"\r\n\r\n",
    ),
    ok(
        "v1-payload-second-header",
        line("PROXY UNKNOWN"),
        V1_UNKNOWN,
        payload=line(TCP4_LINE),
    ),
    ok(
        "v1-payload-v2-signature",
        line(TCP6_LINE),
        v1_proxy("2001:db8::1", "2001:db8::2", 40000, 8443),
        payload=SIG + b"\x21\x11\x00\x0c",
    ),
    ok(
        "v1-payload-binary",
        line("PROXY TCP4 203.0.113.7 192.0.2.200 65535 0"),
        v1_proxy("203.0.113.7", "192.0.2.200", 65535, 0),
        payload=bytes(range(256)),
    ),
]


# ================================================================= v1, invalid

OK4 = line(TCP4_LINE)
R = Reason


def _v1_swap(old: str, new: str, text: str = TCP4_LINE) -> bytes:
    """TCP4_LINE (or ``text``) with ``old`` replaced once by ``new``, CRLF appended."""
    assert old in text
    return line(text.replace(old, new, 1))


V1_INVALID: list[Invalid] = [
    # V1-1: the 5-byte keyword, case-sensitive; other first bytes fail at once
    bad("v1-lower", b"proxy" + OK4[5:], R.NOT_PROXY_PROTOCOL, reject_at=1),
    bad("v1-capitalised", b"Proxy" + OK4[5:], R.NOT_PROXY_PROTOCOL, reject_at=2),
    bad("v1-PROXy", b"PROXy" + OK4[5:], R.NOT_PROXY_PROTOCOL, reject_at=5),
    bad("v1-PROXZ", b"PROXZ" + OK4[5:], R.NOT_PROXY_PROTOCOL, reject_at=5),
    bad("v1-PRO-crlf", b"PRO\r\n", R.NOT_PROXY_PROTOCOL, reject_at=4),
    bad("v1-P-crlf", b"P\r\n", R.NOT_PROXY_PROTOCOL, reject_at=2),
    bad("v1-leading-space", b" " + OK4, R.NOT_PROXY_PROTOCOL, reject_at=1),
    bad("v1-leading-crlf", b"\r\n" + OK4, R.NOT_PROXY_PROTOCOL, reject_at=3),
    bad("v1-leading-tab", b"\t" + OK4, R.NOT_PROXY_PROTOCOL, reject_at=1),
    # V1-2: exactly one space between tokens
    bad("v1-no-space", b"PROXYTCP4" + OK4[10:], R.V1_BAD_SYNTAX, reject_at=6),
    bad("v1-tab-after-proxy", b"PROXY\tTCP4" + OK4[10:], R.V1_BAD_SYNTAX, reject_at=6),
    bad("v1-nul-after-proxy", b"PROXY\x00TCP4" + OK4[10:], R.V1_BAD_SYNTAX, reject_at=6),
    bad("v1-2sp", b"PROXY  TCP4" + OK4[10:], R.V1_BAD_SYNTAX, reject_at=7),
    bad("v1-proxy-crlf", b"PROXY\r\n", R.V1_BAD_SYNTAX, reject_at=7),
    bad("v1-proxy-space-crlf", b"PROXY \r\n", R.V1_BAD_SYNTAX, reject_at=8),
    bad("v1-2sp-after-token", _v1_swap("TCP4 ", "TCP4  "), R.V1_BAD_SYNTAX),
    bad_at(
        "v1-2sp-between-addresses",
        _v1_swap(".1 ", ".1  "),
        R.V1_BAD_SYNTAX,
        b"  ",
    ),
    bad_at(
        "v1-2sp-between-ports",
        _v1_swap("56324 ", "56324  "),
        R.V1_BAD_SYNTAX,
        b"  ",
    ),
    bad_at(
        "v1-trailsp",
        line(TCP4_LINE + " "),
        R.V1_BAD_SYNTAX,
        b"443 ",
    ),
    bad_at("v1-trailing-2sp", line(TCP6_LINE + "  "), R.V1_BAD_SYNTAX, b"8443 "),
    bad_at(
        "v1-tab-between-addresses",
        _v1_swap(".1 ", ".1\t"),
        R.V1_BAD_SYNTAX,
        b"\t",
    ),
    bad_at(
        "v1-tab-before-crlf",
        line(TCP4_LINE + "\t"),
        R.V1_BAD_SYNTAX,
        b"\t",
    ),
    # V1-9: CRLF only; a bare LF or CR is no terminator
    bad_at("v1-lf", TCP4_LINE.encode() + b"\n", R.V1_BAD_SYNTAX, b"\n"),
    bad("v1-lf-then-request", TCP4_LINE.encode() + b"\n" + HTTP_REQUEST, R.V1_BAD_SYNTAX),
    bad("v1-lf-cr", TCP4_LINE.encode() + b"\n\r", R.V1_BAD_SYNTAX, reject_at=len(OK4) - 1),
    bad("v1-cr-cr-lf", TCP4_LINE.encode() + b"\r\r\n", R.V1_BAD_SYNTAX, reject_at=len(OK4)),
    bad_at(
        "v1-cr-in-line",
        _v1_swap(".1 ", ".1\r"),
        R.V1_BAD_SYNTAX,
        b"\r",
        1,  # a CR is judged with the byte after it
    ),
    bad_at(
        "v1-lf-in-line",
        _v1_swap(".1 ", ".1\n"),
        R.V1_BAD_SYNTAX,
        b"\n",
    ),
    bad("v1-unknown-bare-lf", b"PROXY UNKNOWN\n", R.V1_BAD_PROTOCOL, reject_at=14),
    # V1-3: protocol token
    bad("v1-proto-udp4", _v1_swap("TCP4", "UDP4"), R.V1_BAD_PROTOCOL, reject_at=8),
    bad("v1-proto-udp6", _v1_swap("TCP6", "UDP6", TCP6_LINE), R.V1_BAD_PROTOCOL, reject_at=8),
    bad("v1-proto-tcp4-lower", _v1_swap("TCP4", "tcp4"), R.V1_BAD_PROTOCOL, reject_at=7),
    bad("v1-proto-tcp6-lower", _v1_swap("TCP6", "tcp6", TCP6_LINE), R.V1_BAD_PROTOCOL, reject_at=7),
    bad("v1-proto-Tcp4", _v1_swap("TCP4", "Tcp4"), R.V1_BAD_PROTOCOL, reject_at=8),
    bad("v1-proto-tcp", _v1_swap("TCP4", "TCP"), R.V1_BAD_PROTOCOL, reject_at=10),
    bad("v1-proto-tcp5", _v1_swap("TCP4", "TCP5"), R.V1_BAD_PROTOCOL, reject_at=10),
    bad("v1-proto-tcp46", _v1_swap("TCP4", "TCP46"), R.V1_BAD_PROTOCOL, reject_at=11),
    bad("v1-proto-tcp4-tab", _v1_swap("TCP4 ", "TCP4\t"), R.V1_BAD_PROTOCOL, reject_at=11),
    bad("v1-proto-unknown-lower", line("PROXY unknown"), R.V1_BAD_PROTOCOL, reject_at=7),
    bad("v1-proto-unknownx", line("PROXY UNKNOWNX"), R.V1_BAD_PROTOCOL, reject_at=14),
    bad("v1-proto-unknown-cr-cr", b"PROXY UNKNOWN\r\r\n", R.V1_BAD_PROTOCOL, reject_at=15),
    bad("v1-proto-unk", line("PROXY UNK"), R.V1_BAD_PROTOCOL, reject_at=11),
    bad("v1-proto-nbsp", b"PROXY TCP4\xc2\xa0" + OK4[11:], R.V1_BAD_PROTOCOL, reject_at=11),
    bad("v1-proto-nul", b"PROXY \x00" + OK4[6:], R.V1_BAD_PROTOCOL, reject_at=7),
    # V1-12: token count
    bad("v1-token-only-tcp4", line("PROXY TCP4"), R.V1_BAD_SYNTAX),
    bad("v1-token-only-tcp6", line("PROXY TCP6"), R.V1_BAD_SYNTAX),
    bad("v1-fields-3", line("PROXY TCP4 192.0.2.1 198.51.100.7"), R.V1_BAD_SYNTAX),
    bad("v1-fields-5", line("PROXY TCP4 192.0.2.1 198.51.100.7 56324"), R.V1_BAD_SYNTAX),
    bad_at(
        "v1-fields-7",
        line(TCP4_LINE + " 80"),
        R.V1_BAD_SYNTAX,
        b"443 ",
    ),
    bad("v1-fields-5-tcp6", line("PROXY TCP6 2001:db8::1 2001:db8::2 40000"), R.V1_BAD_SYNTAX),
    # V1-5: dotted quad, four decimal octets 0-255, no leading zeros
    bad("v1-lz-ip", _v1_swap("192.0.2.1", "192.0.2.01"), R.V1_BAD_ADDRESS),
    bad("v1-lz-ip-first", _v1_swap("192.0.2.1", "0192.0.2.1"), R.V1_BAD_ADDRESS),
    bad("v1-lz-ip-dst", _v1_swap("198.51.100.7", "198.051.100.7"), R.V1_BAD_ADDRESS),
    bad("v1-lz-ip-00", _v1_swap("192.0.2.1", "192.00.2.1"), R.V1_BAD_ADDRESS),
    bad("v1-octet-256", _v1_swap("192.0.2.1", "192.0.2.256"), R.V1_BAD_ADDRESS),
    bad("v1-octet-999-dst", _v1_swap("198.51.100.7", "198.51.999.7"), R.V1_BAD_ADDRESS),
    bad("v1-octet-1000", _v1_swap("192.0.2.1", "192.0.2.1000"), R.V1_BAD_ADDRESS),
    bad("v1-ipv4-3-octets", _v1_swap("192.0.2.1", "192.0.2"), R.V1_BAD_ADDRESS),
    bad("v1-ipv4-5-octets", _v1_swap("192.0.2.1", "192.0.2.1.5"), R.V1_BAD_ADDRESS),
    bad("v1-ipv4-3-octets-dst", _v1_swap("198.51.100.7", "198.51.100"), R.V1_BAD_ADDRESS),
    bad("v1-ipv4-trailing-dot", _v1_swap("192.0.2.1", "192.0.2.1."), R.V1_BAD_ADDRESS),
    bad("v1-ipv4-empty-octet", _v1_swap("192.0.2.1", "192.0..1"), R.V1_BAD_ADDRESS),
    bad("v1-ipv4-integer", _v1_swap("192.0.2.1", "3221225985"), R.V1_BAD_ADDRESS),
    bad_at(
        "v1-ipv4-hex",
        _v1_swap("192.0.2.1", "0xc0.0.2.1"),
        R.V1_BAD_ADDRESS,
        b"0x",
    ),
    bad_at(
        "v1-ipv4-plus",
        _v1_swap("192.0.2.1", "+192.0.2.1"),
        R.V1_BAD_ADDRESS,
        b"+",
    ),
    bad_at(
        "v1-ipv4-nul",
        _v1_swap("192.0.2.1", "192.0.2.1\x00"),
        R.V1_BAD_SYNTAX,
        b"\x00",
    ),
    bad_at(
        "v1-ipv4-non-ascii",  # ARABIC-INDIC DIGIT ONE as the last octet
        OK4.replace(b"192.0.2.1", b"192.0.2.\xd9\xa1"),
        R.V1_BAD_ADDRESS,
        b"\xd9",
    ),
    # V1-6: IPv6 text
    bad_at(
        "v1-scope-id",
        _v1_swap("2001:db8::1", "2001:db8::1%eth0", TCP6_LINE),
        R.V1_BAD_ADDRESS,
        b"%",
    ),
    bad_at(
        "v1-scope-id-numeric-dst",
        _v1_swap("2001:db8::2", "2001:db8::2%1", TCP6_LINE),
        R.V1_BAD_ADDRESS,
        b"%",
    ),
    bad(
        "v1-ipv6-two-dcolons",
        _v1_swap("2001:db8::1", "2001:db8::1::2", TCP6_LINE),
        R.V1_BAD_ADDRESS,
    ),
    bad(
        "v1-ipv6-triple-colon", _v1_swap("2001:db8::1", "2001:db8:::1", TCP6_LINE), R.V1_BAD_ADDRESS
    ),
    bad(
        "v1-ipv6-9-groups",
        _v1_swap("2001:db8::1", "2001:db8:1:2:3:4:5:6:7", TCP6_LINE),
        R.V1_BAD_ADDRESS,
    ),
    bad(
        "v1-ipv6-7-groups",
        _v1_swap("2001:db8::2", "2001:db8:1:2:3:4:5", TCP6_LINE),
        R.V1_BAD_ADDRESS,
    ),
    bad(
        "v1-ipv6-5-digit-group",
        _v1_swap("2001:db8::1", "2001:0db80::1", TCP6_LINE),
        R.V1_BAD_ADDRESS,
    ),
    bad(
        "v1-ipv6-leading-colon",
        _v1_swap("2001:db8::1", ":2001:db8::1", TCP6_LINE),
        R.V1_BAD_ADDRESS,
    ),
    bad(
        "v1-ipv6-trailing-colon",
        _v1_swap("2001:db8::2", "2001:db8::2:", TCP6_LINE),
        R.V1_BAD_ADDRESS,
    ),
    bad("v1-ipv6-single-colon", _v1_swap("2001:db8::1", ":", TCP6_LINE), R.V1_BAD_ADDRESS),
    bad_at(
        "v1-ipv6-bad-hex",
        _v1_swap("2001:db8::1", "2001:db8::g", TCP6_LINE),
        R.V1_BAD_ADDRESS,
        b"g",
    ),
    bad_at(
        "v1-ipv6-brackets",
        _v1_swap("2001:db8::1", "[2001:db8::1]", TCP6_LINE),
        R.V1_BAD_ADDRESS,
        b"[",
    ),
    bad(
        "v1-ipv6-v4-leading-zero",
        _v1_swap("2001:db8::1", "::ffff:192.0.2.01", TCP6_LINE),
        R.V1_BAD_ADDRESS,
    ),
    bad(
        "v1-ipv6-v4-not-last", _v1_swap("2001:db8::1", "::192.0.2.1:1", TCP6_LINE), R.V1_BAD_ADDRESS
    ),
    bad(
        "v1-ipv6-v4-9-words",
        _v1_swap("2001:db8::1", f"{FFFF}:192.0.2.1", TCP6_LINE),
        R.V1_BAD_ADDRESS,
    ),
    # V1-7: family must match the token, on each side
    bad("v1-fam-tcp4-src6", line("PROXY TCP4 2001:db8::1 198.51.100.7 1 2"), R.V1_BAD_ADDRESS),
    bad("v1-fam-tcp4-dst6", line("PROXY TCP4 192.0.2.1 2001:db8::2 1 2"), R.V1_BAD_ADDRESS),
    bad("v1-fam-tcp6-src4", line("PROXY TCP6 192.0.2.1 2001:db8::2 1 2"), R.V1_BAD_ADDRESS),
    bad("v1-fam-tcp6-dst4", line("PROXY TCP6 2001:db8::1 198.51.100.7 1 2"), R.V1_BAD_ADDRESS),
    bad("v1-fam-tcp6-both4", line("PROXY TCP6 192.0.2.1 198.51.100.7 1 2"), R.V1_BAD_ADDRESS),
    # V1-8: ports 0-65535 in plain decimal
    bad("v1-lz-port-src", _v1_swap("56324", "056324"), R.V1_BAD_PORT),
    bad("v1-lz-port-dst", _v1_swap(" 443", " 0443"), R.V1_BAD_PORT),
    bad("v1-lz-port-00", _v1_swap(" 443", " 00"), R.V1_BAD_PORT),
    bad("v1-port-65536", _v1_swap("56324", "65536"), R.V1_BAD_PORT),
    bad("v1-port-99999-dst", _v1_swap(" 443", " 99999"), R.V1_BAD_PORT),
    bad("v1-port-100000", _v1_swap("56324", "100000"), R.V1_BAD_PORT),
    bad_at(
        "v1-port-plus",
        _v1_swap(" 443", " +443"),
        R.V1_BAD_PORT,
        b"+",
    ),
    bad_at(
        "v1-port-minus",
        _v1_swap("56324", "-1"),
        R.V1_BAD_PORT,
        b"-",
    ),
    bad_at(
        "v1-port-underscore",
        _v1_swap("56324", "56_324"),
        R.V1_BAD_PORT,
        b"_",
    ),
    bad_at("v1-port-hex", _v1_swap(" 443", " 0x1bb"), R.V1_BAD_PORT, b" 0x"),
    bad("v1-port-hex-letters", _v1_swap(" 443", " 1bb"), R.V1_BAD_PORT),
    bad_at(
        "v1-port-fullwidth",  # FULLWIDTH DIGITS FOUR, FOUR, THREE
        OK4.replace(b" 443", " \uff14\uff14\uff13".encode()),
        R.V1_BAD_PORT,
        b" \xef",
    ),
    bad("v1-port-dotted", _v1_swap(" 443", " 4.43"), R.V1_BAD_PORT),
    bad("v1-port-colon", _v1_swap(" 443", " :443"), R.V1_BAD_PORT),
    # V1-10: no CRLF within the first 107 bytes
    bad("v1-long", b"PROXY UNKNOWN " + b"a" * 93 + CRLF, R.V1_TOO_LONG, reject_at=107),
    bad("v1-long-108", b"PROXY UNKNOWN " + b"a" * 92 + CRLF, R.V1_TOO_LONG, reject_at=107),
    bad(
        "v1-long-tcp6-108",  # both addresses valid, but the line is one byte over the cap
        line(f"PROXY TCP6 {FFFF_V4} ffff:ffff:ffff:ffff:ffff:ffff:0.0.0.0 65535 65535"),
        R.V1_TOO_LONG,
        reject_at=107,
    ),
    bad(
        "v1-long-tcp6-116",
        line(f"PROXY TCP6 {FFFF_V4} {FFFF_V4} 65535 65535"),
        R.V1_TOO_LONG,
        reject_at=107,
    ),
    bad("v1-no-crlf-200", b"PROXY UNKNOWN " + b"x" * 186, R.V1_TOO_LONG, reject_at=107),
    bad("v1-unknown-lf-only-200", b"PROXY UNKNOWN " + b"\n" * 186, R.V1_TOO_LONG, reject_at=107),
    # Other protocols sent to a PROXY listener
    bad("not-http", HTTP_REQUEST, R.NOT_PROXY_PROTOCOL, reject_at=1),
    bad("not-ssh", b"SSH-2.0-OpenSSH_9.6\r\n", R.NOT_PROXY_PROTOCOL, reject_at=1),
    bad("not-tls", h("16 03 01 00 f4 01 00 00 f0 03 03"), R.NOT_PROXY_PROTOCOL, reject_at=1),
    bad("not-nul", b"\x00" * 16, R.NOT_PROXY_PROTOCOL, reject_at=1),
    bad("not-lf", b"\n", R.NOT_PROXY_PROTOCOL, reject_at=1),
    bad("not-ff", b"\xff" * 20, R.NOT_PROXY_PROTOCOL, reject_at=1),
]


# ================================================================= v2, valid

BLOCK4 = inet4("192.0.2.1", "198.51.100.7", 56324, 443)
BLOCK6 = inet6("2001:db8::1", "2001:db8::2", 40000, 8443)
PATH_A = b"/run/haproxy/client.sock"
PATH_B = b"/run/app/backend.sock"
BLOCK_UNIX = unix(PATH_A, PATH_B)


def tcp4(*tlvs: Tlv) -> ProxyHeader:
    """The expected header of the PROTOCOL.md addresses, 192.0.2.1:56324 -> 198.51.100.7:443."""
    return v2_proxy("192.0.2.1", "198.51.100.7", 56324, 443, tlvs=tlvs)


def tcp4_with(*tlv_bytes: bytes) -> bytes:
    """A PROXY TCP4 header with BLOCK4 and the given encoded TLVs."""
    return v2(0x21, 0x11, BLOCK4 + b"".join(tlv_bytes))


SSL_ALL = ssl_value(
    0x07,
    0,
    tlv(0x21, b"TLSv1.3"),
    tlv(0x22, b"client.example"),
    tlv(0x23, b"TLS_AES_128_GCM_SHA256"),
    tlv(0x24, b"RSA-SHA256"),
    tlv(0x25, b"RSA2048"),
)
SSL_ALL_TLV = Ssl(
    0x07,
    0,
    (
        SslString(0x21, "TLSv1.3"),
        SslString(0x22, "client.example"),
        SslString(0x23, "TLS_AES_128_GCM_SHA256"),
        SslString(0x24, "RSA-SHA256"),
        SslString(0x25, "RSA2048"),
    ),
)
UNKNOWN_CODES = [0x00, 0x06, 0x1F, 0x21, 0x25, 0x31, 0xE1, 0xE9, 0xEF, 0xF0, 0xF7, 0xF8, 0xFF]
MAX_NOOP = 0xFFFF - 12 - 3  # fills a TCP4 header's body to 65535 bytes


def _crc_vectors() -> list[Valid]:
    vectors = []
    data, crc = with_crc(0x21, 0x11, BLOCK4)
    vectors.append(ok("v2-crc-computed", data, tcp4(crc)))
    data, crc = with_crc(0x21, 0x11, BLOCK4, tlv(0x01, b"h2") + tlv(0x02, b"example.com"))
    vectors.append(ok("v2-crc-last", data, tcp4(Alpn(b"h2"), Authority("example.com"), crc)))
    data, crc = with_crc(0x21, 0x11, BLOCK4, b"", tlv(0x01, b"h2") + tlv(0x04, bytes(5)))
    vectors.append(ok("v2-crc-first", data, tcp4(crc, Alpn(b"h2"), Noop(bytes(5)))))
    data, crc = with_crc(0x21, 0x11, BLOCK4, tlv(0xE1, b"x"), tlv(0x20, SSL_ALL))
    vectors.append(ok("v2-crc-middle", data, tcp4(UnknownTlv(0xE1, b"x"), crc, SSL_ALL_TLV)))
    data, crc = with_crc(0x21, 0x11, BLOCK4)
    vectors.append(ok("v2-crc-payload", data, tcp4(crc), payload=b"payload not covered"))
    data, crc = with_crc(0x21, 0x21, BLOCK6, tlv(0x05, b"conn-1"))
    header = v2_proxy("2001:db8::1", "2001:db8::2", 40000, 8443, tlvs=(UniqueId(b"conn-1"), crc))
    vectors.append(ok("v2-crc-tcp6", data, header))
    data, crc = with_crc(0x21, 0x12, inet4("203.0.113.5", "198.51.100.7", 5353, 53))
    header = v2_proxy(
        "203.0.113.5", "198.51.100.7", 5353, 53, transport=Transport.DGRAM, tlvs=(crc,)
    )
    vectors.append(ok("v2-crc-udp4", data, header, payload=b"hello"))
    data, crc = with_crc(0x21, 0x31, BLOCK_UNIX)
    vectors.append(ok("v2-crc-unix", data, v2_unix(PATH_A, PATH_B, tlvs=(crc,))))
    data, crc = with_crc(0x21, 0x00, b"", tlv(0x04))
    vectors.append(ok("v2-crc-unspec", data, v2_unspec((Noop(), crc))))
    data, crc = with_crc(0x20, 0x00, b"")
    vectors.append(ok("v2-crc-local", data, v2_local((crc,))))
    data, crc = with_crc(0x20, 0x11, BLOCK4, tlv(0x02, b"lb.example"))
    vectors.append(
        ok("v2-crc-local-inet", data, v2_local((Authority("lb.example"), crc)), canonical=False)
    )
    data, crc = with_crc(0x21, 0x11, BLOCK4, b"", tlv(0x04, bytes(MAX_NOOP - 7)))
    vectors.append(ok("v2-crc-max-body", data, tcp4(crc, Noop(bytes(MAX_NOOP - 7)))))
    return vectors


V2_VALID: list[Valid] = [
    # PROTOCOL.md 5.3, literal bytes
    ok(
        "v2-tcp4",
        h("0d0a0d0a000d0a515549540a 21 11 000c c0000201 c6336407 dc04 01bb"),
        tcp4(),
    ),
    ok(
        "v2-tcp6",
        h(
            "0d0a0d0a000d0a515549540a 21 21 0024 20010db8000000000000000000000001"
            " 20010db8000000000000000000000002 9c40 20fb"
        ),
        v2_proxy("2001:db8::1", "2001:db8::2", 40000, 8443),
    ),
    ok("v2-local", h("0d0a0d0a000d0a515549540a 20 00 0000"), v2_local()),
    ok(
        "v2-local-addr",
        h("0d0a0d0a000d0a515549540a 20 11 000c c0000201 c6336407 dc04 01bb"),
        v2_local(),
        canonical=False,
    ),
    ok("v2-unspec", h("0d0a0d0a000d0a515549540a 21 00 0000"), v2_unspec()),
    ok(
        "v2-udp4",
        h("0d0a0d0a000d0a515549540a 21 12 000c cb007105 c6336407 14e9 0035"),
        v2_proxy("203.0.113.5", "198.51.100.7", 5353, 53, transport=Transport.DGRAM),
        payload=h("68656c6c6f"),
    ),
    ok(
        "v2-tlv",
        h(
            "0d0a0d0a000d0a515549540a 21 11 0025 c0000201c6336407dc0401bb 01 0002 6832"
            " 02 000b 6578616d706c652e636f6d 04 0003 000000"
        ),
        tcp4(Alpn(b"h2"), Authority("example.com"), Noop(bytes(3))),
    ),
    ok(
        "v2-crc",
        h("0d0a0d0a000d0a515549540a 21 11 0013 c0000201c6336407dc0401bb 03 0004 d45a11b9"),
        tcp4(Crc32c(0xD45A11B9)),
    ),
    ok(
        "v2-ssl",
        h(
            "0d0a0d0a000d0a515549540a 21 11 002c c0000201c6336407dc0401bb 20 001d 07 00000000"
            " 21 0007 544c5376312e33 22 000b 6578616d706c652e636f6d"
        ),
        tcp4(Ssl(0x07, 0, (SslString(0x21, "TLSv1.3"), SslString(0x22, "example.com")))),
    ),
    ok(
        "v2-aws",
        h(
            "0d0a0d0a000d0a515549540a 21 11 0026 c0000201c6336407dc0401bb"
            " ea 0017 01 767063652d3031323334353637383961626364656630"
        ),
        tcp4(AwsVpceId("vpce-0123456789abcdef0")),
    ),
    ok(
        "v2-azure",
        h("0d0a0d0a000d0a515549540a 21 11 0014 c0000201c6336407dc0401bb ee 0005 01 01450021"),
        tcp4(AzureLinkId(0x21004501)),
    ),
    ok(
        "v2-gcp",
        h("0d0a0d0a000d0a515549540a 21 11 0017 c0000201c6336407dc0401bb e0 0008 009b34d70a003c64"),
        tcp4(GcpPscConnectionId(0x009B34D70A003C64)),
    ),
    ok(
        "v2-unix",
        h("0d0a0d0a000d0a515549540a 21 31 00d8") + BLOCK_UNIX,
        v2_unix(PATH_A, PATH_B),
    ),
    # every family/transport combination
    ok(
        "v2-udp6",
        v2(0x21, 0x22, inet6("2001:db8:1::53", "2001:db8:2::53", 5353, 53)),
        v2_proxy("2001:db8:1::53", "2001:db8:2::53", 5353, 53, transport=Transport.DGRAM),
        payload=b"\x00\x01dns",
    ),
    ok(
        "v2-unix-dgram",
        v2(0x21, 0x32, unix(b"/run/a", b"/run/b")),
        v2_unix(b"/run/a", b"/run/b", transport=Transport.DGRAM),
    ),
    ok(
        "v2-unix-108",
        v2(0x21, 0x31, unix(b"/" + b"a" * 107, b"/" + b"b" * 107)),
        v2_unix(b"/" + b"a" * 107, b"/" + b"b" * 107),
    ),
    ok("v2-unix-empty", v2(0x21, 0x31, unix(b"", b"")), v2_unix(b"", b"")),
    ok(
        "v2-unix-abstract-bytes",  # not UTF-8; junk after the first NUL is dropped
        v2(0x21, 0x31, b"/tmp/\xff\xfe".ljust(108, b"\0") + b"/x\0junk".ljust(108, b"\0")),
        v2_unix(b"/tmp/\xff\xfe", b"/x"),
        canonical=False,
    ),
    ok(
        "v2-tcp4-extremes",
        v2(0x21, 0x11, inet4("0.0.0.0", "255.255.255.255", 0, 65535)),
        v2_proxy("0.0.0.0", "255.255.255.255", 0, 65535),
    ),
    ok(
        "v2-tcp4-loopback",
        v2(0x21, 0x11, inet4("127.0.0.1", "127.0.0.1", 1, 2)),
        v2_proxy("127.0.0.1", "127.0.0.1", 1, 2),
    ),
    ok(
        "v2-tcp6-extremes",
        v2(0x21, 0x21, inet6("::", FFFF, 65535, 0)),
        v2_proxy("::", FFFF, 65535, 0),
    ),
    ok(
        "v2-tcp6-mapped",
        v2(0x21, 0x21, inet6("::ffff:192.0.2.1", "::1", 56324, 443)),
        v2_proxy("::ffff:192.0.2.1", "::1", 56324, 443),
    ),
    ok(
        "v2-udp4-extremes",
        v2(0x21, 0x12, inet4("255.255.255.255", "0.0.0.0", 65535, 0)),
        v2_proxy("255.255.255.255", "0.0.0.0", 65535, 0, transport=Transport.DGRAM),
    ),
    # PROXY + UNSPEC: accepted without addresses; a body is read as TLVs
    ok(
        "v2-unspec-tlvs",
        v2(0x21, 0x00, tlv(0x04, b"pad") + tlv(0x01, b"h2")),
        v2_unspec((Noop(b"pad"), Alpn(b"h2"))),
    ),
    # LOCAL: family and address block ignored
    ok(
        "v2-local-inet6-block",
        v2(0x20, 0x21, BLOCK6),
        v2_local(),
        canonical=False,
    ),
    ok("v2-local-udp4-block", v2(0x20, 0x12, BLOCK4), v2_local(), canonical=False),
    ok("v2-local-unix-block", v2(0x20, 0x31, BLOCK_UNIX), v2_local(), canonical=False),
    ok("v2-local-fam-41", v2(0x20, 0x41), v2_local(), canonical=False),
    ok(
        "v2-local-fam-ff-junk",
        v2(0x20, 0xFF, h("de ad be ef 01 02 03")),
        v2_local(),
        canonical=False,
    ),
    ok("v2-local-fam-10", v2(0x20, 0x10, BLOCK4), v2_local(), canonical=False),
    ok("v2-local-fam-01", v2(0x20, 0x01), v2_local(), canonical=False),
    ok(
        "v2-local-fam-13-bad-tlv",
        v2(0x20, 0x13, BLOCK4 + tlv(0x01, length=9)),
        v2_local(),
        canonical=False,
    ),
    ok("v2-local-inet-short", v2(0x20, 0x11, BLOCK4[:4]), v2_local(), canonical=False),
    # LOCAL impersonates nobody, so whatever follows its fixed part is skipped
    # when it does not parse as TLVs: AWS-style dummy addresses sent under fam
    # 0x00 instead of 0x11, a TLV stub, a TLV overrunning the header.
    ok("v2-local-unspec-dummy-block", v2(0x20, 0x00, BLOCK4), v2_local(), canonical=False),
    ok("v2-tlv-stub-local", v2(0x20, 0x00, b"\x04"), v2_local(), canonical=False),
    ok("v2-authority-bad-local", v2(0x20, 0x00, tlv(0x02, b"\xff")), v2_local(), canonical=False),
    ok(
        "v2-tlv-over-local-inet",
        v2(0x20, 0x11, BLOCK4 + tlv(0x01, length=1)),
        v2_local(),
        canonical=False,
    ),
    ok("v2-local-inet-len0", v2(0x20, 0x11), v2_local(), canonical=False),
    ok("v2-local-inet6-len12", v2(0x20, 0x21, BLOCK4), v2_local(), canonical=False),
    ok(
        "v2-local-tlvs",
        v2(0x20, 0x00, tlv(0x02, b"health.example") + tlv(0x04)),
        v2_local((Authority("health.example"), Noop())),
    ),
    ok(
        "v2-local-inet-tlvs",
        v2(0x20, 0x11, BLOCK4 + tlv(0x01, b"h2")),
        v2_local((Alpn(b"h2"),)),
        canonical=False,
    ),
    # TLVs of every registered type
    ok("v2-alpn-http11", tcp4_with(tlv(0x01, b"http/1.1")), tcp4(Alpn(b"http/1.1"))),
    ok("v2-alpn-binary", tcp4_with(tlv(0x01, b"\x00\xff\x80")), tcp4(Alpn(b"\x00\xff\x80"))),
    ok(
        "v2-authority-utf8",
        tcp4_with(tlv(0x02, "bücher.example".encode())),
        tcp4(Authority("bücher.example")),
    ),
    ok(
        "v2-authority-253",
        tcp4_with(tlv(0x02, b"a." * 120 + b"example.com")),
        tcp4(Authority("a." * 120 + "example.com")),
    ),
    ok("v2-noop-1", tcp4_with(tlv(0x04, b"\x00")), tcp4(Noop(b"\x00"))),
    ok("v2-noop-300", tcp4_with(tlv(0x04, b"\xaa" * 300)), tcp4(Noop(b"\xaa" * 300))),
    ok("v2-unique-id-1", tcp4_with(tlv(0x05, b"\x01")), tcp4(UniqueId(b"\x01"))),
    ok("v2-unique-id-128", tcp4_with(tlv(0x05, b"\x5a" * 128)), tcp4(UniqueId(b"\x5a" * 128))),
    ok("v2-netns", tcp4_with(tlv(0x30, b"blue")), tcp4(Netns("blue"))),
    ok(
        "v2-zero-length-all",
        tcp4_with(tlv(0x01), tlv(0x02), tlv(0x04), tlv(0x05), tlv(0x30)),
        tcp4(Alpn(b""), Authority(""), Noop(), UniqueId(b""), Netns("")),
    ),
    # PP2_TYPE_SSL and its sub-TLVs
    ok("v2-ssl-minimal", tcp4_with(tlv(0x20, ssl_value(0, 1))), tcp4(Ssl(0, 1))),
    ok("v2-ssl-all-subtypes", tcp4_with(tlv(0x20, SSL_ALL)), tcp4(SSL_ALL_TLV)),
    ok(
        "v2-ssl-cn-utf8",
        tcp4_with(tlv(0x20, ssl_value(0x03, 0, tlv(0x22, "Jürgen Müller".encode())))),
        tcp4(Ssl(0x03, 0, (SslString(0x22, "Jürgen Müller"),))),
    ),
    ok(
        "v2-ssl-unknown-subtypes",
        tcp4_with(
            tlv(0x20, ssl_value(0x01, 0x12345678, tlv(0x26, b"?"), tlv(0x20, b""), tlv(0x03, b"x")))
        ),
        tcp4(
            Ssl(
                0x01,
                0x12345678,
                (UnknownTlv(0x26, b"?"), UnknownTlv(0x20, b""), UnknownTlv(0x03, b"x")),
            )
        ),
    ),
    ok(
        "v2-ssl-repeated-and-empty",
        tcp4_with(tlv(0x20, ssl_value(0x01, 0, tlv(0x21, b""), tlv(0x21, b"TLSv1.2"), tlv(0x23)))),
        tcp4(Ssl(0x01, 0, (SslString(0x21, ""), SslString(0x21, "TLSv1.2"), SslString(0x23, "")))),
    ),
    ok(
        "v2-ssl-verify-max",
        tcp4_with(tlv(0x20, ssl_value(0xFF, 0xFFFFFFFF))),
        tcp4(Ssl(0xFF, 0xFFFFFFFF)),
    ),
    # vendor types, and values that miss the vendor's shape (kept raw)
    ok("v2-aws-empty-id", tcp4_with(tlv(0xEA, b"\x01")), tcp4(AwsVpceId(""))),
    ok(
        "v2-aws-subtype-2",
        tcp4_with(tlv(0xEA, b"\x02vpce-1")),
        tcp4(UnknownTlv(0xEA, b"\x02vpce-1")),
    ),
    ok("v2-aws-empty", tcp4_with(tlv(0xEA)), tcp4(UnknownTlv(0xEA, b""))),
    ok(
        "v2-aws-non-ascii",
        tcp4_with(tlv(0xEA, b"\x01vpce-\xff")),
        tcp4(UnknownTlv(0xEA, b"\x01vpce-\xff")),
    ),
    ok("v2-azure-max", tcp4_with(tlv(0xEE, h("01 ffffffff"))), tcp4(AzureLinkId(0xFFFFFFFF))),
    ok(
        "v2-azure-4-bytes",
        tcp4_with(tlv(0xEE, h("01 450021"))),
        tcp4(UnknownTlv(0xEE, h("01 450021"))),
    ),
    ok(
        "v2-azure-6-bytes",
        tcp4_with(tlv(0xEE, h("01 01450021 00"))),
        tcp4(UnknownTlv(0xEE, h("01 01450021 00"))),
    ),
    ok(
        "v2-azure-subtype-2",
        tcp4_with(tlv(0xEE, h("02 01450021"))),
        tcp4(UnknownTlv(0xEE, h("02 01450021"))),
    ),
    ok("v2-gcp-max", tcp4_with(tlv(0xE0, b"\xff" * 8)), tcp4(GcpPscConnectionId(2**64 - 1))),
    ok("v2-gcp-7-bytes", tcp4_with(tlv(0xE0, bytes(7))), tcp4(UnknownTlv(0xE0, bytes(7)))),
    ok("v2-gcp-9-bytes", tcp4_with(tlv(0xE0, bytes(9))), tcp4(UnknownTlv(0xE0, bytes(9)))),
    ok("v2-gcp-empty", tcp4_with(tlv(0xE0)), tcp4(UnknownTlv(0xE0, b""))),
    # unknown and repeated types, kept in order
    ok(
        "v2-unknown-types",
        tcp4_with(*(tlv(code, bytes([code])) for code in UNKNOWN_CODES)),
        tcp4(*(UnknownTlv(code, bytes([code])) for code in UNKNOWN_CODES)),
    ),
    ok(
        "v2-unknown-zero-length",
        tcp4_with(tlv(0xF0), tlv(0xFF), tlv(0x00)),
        tcp4(UnknownTlv(0xF0, b""), UnknownTlv(0xFF, b""), UnknownTlv(0x00, b"")),
    ),
    ok(
        "v2-repeated-types",
        tcp4_with(
            tlv(0x01, b"h2"),
            tlv(0x02, b"a.example"),
            tlv(0x01, b"http/1.1"),
            tlv(0x02, b"b.example"),
            tlv(0x20, ssl_value(0x01, 0)),
            tlv(0x20, ssl_value(0x00, 1)),
        ),
        tcp4(
            Alpn(b"h2"),
            Authority("a.example"),
            Alpn(b"http/1.1"),
            Authority("b.example"),
            Ssl(0x01, 0),
            Ssl(0x00, 1),
        ),
    ),
    ok(
        "v2-every-type",
        tcp4_with(
            tlv(0x01, b"h2"),
            tlv(0x02, b"example.com"),
            tlv(0x04, b"\x00\x00"),
            tlv(0x05, b"id-42"),
            tlv(0x20, SSL_ALL),
            tlv(0x30, b"ns1"),
            tlv(0xEA, b"\x01vpce-0123456789abcdef0"),
            tlv(0xEE, h("01 01450021")),
            tlv(0xE0, h("009b34d70a003c64")),
            tlv(0xF7, b"experimental"),
        ),
        tcp4(
            Alpn(b"h2"),
            Authority("example.com"),
            Noop(b"\x00\x00"),
            UniqueId(b"id-42"),
            SSL_ALL_TLV,
            Netns("ns1"),
            AwsVpceId("vpce-0123456789abcdef0"),
            AzureLinkId(0x21004501),
            GcpPscConnectionId(0x009B34D70A003C64),
            UnknownTlv(0xF7, b"experimental"),
        ),
    ),
    # maximum length: 16 + 65535
    ok("v2-max-body", tcp4_with(tlv(0x04, bytes(MAX_NOOP))), tcp4(Noop(bytes(MAX_NOOP)))),
    ok(
        "v2-max-body-local",
        v2(0x20, 0x00, tlv(0xE5, b"\x17" * (0xFFFF - 3))),
        v2_local((UnknownTlv(0xE5, b"\x17" * (0xFFFF - 3)),)),
    ),
    ok(
        "v2-max-body-local-junk",
        v2(0x20, 0x99, b"\xee" * 0xFFFF),
        v2_local(),
        canonical=False,
    ),
    # payload after the header is untouched
    ok(
        "v2-payload-v2-header",
        h("0d0a0d0a000d0a515549540a 21 11 000c c0000201 c6336407 dc04 01bb"),
        tcp4(),
        payload=v2(0x21, 0x11, inet4("203.0.113.66", "198.51.100.7", 1, 443)),
    ),
    ok("v2-payload-v1-line", v2(0x20, 0x00), v2_local(), payload=line(TCP4_LINE)),
    ok(
        "v2-payload-http",
        tcp4_with(tlv(0x01, b"http/1.1")),
        tcp4(Alpn(b"http/1.1")),
        payload=HTTP_REQUEST,
    ),
    *_crc_vectors(),
]


# ================================================================= v2, invalid

TCP4_HEX = "0d0a0d0a000d0a515549540a 21 11 000c c0000201c6336407dc0401bb"
TCP4_BYTES = h(TCP4_HEX)


def _with_byte(data: bytes, index: int, value: int) -> bytes:
    return data[:index] + bytes([value]) + data[index + 1 :]


def _crc_invalid() -> list[Invalid]:
    good, crc = with_crc(0x21, 0x11, BLOCK4, tlv(0x01, b"h2"))
    at = len(good) - 4
    little = crc.checksum.to_bytes(4, "little")
    header_and_payload = v2(0x21, 0x11, BLOCK4 + tlv(0x03, bytes(4))) + b"payload"
    over_payload = crc32c_reference(header_and_payload)
    body_only = crc32c_reference(header_and_payload[16:-7])
    return [
        bad("v2-crc-zero", good[:at] + bytes(4), R.V2_BAD_CRC),
        bad("v2-crc-little-endian", good[:at] + little, R.V2_BAD_CRC),
        bad("v2-crc-off-by-one", with_crc(0x21, 0x11, BLOCK4, xor=1)[0], R.V2_BAD_CRC),
        bad("v2-crc-high-bit", with_crc(0x21, 0x11, BLOCK4, xor=0x80000000)[0], R.V2_BAD_CRC),
        bad(
            "v2-crc-over-payload",  # the checksum must cover the header only
            header_and_payload[: 28 + 3] + over_payload.to_bytes(4, "big") + b"payload",
            R.V2_BAD_CRC,
        ),
        bad(
            "v2-crc-body-only",  # ... and the whole header, signature included
            header_and_payload[: 28 + 3] + body_only.to_bytes(4, "big"),
            R.V2_BAD_CRC,
        ),
        bad("v2-crc-bad-tcp6", with_crc(0x21, 0x21, BLOCK6, xor=0xFF)[0], R.V2_BAD_CRC),
        bad("v2-crc-bad-unix", with_crc(0x21, 0x31, BLOCK_UNIX, xor=0x100)[0], R.V2_BAD_CRC),
        bad("v2-crc-bad-local", with_crc(0x20, 0x00, b"", xor=2)[0], R.V2_BAD_CRC),
        bad("v2-crc-bad-local-inet", with_crc(0x20, 0x11, BLOCK4, xor=2)[0], R.V2_BAD_CRC),
        bad("v2-crc-bad-unspec", with_crc(0x21, 0x00, b"", xor=4)[0], R.V2_BAD_CRC),
        bad("v2-crc-size-0", tcp4_with(tlv(0x03)), R.V2_BAD_TLV),
        bad("v2-crc-size-3", tcp4_with(tlv(0x03, h("d45a11"))), R.V2_BAD_TLV),
        bad("v2-crc-size-5", tcp4_with(tlv(0x03, h("d45a11b9 00"))), R.V2_BAD_TLV),
        bad(
            "v2-crc-two",
            with_crc(0x21, 0x11, BLOCK4, tlv(0x03, crc.payload()))[0],
            R.V2_BAD_TLV,
        ),
        bad("v2-crc-two-zero", tcp4_with(tlv(0x03, bytes(4)), tlv(0x03, bytes(4))), R.V2_BAD_TLV),
    ]


V2_INVALID: list[Invalid] = [
    # PROTOCOL.md 5.4, literal bytes
    bad(
        "v2-ver1",
        h("0d0a0d0a000d0a515549540a 11 11 000c c0000201c6336407dc0401bb"),
        R.V2_BAD_VERSION,
        13,
    ),
    bad(
        "v2-ver3",
        h("0d0a0d0a000d0a515549540a 31 11 000c c0000201c6336407dc0401bb"),
        R.V2_BAD_VERSION,
        13,
    ),
    bad(
        "v2-cmd2",
        h("0d0a0d0a000d0a515549540a 22 11 000c c0000201c6336407dc0401bb"),
        R.V2_BAD_COMMAND,
        13,
    ),
    bad(
        "v2-fam4",
        h("0d0a0d0a000d0a515549540a 21 41 000c c0000201c6336407dc0401bb"),
        R.V2_BAD_FAMILY,
        14,
    ),
    bad(
        "v2-short4",
        h("0d0a0d0a000d0a515549540a 21 11 0008 c0000201 c6336407"),
        R.V2_SHORT_ADDRESS,
        16,
    ),
    bad("v2-short4-empty", h("0d0a0d0a000d0a515549540a 21 11 0000"), R.V2_SHORT_ADDRESS, 16),
    bad("v2-short6", h("0d0a0d0a000d0a515549540a 21 21 0000"), R.V2_SHORT_ADDRESS, 16),
    bad(
        "v2-tlv-over",
        h("0d0a0d0a000d0a515549540a 21 11 0011 c0000201c6336407dc0401bb 01 0005 6832"),
        R.V2_BAD_TLV,
    ),
    bad(
        "v2-tlv-stub",
        h("0d0a0d0a000d0a515549540a 21 11 000e c0000201c6336407dc0401bb 01 00"),
        R.V2_BAD_TLV,
    ),
    bad(
        "v2-crc-bad",
        h("0d0a0d0a000d0a515549540a 21 11 0013 c0000201c6336407dc0401bb 03 0004 d45a11b8"),
        R.V2_BAD_CRC,
    ),
    # V2-12: version nibbles other than 2
    *(
        bad(
            f"v2-version-{version}",
            _with_byte(TCP4_BYTES, 12, version << 4 | 1),
            R.V2_BAD_VERSION,
            13,
        )
        for version in range(16)
        if version not in (1, 2, 3)
    ),
    bad("v2-version-0-local", _with_byte(TCP4_BYTES, 12, 0x00), R.V2_BAD_VERSION, 13),
    # V2-11: commands other than LOCAL and PROXY
    *(
        bad(
            f"v2-command-{command}",
            _with_byte(TCP4_BYTES, 12, 0x20 | command),
            R.V2_BAD_COMMAND,
            13,
        )
        for command in range(3, 16)
    ),
    # families and transports outside the table (for PROXY)
    *(
        bad(f"v2-fam-{fam:02x}", _with_byte(TCP4_BYTES, 13, fam), R.V2_BAD_FAMILY, 14)
        for fam in (
            0x01,
            0x02,
            0x03,
            0x0F,
            0x10,
            0x13,
            0x1F,
            0x20,
            0x23,
            0x30,
            0x33,
            0x40,
            0x42,
            0x51,
            0xF1,
            0xFF,
        )
    ),
    bad("v2-fam-10-unspec-len", v2(0x21, 0x10), R.V2_BAD_FAMILY, 14),
    # V2-3: len smaller than the address block, refused before the body arrives
    *(
        bad(f"v2-short-{fam:02x}-{length}", v2(0x21, fam, bytes(length)), R.V2_SHORT_ADDRESS, 16)
        for fam, length in (
            (0x11, 11),
            (0x12, 0),
            (0x12, 11),
            (0x21, 12),
            (0x21, 35),
            (0x22, 0),
            (0x22, 35),
            (0x31, 0),
            (0x31, 108),
            (0x31, 215),
            (0x32, 12),
            (0x32, 215),
        )
    ),
    bad(
        "v2-short6-with-payload", v2(0x21, 0x21, BLOCK6[:12]) + BLOCK6[12:], R.V2_SHORT_ADDRESS, 16
    ),
    # the 12-byte signature with one byte wrong, at each position
    *(
        bad(
            f"v2-sig-byte-{index}",
            _with_byte(TCP4_BYTES, index, TCP4_BYTES[index] ^ 0x20),
            R.NOT_PROXY_PROTOCOL,
            index + 1,
        )
        for index in range(12)
    ),
    bad("v2-sig-truncated-then-proxy", SIG[:6] + OK4, R.NOT_PROXY_PROTOCOL, 7),
    bad("v2-sig-crcr", b"\r\r", R.NOT_PROXY_PROTOCOL, 2),
    # T-1: TLV structure at the top level
    bad("v2-tlv-stub-1", tcp4_with(b"\x01"), R.V2_BAD_TLV),
    bad("v2-tlv-len-ffff", tcp4_with(tlv(0x01, b"h2", length=0xFFFF)), R.V2_BAD_TLV),
    bad("v2-tlv-over-by-one", tcp4_with(tlv(0x02, b"example.com", length=12)), R.V2_BAD_TLV),
    bad("v2-tlv-second-over", tcp4_with(tlv(0x01, b"h2"), tlv(0x04, b"x", length=2)), R.V2_BAD_TLV),
    bad("v2-tlv-stub-after-valid", tcp4_with(tlv(0x04, b"ok"), b"\xe0\x00"), R.V2_BAD_TLV),
    bad(
        "v2-tlv-over-into-payload",  # the bytes after the header must not complete a TLV
        tcp4_with(tlv(0x01, b"h2", length=5)) + b"xyz",
        R.V2_BAD_TLV,
    ),
    bad("v2-tlv-unknown-over", tcp4_with(tlv(0xF0, b"abc", length=4)), R.V2_BAD_TLV),
    bad("v2-tlv-stub-unspec", v2(0x21, 0x00, b"\x04\x00"), R.V2_BAD_TLV),
    bad("v2-tlv-over-unix", v2(0x21, 0x31, BLOCK_UNIX + tlv(0x04, b"x", length=2)), R.V2_BAD_TLV),
    bad("v2-tlv-over-tcp6", v2(0x21, 0x21, BLOCK6 + b"\x04\x00"), R.V2_BAD_TLV),
    # T-8: SSL value and sub-TLVs
    bad("v2-ssl-empty", tcp4_with(tlv(0x20)), R.V2_BAD_TLV),
    bad("v2-ssl-4-bytes", tcp4_with(tlv(0x20, h("01 000000"))), R.V2_BAD_TLV),
    bad(
        "v2-ssl-sub-over",
        tcp4_with(tlv(0x20, ssl_value(1, 0, tlv(0x21, b"TLS", length=5)))),
        R.V2_BAD_TLV,
    ),
    bad("v2-ssl-sub-stub-1", tcp4_with(tlv(0x20, ssl_value(1, 0, b"\x21"))), R.V2_BAD_TLV),
    bad(
        "v2-ssl-sub-stub-2",
        tcp4_with(tlv(0x20, ssl_value(1, 0, tlv(0x21, b"TLSv1.3"), b"\x22\x00"))),
        R.V2_BAD_TLV,
    ),
    bad(
        "v2-ssl-sub-over-outer",  # the sub-TLV would fit in the header, not in the SSL value
        tcp4_with(
            tlv(0x20, ssl_value(1, 0, tlv(0x21, b"TLSv1.3", length=12))), tlv(0x04, b"12345")
        ),
        R.V2_BAD_TLV,
    ),
    bad(
        "v2-ssl-version-non-ascii",
        tcp4_with(tlv(0x20, ssl_value(1, 0, tlv(0x21, b"TLSv1.3\xff")))),
        R.V2_BAD_TLV,
    ),
    bad(
        "v2-ssl-cn-bad-utf8",
        tcp4_with(tlv(0x20, ssl_value(3, 0, tlv(0x22, b"J\xfcrgen")))),
        R.V2_BAD_TLV,
    ),
    bad(
        "v2-ssl-cipher-utf8",
        tcp4_with(tlv(0x20, ssl_value(1, 0, tlv(0x23, "AES\u2013GCM".encode())))),  # EN DASH
        R.V2_BAD_TLV,
    ),
    bad(
        "v2-ssl-sig-alg-non-ascii",
        tcp4_with(tlv(0x20, ssl_value(1, 0, tlv(0x24, b"RSA\x80")))),
        R.V2_BAD_TLV,
    ),
    bad(
        "v2-ssl-key-alg-non-ascii",
        tcp4_with(tlv(0x20, ssl_value(1, 0, tlv(0x25, b"\xffRSA")))),
        R.V2_BAD_TLV,
    ),
    # shapes of the registered types
    bad("v2-unique-id-129", tcp4_with(tlv(0x05, b"\x5a" * 129)), R.V2_BAD_TLV),
    bad("v2-unique-id-1000", tcp4_with(tlv(0x05, bytes(1000))), R.V2_BAD_TLV),
    bad("v2-authority-ff", tcp4_with(tlv(0x02, b"example\xff.com")), R.V2_BAD_TLV),
    bad(
        "v2-authority-latin1",
        tcp4_with(tlv(0x02, "bücher.example".encode("latin-1"))),
        R.V2_BAD_TLV,
    ),
    bad("v2-authority-overlong", tcp4_with(tlv(0x02, b"\xc0\xaf")), R.V2_BAD_TLV),
    bad("v2-authority-surrogate", tcp4_with(tlv(0x02, b"\xed\xa0\x80.example")), R.V2_BAD_TLV),
    bad("v2-authority-truncated", tcp4_with(tlv(0x02, b"example.\xe2\x82")), R.V2_BAD_TLV),
    bad("v2-netns-non-ascii", tcp4_with(tlv(0x30, b"ns\x80")), R.V2_BAD_TLV),
    bad("v2-netns-utf8", tcp4_with(tlv(0x30, "nét".encode())), R.V2_BAD_TLV),
    *_crc_invalid(),
]

VALID: list[Valid] = V1_VALID + V2_VALID
INVALID: list[Invalid] = V1_INVALID + V2_INVALID


def by_id(vector_id: str) -> Valid:
    """The valid vector named ``vector_id``."""
    return next(v for v in VALID if v.id == vector_id)


def _check_unique_ids() -> None:
    ids = [v.id for v in VALID] + [v.id for v in INVALID]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise AssertionError(f"duplicate vector ids: {duplicates}")


_check_unique_ids()
