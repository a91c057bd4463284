"""The PROXY protocol, versions 1 and 2, as pure code over bytes (no sockets).

Receiving: call :func:`parse` with every byte received so far.  It answers

* :class:`NeedMore` - the bytes are a valid beginning of a header; read at
  least ``at_least`` more bytes and call again;
* :class:`Parsed` - a complete header and how many bytes it took; everything
  after ``consumed`` is the client's payload and must be forwarded unchanged;
* or it raises :class:`~mmproxy.errors.HeaderError` with a :class:`Reason`.

Nothing else ever escapes it (the property tests hold it to that).  The parser
keeps no state: calling it again on a longer buffer is how a header split
across any number of TCP segments is reassembled.  It rejects as early as the
bytes allow: a first byte that cannot start a header fails at once, and a v2
header whose fixed part is wrong fails before its body arrives.

Sending: :func:`encode` turns a :class:`ProxyHeader` into bytes (tests, the
benchmark and the demo use it).

Section numbers (§) refer to HAProxy's doc/proxy-protocol.txt.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field
from typing import TypeVar

from mmproxy.crc32c import crc32c
from mmproxy.errors import HeaderError, Reason
from mmproxy.tlv import (
    PP2_TYPE_CRC32C,
    TLV_HEADER_LENGTH,
    RawTlv,
    Tlv,
    decode_tlv,
    encode_tlvs,
    split_tlvs,
)

__all__ = [
    "V1_MAX_LENGTH",
    "V2_FIXED_LENGTH",
    "V2_MAX_LENGTH",
    "V2_SIGNATURE",
    "Command",
    "Family",
    "IPAddress",
    "InetAddress",
    "NeedMore",
    "Parsed",
    "ProxyHeader",
    "Transport",
    "UnixAddress",
    "encode",
    "parse",
    "parse_complete",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

V1_PREFIX = b"PROXY"
V1_MAX_LENGTH = 107  # §2.1: the longest line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"  # §2.2, 12 bytes with a NUL inside
V2_FIXED_LENGTH = 16  # signature, ver_cmd, fam, len
V2_MAX_LENGTH = V2_FIXED_LENGTH + 0xFFFF
_UNIX_PATH_LENGTH = 108


class Command(enum.IntEnum):
    """v2 command (low nibble of byte 13).  v1 headers are always PROXY."""

    LOCAL = 0x0  # the proxy's own connection (health check): use the real endpoints
    PROXY = 0x1  # relayed on behalf of a client: the header carries its address


class Family(enum.IntEnum):
    """Address family (high nibble of byte 14; v1 TCP4/TCP6/UNKNOWN map here)."""

    UNSPEC = 0x0
    INET = 0x1
    INET6 = 0x2
    UNIX = 0x3


class Transport(enum.IntEnum):
    """Transport protocol (low nibble of byte 14; v1 is always STREAM)."""

    UNSPEC = 0x0
    STREAM = 0x1
    DGRAM = 0x2


# §2.2: the fam byte values a sender may emit; others must be dropped.
_VALID_FAM_BYTES = frozenset({0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32})
_ADDRESS_BLOCK_LENGTH = {Family.UNSPEC: 0, Family.INET: 12, Family.INET6: 36, Family.UNIX: 216}
_IP_LENGTH = {Family.INET: 4, Family.INET6: 16}

# The parse path looks these up by indexing tuples with the header's own numbers.  On
# free-threaded CPython a dict or set lookup with non-str keys, and an IntEnum made from its
# value, lock a shared object, and every connection's thread parses: lookups there serialised
# the threads (measured with v1's protocol token: a quarter of the daemon's CPU went to it).
_VALID_FAM_BYTE = tuple(byte in _VALID_FAM_BYTES for byte in range(256))
_COMMAND_OF = (Command.LOCAL, Command.PROXY)
_FAMILY_OF = (Family.UNSPEC, Family.INET, Family.INET6, Family.UNIX)
_TRANSPORT_OF = (Transport.UNSPEC, Transport.STREAM, Transport.DGRAM)
_BLOCK_LENGTH_OF = tuple(_ADDRESS_BLOCK_LENGTH[family] for family in _FAMILY_OF)
_IP_LENGTH_OF = tuple(_IP_LENGTH.get(family, 0) for family in _FAMILY_OF)
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class InetAddress:
    """An IP address and port from a header."""

    host: IPAddress
    port: int

    @classmethod
    def of(cls, host: str, port: int) -> InetAddress:
        return cls(ipaddress.ip_address(host), port)

    def __str__(self) -> str:
        if self.host.version == 6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UnixAddress:
    """A unix socket path from a v2 AF_UNIX header (NUL padding removed)."""

    path: bytes

    def __str__(self) -> str:
        return "unix:" + self.path.decode("utf-8", "backslashreplace")


Address = InetAddress | UnixAddress


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A decoded PROXY header.

    ``source``/``destination`` are set only when the header carries addresses
    a receiver may use: PROXY with INET, INET6 (v1 TCP4/TCP6) or UNIX.  They
    are ``None`` for LOCAL (whose address block must be ignored, §2.2), for
    UNSPEC and for v1 UNKNOWN.
    """

    version: int
    command: Command
    family: Family
    transport: Transport
    source: Address | None = None
    destination: Address | None = None
    tlvs: tuple[Tlv, ...] = field(default=())

    @classmethod
    def proxy(
        cls,
        source: InetAddress,
        destination: InetAddress,
        *,
        version: int = 2,
        transport: Transport = Transport.STREAM,
        tlvs: tuple[Tlv, ...] = (),
    ) -> ProxyHeader:
        """A PROXY header for a client at ``source`` that reached ``destination``."""
        if source.host.version != destination.host.version:
            raise ValueError("source and destination must be of one address family")
        family = Family.INET if source.host.version == 4 else Family.INET6
        return cls(version, Command.PROXY, family, transport, source, destination, tlvs)

    @classmethod
    def local(cls, *, version: int = 2, tlvs: tuple[Tlv, ...] = ()) -> ProxyHeader:
        """A LOCAL header (v2), or ``PROXY UNKNOWN`` when ``version`` is 1."""
        if version == 1:
            if tlvs:
                raise ValueError("v1 has no TLVs")
            return cls(1, Command.PROXY, Family.UNSPEC, Transport.UNSPEC)
        return cls(2, Command.LOCAL, Family.UNSPEC, Transport.UNSPEC, tlvs=tlvs)

    @property
    def client(self) -> InetAddress | None:
        """The client address to impersonate, or ``None`` to use the real peer.

        ``None`` for LOCAL, UNSPEC, v1 UNKNOWN and AF_UNIX (a TCP/UDP relay
        cannot bind a unix path, so it falls back to the real endpoints, §2.2).
        """
        return self.source if isinstance(self.source, InetAddress) else None

    def find(self, tlv_type: type[_T]) -> _T | None:
        """The first TLV of class ``tlv_type`` (e.g. ``find(Authority)``), or ``None``."""
        return next((t for t in self.tlvs if isinstance(t, tlv_type)), None)


