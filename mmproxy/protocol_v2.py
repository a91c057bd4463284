"""PROXY protocol version 2: the binary header (§2.2) and its TLVs (§2.2.x).

A 16-byte fixed part (signature, version and command, family and transport, length),
an address block whose size the family fixes, then TLVs.  The fixed part is judged
as soon as its bytes arrive, so a wrong header fails before its body does.
"""

from __future__ import annotations

import ipaddress

from mmproxy.crc32c import crc32c
from mmproxy.errors import HeaderError, Reason
from mmproxy.header import (
    UNIX_PATH_LENGTH,
    V2_FIXED_LENGTH,
    V2_SIGNATURE,
    Address,
    Command,
    Family,
    InetAddress,
    NeedMore,
    Parsed,
    ProxyHeader,
    Transport,
    UnixAddress,
)
from mmproxy.tlv import (
    PP2_TYPE_CRC32C,
    TLV_HEADER_LENGTH,
    RawTlv,
    Tlv,
    decode_tlv,
    encode_tlvs,
    split_tlvs,
)

# The parse path indexes tuples with the header's own numbers.  On free-threaded CPython a
# dict or set lookup with non-str keys, and an IntEnum made from its value, lock a shared
# object, and every connection's thread parses: such lookups would serialise the threads.
# §2.2: the fam byte values a sender may emit (others must be dropped), by byte value.
VALID_FAM_BYTE = tuple(byte in {0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32} for byte in range(256))
COMMAND_OF = (Command.LOCAL, Command.PROXY)
FAMILY_OF = (Family.UNSPEC, Family.INET, Family.INET6, Family.UNIX)
TRANSPORT_OF = (Transport.UNSPEC, Transport.STREAM, Transport.DGRAM)
# By family: the address block's length, and one address's length (0: not an IP family).
BLOCK_LENGTH_OF = (0, 12, 36, 2 * UNIX_PATH_LENGTH)
IP_LENGTH_OF = (0, 4, 16, 0)


def parse_v2(data: bytes | bytearray | memoryview) -> NeedMore | Parsed:
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
    if available > 13 and data[12] & 0x0F == Command.PROXY and not VALID_FAM_BYTE[data[13]]:
        raise HeaderError(Reason.V2_BAD_FAMILY, f"family/transport byte 0x{data[13]:02x}")
    if available < V2_FIXED_LENGTH:
        return NeedMore(V2_FIXED_LENGTH - available)

    command = COMMAND_OF[data[12] & 0x0F]
    length = int.from_bytes(data[14:16], "big")
    total = V2_FIXED_LENGTH + length
    if command is Command.PROXY:
        family = FAMILY_OF[data[13] >> 4]
        block = BLOCK_LENGTH_OF[family]
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
    if VALID_FAM_BYTE[fam]:
        start = V2_FIXED_LENGTH + BLOCK_LENGTH_OF[fam >> 4]
        if start <= len(header):
            try:
                tlvs = _tlvs_v2(header, start)
            except HeaderError as error:
                if error.reason is not Reason.V2_BAD_TLV:
                    raise
    return ProxyHeader(2, Command.LOCAL, Family.UNSPEC, Transport.UNSPEC, tlvs=tlvs)


def _proxy_v2(header: bytes) -> ProxyHeader:
    family, transport = FAMILY_OF[header[13] >> 4], TRANSPORT_OF[header[13] & 0x0F]
    body = V2_FIXED_LENGTH
    source: Address | None = None
    destination: Address | None = None
    size = IP_LENGTH_OF[family]
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
        middle = body + UNIX_PATH_LENGTH
        source = UnixAddress(header[body:middle].split(b"\0", 1)[0])
        destination = UnixAddress(header[middle : middle + UNIX_PATH_LENGTH].split(b"\0", 1)[0])
    tlvs = _tlvs_v2(header, body + BLOCK_LENGTH_OF[family])
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


def encode_v2(header: ProxyHeader) -> bytes:
    fam = header.family << 4 | header.transport
    if header.command is Command.PROXY and not VALID_FAM_BYTE[fam]:
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
    if IP_LENGTH_OF[header.family]:
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
        return src.path.ljust(UNIX_PATH_LENGTH, b"\0") + dst.path.ljust(UNIX_PATH_LENGTH, b"\0")
    return b""


def _crc_value_offset(start: int, tlvs: tuple[Tlv, ...]) -> int | None:
    """Where the first CRC32C TLV's value lands in the encoded header, if any."""
    offset = start
    for tlv in tlvs:
        if tlv.code == PP2_TYPE_CRC32C:
            return offset + TLV_HEADER_LENGTH
        offset += TLV_HEADER_LENGTH + len(tlv.payload())
    return None
