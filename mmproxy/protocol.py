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

The value types are in :mod:`mmproxy.header`, the two versions' grammars in
:mod:`mmproxy.protocol_v1` and :mod:`mmproxy.protocol_v2`; this module is the
one entry point, and re-exports the types.  Section numbers (§) refer to
HAProxy's doc/proxy-protocol.txt.
"""

from __future__ import annotations

import ipaddress

from mmproxy.errors import HeaderError, Reason
from mmproxy.header import (
    UNIX_PATH_LENGTH,
    V1_MAX_LENGTH,
    V1_PREFIX,
    V2_FIXED_LENGTH,
    V2_MAX_LENGTH,
    V2_SIGNATURE,
    Address,
    Command,
    Family,
    InetAddress,
    IPAddress,
    NeedMore,
    Parsed,
    ProxyHeader,
    Transport,
    UnixAddress,
)
from mmproxy.protocol_v1 import encode_v1, parse_v1
from mmproxy.protocol_v2 import IP_LENGTH_OF, encode_v2, parse_v2

__all__ = [
    "V1_MAX_LENGTH",
    "V2_FIXED_LENGTH",
    "V2_MAX_LENGTH",
    "V2_SIGNATURE",
    "Address",
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


def parse(data: bytes | bytearray | memoryview) -> NeedMore | Parsed:
    """Parse the header at the start of ``data`` (everything received so far)."""
    if not data:
        return NeedMore(1)
    first = data[0]
    if first == V1_PREFIX[0]:
        return parse_v1(bytes(data[:V1_MAX_LENGTH]))
    if first == V2_SIGNATURE[0]:
        return parse_v2(data)
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


def encode(header: ProxyHeader) -> bytes:
    """The wire form of ``header`` (v1 or v2 by ``header.version``).

    v2: a :class:`~mmproxy.tlv.Crc32c` TLV among ``header.tlvs`` gets the
    correct checksum whatever value it holds.  Raises ValueError for a header
    that cannot be expressed (v1 with TLVs, LOCAL or DGRAM; a body over 65535).
    """
    _check_encodable(header)
    if header.version == 1:
        return encode_v1(header)
    if header.version == 2:
        return encode_v2(header)
    raise ValueError(f"no PROXY protocol version {header.version}")


def _check_encodable(header: ProxyHeader) -> None:
    """Refuse what the wire cannot carry, rather than write bytes that mean something else."""
    for address in (header.source, header.destination):
        if isinstance(address, InetAddress):
            expected = IP_LENGTH_OF[header.family] or len(address.host.packed)
            if expected != len(address.host.packed):
                raise ValueError(f"{address.host} is not an {header.family.name} address")
            if not 0 <= address.port <= 0xFFFF:
                raise ValueError(f"port {address.port} is not 0-65535")
            if isinstance(address.host, ipaddress.IPv6Address) and address.host.scope_id:
                raise ValueError(f"{address.host}: the PROXY protocol carries no scope id")
        elif isinstance(address, UnixAddress) and len(address.path) > UNIX_PATH_LENGTH:
            raise ValueError(f"unix path of {len(address.path)} bytes, over {UNIX_PATH_LENGTH}")