@dataclass(frozen=True, slots=True)
class NeedMore:
    """Not a header yet, nor wrong yet: at least ``at_least`` more bytes are needed."""

    at_least: int


@dataclass(frozen=True, slots=True)
class Parsed:
    """A complete header; ``consumed`` bytes belong to it, the rest is payload."""

    header: ProxyHeader
    consumed: int


def parse(data: bytes | bytearray | memoryview) -> NeedMore | Parsed:
    """Parse the header at the start of ``data`` (everything received so far)."""
    if not data:
        return NeedMore(1)
    first = data[0]
    if first == V1_PREFIX[0]:
        return _parse_v1(bytes(data[:V1_MAX_LENGTH]))
    if first == V2_SIGNATURE[0]:
        return _parse_v2(data)
    raise HeaderError(
        Reason.NOT_PROXY_PROTOCOL, f"first byte 0x{first:02x} starts neither a v1 nor a v2 header"
    )


def parse_complete(data: bytes | bytearray | memoryview) -> Parsed:
    """Parse a header that must be complete, as at the start of a datagram.

    Raises HeaderError(INCOMPLETE) where :func:`parse` would ask for more.
    """
    result = parse(data)
    if isinstance(result, NeedMore):
        raise HeaderError(
            Reason.INCOMPLETE,
            f"header truncated after {len(data)} bytes (at least {result.at_least} more needed)",
        )
    return result


# --------------------------------------------------------------------------- v1

# §2.1: decimal octets without leading zeros; ports 0-65535 in plain decimal.
# (int() alone would take "+80", "080", " 80" and "8_0".)
_V1_IPV4 = re.compile(rb"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
_V1_IPV6 = re.compile(rb"[0-9A-Fa-f:.]{2,45}")  # ipaddress checks the rest; no "%scope"
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
# What an incomplete field may look like while it is still arriving.
_V1_IPV4_SO_FAR = re.compile(rb"[0-9.]{0,15}")
_V1_IPV6_SO_FAR = re.compile(rb"[0-9A-Fa-f:.]{0,45}")
_V1_PORT_SO_FAR = re.compile(rb"|0|[1-9][0-9]{0,4}")
_V1_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_V1_TOKENS = (b"TCP4", b"TCP6", b"UNKNOWN")
_V1_FIELD_NAMES = ("source", "destination", "source port", "destination port")


def _parse_v1(data: bytes) -> NeedMore | Parsed:
    """``data`` holds at most the first 107 bytes received."""
    prefix_length = min(len(data), len(V1_PREFIX))
    if data[:prefix_length] != V1_PREFIX[:prefix_length]:
        raise HeaderError(Reason.NOT_PROXY_PROTOCOL, "starts with 'P' but not with 'PROXY'")
    end = data.find(b"\r\n")
    if end >= 0:
        return Parsed(_parse_v1_line(data[:end]), end + 2)
    # Not complete: refuse now if no continuation can make it valid, so the
    # sender hears about it at once (§2.1 asks receivers to abort "soon").
    # A final CR is judged with the byte after it (LF ends the line, anything
    # else puts a control byte in a field), so that a header is refused for
    # the same reason however it was split.  Checked before the length, so the
    # reason is the one a reader fed byte by byte would have met first.
    _check_v1(data.removesuffix(b"\r"), complete=False)
    if len(data) >= V1_MAX_LENGTH:
        raise HeaderError(Reason.V1_TOO_LONG, f"no CRLF within the first {V1_MAX_LENGTH} bytes")
    return NeedMore(1)


def _parse_v1_line(line: bytes) -> ProxyHeader:
    """Parse one complete line, CRLF excluded."""
    family = _check_v1(line, complete=True)
    if family is Family.UNSPEC:
        return ProxyHeader(1, Command.PROXY, Family.UNSPEC, Transport.UNSPEC)
    _, _, src, dst, sport, dport = line.split(b" ")
    return ProxyHeader(
        1,
        Command.PROXY,
        family,
        Transport.STREAM,
        InetAddress(_v1_address(src, family), int(sport)),
        InetAddress(_v1_address(dst, family), int(dport)),
    )


def _check_v1(line: bytes, *, complete: bool) -> Family:
    """Validate a v1 line, or the part of one received so far.

    One function for both cases, so a header is refused with the same reason
    whether it arrives whole or byte by byte.  Fields are checked in order;
    the last one of an incomplete line only has to be a possible beginning.
    Returns the family (UNSPEC for UNKNOWN; meaningless when incomplete).
    """
    if len(line) > len(V1_PREFIX) and line[len(V1_PREFIX)] != 0x20:
        raise HeaderError(Reason.V1_BAD_SYNTAX, "'PROXY' is not followed by a single space")
    if complete and len(line) <= len(V1_PREFIX) + 1:
        raise HeaderError(Reason.V1_BAD_SYNTAX, "no protocol after 'PROXY'")
    token, space, rest = line[len(V1_PREFIX) + 1 :].partition(b" ")
    if space and not token:
        raise HeaderError(Reason.V1_BAD_SYNTAX, "two spaces after 'PROXY'")
    if token == b"UNKNOWN" and (space or complete):
        return Family.UNSPEC  # §2.1: anything up to the CRLF is ignored
    if not (space or complete):
        if not any(t.startswith(token) for t in _V1_TOKENS):
            raise HeaderError(Reason.V1_BAD_PROTOCOL, f"unknown protocol {_show(token)}")
        return Family.UNSPEC
    # Comparisons, not a dict lookup: on free-threaded CPython a lookup with bytes keys locks
    # the dict, and every connection's thread parses here (measured: a quarter of the CPU).
    if token == b"TCP4":
        family = Family.INET
    elif token == b"TCP6":
        family = Family.INET6
    else:
        raise HeaderError(Reason.V1_BAD_PROTOCOL, f"unknown protocol {_show(token)}")
    fields = rest.split(b" ") if space else []
    last = len(fields) if complete else len(fields) - 1  # fields[last] is still arriving
    for index, value in enumerate(fields[: min(last, 4)]):
        _check_v1_field(index, value, family)
    if len(fields) > 4 or (complete and len(fields) < 4):
        raise HeaderError(
            Reason.V1_BAD_SYNTAX,
            f"{token.decode()} needs 4 fields separated by single spaces: {_show(line)}",
        )
    if last < len(fields):
        _check_v1_field(last, fields[last], family, so_far=True)
    return family


def _check_v1_field(index: int, value: bytes, family: Family, *, so_far: bool = False) -> None:
    """Check field ``index`` (0 source, 1 destination, 2-3 ports) of a TCP4/TCP6 line."""
    which = _V1_FIELD_NAMES[index] if index < len(_V1_FIELD_NAMES) else "field"
    if not so_far and not value:
        raise HeaderError(Reason.V1_BAD_SYNTAX, f"empty {which} (two spaces in a row)")
    control = _V1_CONTROL.search(value)
    if control:
        # A tab, NUL, bare CR or bare LF is a framing mistake, not a bad value;
        # but what came before it in the field is judged first, as it was
        # when those bytes arrived on their own.
        _check_v1_field(index, value[: control.start()], family, so_far=True)
        raise HeaderError(
            Reason.V1_BAD_SYNTAX,
            f"control byte 0x{control.group()[0]:02x} in {which}: fields are separated by"
            " single spaces and the line ends with CRLF",
        )
    if index >= 2:
        pattern = _V1_PORT_SO_FAR if so_far else _V1_PORT
        if not pattern.fullmatch(value) or int(value or 0) > 0xFFFF:
            raise HeaderError(Reason.V1_BAD_PORT, f"{which} {_show(value)} is not 0-65535")
    elif so_far:
        pattern = _V1_IPV4_SO_FAR if family is Family.INET else _V1_IPV6_SO_FAR
        if not pattern.fullmatch(value):
            kind = "IPv4" if family is Family.INET else "IPv6"
            raise HeaderError(
                Reason.V1_BAD_ADDRESS, f"{which} {_show(value)} is not an {kind} address"
            )
    else:
        _v1_address(value, family, which)


def _v1_address(text: bytes, family: Family, which: str = "address") -> IPAddress:
    pattern = _V1_IPV4 if family is Family.INET else _V1_IPV6
    kind = "IPv4" if family is Family.INET else "IPv6"
    if pattern.fullmatch(text):
        try:
            if family is Family.INET:
                return ipaddress.IPv4Address(text.decode("ascii"))
            return ipaddress.IPv6Address(text.decode("ascii"))
        except ValueError:
            pass
    raise HeaderError(Reason.V1_BAD_ADDRESS, f"{which} {_show(text)} is not an {kind} address")


def _show(raw: bytes) -> str:
    """Quote peer bytes for a log line: bounded and printable."""
    shown = repr(raw[:48])[1:]
    return shown + ("..." if len(raw) > 48 else "")


# --------------------------------------------------------------------------- v2


def _parse_v2(data: bytes | bytearray | memoryview) -> NeedMore | Parsed:
    available = len(data)
    signature_length = min(available, len(V2_SIGNATURE))
    if bytes(data[:signature_length]) != V2_SIGNATURE[:signature_length]:
        raise HeaderError(Reason.NOT_PROXY_PROTOCOL, "starts with CR but not with the v2 signature")
    if available > 12:
        version, command = data[12] >> 4, data[12] & 0x0F
        if version != 2:
            raise HeaderError(Reason.V2_BAD_VERSION, f"version {version}, only 2 is defined")
        if command not in (Command.LOCAL, Command.PROXY):
            raise HeaderError(
                Reason.V2_BAD_COMMAND, f"command {command} is neither LOCAL nor PROXY"
            )
    if available > 13 and data[12] & 0x0F == Command.PROXY and not _VALID_FAM_BYTE[data[13]]:
        raise HeaderError(Reason.V2_BAD_FAMILY, f"family/transport byte 0x{data[13]:02x}")
    if available < V2_FIXED_LENGTH:
        return NeedMore(V2_FIXED_LENGTH - available)

    command = _COMMAND_OF[data[12] & 0x0F]
    length = int.from_bytes(data[14:16], "big")
    total = V2_FIXED_LENGTH + length
    if command is Command.PROXY:
        family = _FAMILY_OF[data[13] >> 4]
        block = _BLOCK_LENGTH_OF[family]
        if length < block:
            # §2.2: checked before waiting for the body, which may never come.
            raise HeaderError(
                Reason.V2_SHORT_ADDRESS,
                f"length {length} is less than the {block}-byte {family.name} address block",
            )
    if available < total:
        return NeedMore(total - available)

    header = bytes(data[:total])
    if command is Command.LOCAL:
        return Parsed(_local_v2(header), total)
    return Parsed(_proxy_v2(header), total)


def _local_v2(header: bytes) -> ProxyHeader:
    """§2.2: LOCAL ignores the family and address block, whatever they hold.

    A LOCAL connection impersonates nobody (the real endpoints are used), so
    it is accepted whatever follows the fixed part: health checks from some
    balancers carry dummy address blocks under any family byte.  TLVs are
    returned when the family byte is one the spec defines, the address block
    fits and the rest parses as TLVs; otherwise the rest is skipped as opaque.
    A CRC32C that parses but does not match still refuses the header: the
    sender asked for an integrity check and it failed.
    """
    fam = header[13]
    tlvs: tuple[Tlv, ...] = ()
    if _VALID_FAM_BYTE[fam]:
        start = V2_FIXED_LENGTH + _BLOCK_LENGTH_OF[fam >> 4]
        if start <= len(header):
            try:
                tlvs = _tlvs_v2(header, start)
            except HeaderError as error:
                if error.reason is not Reason.V2_BAD_TLV:
                    raise
    return ProxyHeader(2, Command.LOCAL, Family.UNSPEC, Transport.UNSPEC, tlvs=tlvs)


def _proxy_v2(header: bytes) -> ProxyHeader:
    family, transport = _FAMILY_OF[header[13] >> 4], _TRANSPORT_OF[header[13] & 0x0F]
    body = V2_FIXED_LENGTH
    source: Address | None = None
    destination: Address | None = None
    size = _IP_LENGTH_OF[family]
    if size:
        ports = body + 2 * size
        source = InetAddress(
            ipaddress.ip_address(header[body : body + size]),
            int.from_bytes(header[ports : ports + 2], "big"),
        )
        destination = InetAddress(
            ipaddress.ip_address(header[body + size : ports]),
            int.from_bytes(header[ports + 2 : ports + 4], "big"),
        )
    elif family is Family.UNIX:
        middle = body + _UNIX_PATH_LENGTH
        source = UnixAddress(header[body:middle].split(b"\0", 1)[0])
        destination = UnixAddress(header[middle : middle + _UNIX_PATH_LENGTH].split(b"\0", 1)[0])
    tlvs = _tlvs_v2(header, body + _BLOCK_LENGTH_OF[family])
    return ProxyHeader(2, Command.PROXY, family, transport, source, destination, tlvs)


def _tlvs_v2(header: bytes, start: int) -> tuple[Tlv, ...]:
    """Split the TLVs, verify a CRC32C, then interpret the values.

    Integrity comes before meaning: once the structure holds, a CRC32C
    mismatch is reported as such even when the corruption also broke a value.
    """
    raw = split_tlvs(header[start:], start)
    crcs = [t for t in raw if t.code == PP2_TYPE_CRC32C]
    if len(crcs) > 1:
        raise HeaderError(Reason.V2_BAD_TLV, f"{len(crcs)} CRC32C TLVs, at most 1 allowed")
    if crcs:
        _verify_crc(header, crcs[0])
    return tuple(decode_tlv(t) for t in raw)


def _verify_crc(header: bytes, raw: RawTlv) -> None:
    """§2.2.3: the CRC32C of the header with the checksum's own 4 bytes zeroed."""
    received = int.from_bytes(decode_tlv(raw).payload(), "big")  # decode refuses != 4 bytes
    computed = _checksum(header, raw.offset)
    if received != computed:
        raise HeaderError(
            Reason.V2_BAD_CRC,
            f"CRC32C is 0x{received:08x} but the header sums to 0x{computed:08x}",
        )


def _checksum(header: bytes, value_offset: int) -> int:
    """CRC32C of ``header`` with the 4 checksum bytes at ``value_offset`` taken as zero."""
    return crc32c(header[:value_offset] + bytes(4) + header[value_offset + 4 :])


# ----------------------------------------------------------------------- encode


def encode(header: ProxyHeader) -> bytes:
    """The wire form of ``header`` (v1 or v2 by ``header.version``).

    v2: a :class:`~mmproxy.tlv.Crc32c` TLV among ``header.tlvs`` gets the
    correct checksum whatever value it holds.  Raises ValueError for a header
    that cannot be expressed (v1 with TLVs, LOCAL or DGRAM; a body over 65535).
    """
    _check_encodable(header)
    if header.version == 1:
        return _encode_v1(header)
    if header.version == 2:
        return _encode_v2(header)
    raise ValueError(f"no PROXY protocol version {header.version}")


def _check_encodable(header: ProxyHeader) -> None:
    """Refuse what the wire cannot carry, rather than write bytes that mean something else."""
    for address in (header.source, header.destination):
        if isinstance(address, InetAddress):
            if _IP_LENGTH.get(header.family, len(address.host.packed)) != len(address.host.packed):
                raise ValueError(f"{address.host} is not an {header.family.name} address")
            if not 0 <= address.port <= 0xFFFF:
                raise ValueError(f"port {address.port} is not 0-65535")
            if isinstance(address.host, ipaddress.IPv6Address) and address.host.scope_id:
                raise ValueError(f"{address.host}: the PROXY protocol carries no scope id")
        elif isinstance(address, UnixAddress) and len(address.path) > _UNIX_PATH_LENGTH:
            raise ValueError(f"unix path of {len(address.path)} bytes, over {_UNIX_PATH_LENGTH}")


def _encode_v1(header: ProxyHeader) -> bytes:
    if header.tlvs or header.command is not Command.PROXY:
        raise ValueError("v1 has no TLVs and no LOCAL command")
    if header.family is Family.UNSPEC:
        return b"PROXY UNKNOWN\r\n"
    src, dst = header.source, header.destination
    if (
        header.transport is not Transport.STREAM
        or not isinstance(src, InetAddress)
        or not isinstance(dst, InetAddress)
    ):
        raise ValueError("v1 only expresses TCP over IPv4 or IPv6")
    token = "TCP4" if header.family is Family.INET else "TCP6"
    source, destination = _v1_text(src.host), _v1_text(dst.host)
    return f"PROXY {token} {source} {destination} {src.port} {dst.port}\r\n".encode("ascii")


def _v1_text(host: IPAddress) -> str:
    """The address as v1 writes it: RFC 5952, IPv4-mapped in mixed notation (``::ffff:192.0.2.1``).

    ``str()`` alone writes mapped addresses in hex before Python 3.13 and mixed from 3.13 on;
    the wire must not depend on the interpreter.
    """
    if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
        return f"::ffff:{host.ipv4_mapped}"
    return str(host)


def _encode_v2(header: ProxyHeader) -> bytes:
    fam = header.family << 4 | header.transport
    if header.command is Command.PROXY and fam not in _VALID_FAM_BYTES:
        raise ValueError(f"{header.family.name} over {header.transport.name} is not defined")
    block = _encode_address_block(header)
    tlv_bytes = encode_tlvs(header.tlvs)
    length = len(block) + len(tlv_bytes)
    if length > 0xFFFF:
        raise ValueError(f"v2 header body of {length} bytes exceeds 65535")
    fixed = V2_SIGNATURE + bytes([0x20 | header.command, fam]) + length.to_bytes(2, "big")
    wire = fixed + block + tlv_bytes
    crc_at = _crc_value_offset(len(fixed) + len(block), header.tlvs)
    if crc_at is None:
        return wire
    return wire[:crc_at] + _checksum(wire, crc_at).to_bytes(4, "big") + wire[crc_at + 4 :]


def _encode_address_block(header: ProxyHeader) -> bytes:
    src, dst = header.source, header.destination
    if header.family in _IP_LENGTH:
        if not isinstance(src, InetAddress) or not isinstance(dst, InetAddress):
            raise ValueError(f"{header.family.name} needs source and destination addresses")
        return (
            src.host.packed
            + dst.host.packed
            + src.port.to_bytes(2, "big")
            + dst.port.to_bytes(2, "big")
        )
    if header.family is Family.UNIX:
        if not isinstance(src, UnixAddress) or not isinstance(dst, UnixAddress):
            raise ValueError("UNIX needs source and destination paths")
        return src.path.ljust(_UNIX_PATH_LENGTH, b"\0") + dst.path.ljust(_UNIX_PATH_LENGTH, b"\0")
    return b""


def _crc_value_offset(start: int, tlvs: tuple[Tlv, ...]) -> int | None:
    """Where the first CRC32C TLV's value lands in the encoded header, if any."""
    offset = start
    for tlv in tlvs:
        if tlv.code == PP2_TYPE_CRC32C:
            return offset + TLV_HEADER_LENGTH
        offset += TLV_HEADER_LENGTH + len(tlv.payload())
    return None
