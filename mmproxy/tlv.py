"""PROXY v2 TLVs (spec section 2.2): typed values, decoding and encoding.

Sans-I/O and stdlib-only, like :mod:`mmproxy.protocol`, which is its only
caller on the receiving side.

Strictness policy:

* Structure is always checked: every TLV header (3 bytes) and value must fit
  exactly in the space it is given, at the top level and inside ``PP2_TYPE_SSL``.
  An overrun is a malformed header and the connection is refused.
* Types the spec registers (0x01-0x05, 0x20-0x25, 0x30) must carry values of
  the registered shape: a CRC32C of 4 bytes, a UNIQUE_ID of at most 128 bytes,
  an AUTHORITY in UTF-8, ASCII where the spec says US-ASCII, an SSL block of at
  least 5 bytes.  Anything else is refused with a reason.
* The vendor types (AWS 0xEA, Azure 0xEE, GCP 0xE0) live in the spec's custom
  range 0xE0-0xEF, which any sender may use for its own purposes, so a value
  that does not have the vendor's shape is kept as an :class:`UnknownTlv`
  rather than refused.
* Unknown types are kept raw, in order; repeated types are allowed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Protocol

from mmproxy.errors import HeaderError, Reason

# Registered type codes (spec section 2.2).
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_TYPE_NETNS = 0x30
# Vendor types in the custom range 0xE0-0xEF (spec section 2.2.8).
PP2_TYPE_GCP = 0xE0  # Google Private Service Connect
PP2_TYPE_AWS = 0xEA  # AWS PrivateLink
PP2_TYPE_AZURE = 0xEE  # Azure Private Link
PP2_SUBTYPE_AWS_VPCE_ID = 0x01
PP2_SUBTYPE_AZURE_PRIVATEENDPOINT_LINKID = 0x01

# PP2_TYPE_SSL "client" bits (spec section 2.2.6).
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

UNIQUE_ID_MAX_LENGTH = 128  # spec section 2.2.5
TLV_HEADER_LENGTH = 3  # one type byte, then a big-endian 16-bit length
_SSL_FIXED = struct.Struct("!BI")  # client:u8, verify:u32be


class Tlv(Protocol):
    """What every TLV value offers: its type code and its encoded value."""

    @property
    def code(self) -> int: ...

    def payload(self) -> bytes: ...


class _TlvValueError(Exception):
    """A TLV value of the wrong shape; turned into a HeaderError by the caller."""


class _Registered:
    """Base of the TLV types with a fixed type code, given as ``CODE``."""

    __slots__ = ()
    CODE: ClassVar[int]

    @property
    def code(self) -> int:
        return self.CODE


def _ascii(value: bytes, what: str) -> str:
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        raise _TlvValueError(f"{what} is not US-ASCII") from None


def _utf8(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise _TlvValueError(f"{what} is not UTF-8") from None


@dataclass(frozen=True, slots=True)
class UnknownTlv:
    """A TLV this parser has no type for, or a vendor TLV of unexpected shape."""

    type_code: int
    value: bytes

    @property
    def code(self) -> int:
        return self.type_code

    def payload(self) -> bytes:
        return self.value


@dataclass(frozen=True, slots=True)
class Alpn(_Registered):
    """PP2_TYPE_ALPN: the negotiated application protocol, e.g. ``b"h2"``."""

    CODE: ClassVar[int] = PP2_TYPE_ALPN
    protocol: bytes

    def payload(self) -> bytes:
        return self.protocol

    @classmethod
    def decode(cls, value: bytes) -> Alpn:
        return cls(value)


@dataclass(frozen=True, slots=True)
class Authority(_Registered):
    """PP2_TYPE_AUTHORITY: the host name the client asked for (usually TLS SNI)."""

    CODE: ClassVar[int] = PP2_TYPE_AUTHORITY
    host: str

    def payload(self) -> bytes:
        return self.host.encode("utf-8")

    @classmethod
    def decode(cls, value: bytes) -> Authority:
        return cls(_utf8(value, "AUTHORITY"))


@dataclass(frozen=True, slots=True)
class Crc32c(_Registered):
    """PP2_TYPE_CRC32C: checksum of the whole header, verified by the parser.

    When encoding, the checksum given here is ignored and recomputed.
    """

    CODE: ClassVar[int] = PP2_TYPE_CRC32C
    checksum: int = 0

    def payload(self) -> bytes:
        return self.checksum.to_bytes(4, "big")

    @classmethod
    def decode(cls, value: bytes) -> Crc32c:
        if len(value) != 4:
            raise _TlvValueError(f"CRC32C value is {len(value)} bytes, not 4")
        return cls(int.from_bytes(value, "big"))


@dataclass(frozen=True, slots=True)
class Noop(_Registered):
    """PP2_TYPE_NOOP: padding, ignored."""

    CODE: ClassVar[int] = PP2_TYPE_NOOP
    padding: bytes = b""

    def payload(self) -> bytes:
        return self.padding

    @classmethod
    def decode(cls, value: bytes) -> Noop:
        return cls(value)


@dataclass(frozen=True, slots=True)
class UniqueId(_Registered):
    """PP2_TYPE_UNIQUE_ID: an opaque connection id of at most 128 bytes."""

    CODE: ClassVar[int] = PP2_TYPE_UNIQUE_ID
    unique_id: bytes

    def payload(self) -> bytes:
        return self.unique_id

    @classmethod
    def decode(cls, value: bytes) -> UniqueId:
        if len(value) > UNIQUE_ID_MAX_LENGTH:
            raise _TlvValueError(f"UNIQUE_ID is {len(value)} bytes, over {UNIQUE_ID_MAX_LENGTH}")
        return cls(value)


@dataclass(frozen=True, slots=True)
class Netns(_Registered):
    """PP2_TYPE_NETNS: the name of the sender's network namespace."""

    CODE: ClassVar[int] = PP2_TYPE_NETNS
    name: str

    def payload(self) -> bytes:
        return self.name.encode("ascii")

    @classmethod
    def decode(cls, value: bytes) -> Netns:
        return cls(_ascii(value, "NETNS"))


@dataclass(frozen=True, slots=True)
class SslString:
    """One of the SSL sub-TLVs that carry a string (VERSION, CN, CIPHER, SIG_ALG, KEY_ALG)."""

    subtype: int
    text: str

    @property
    def code(self) -> int:
        return self.subtype

    def payload(self) -> bytes:
        encoding = "utf-8" if self.subtype == PP2_SUBTYPE_SSL_CN else "ascii"
        return self.text.encode(encoding)


_SSL_STRING_NAMES = {
    PP2_SUBTYPE_SSL_VERSION: "SSL_VERSION",
    PP2_SUBTYPE_SSL_CN: "SSL_CN",
    PP2_SUBTYPE_SSL_CIPHER: "SSL_CIPHER",
    PP2_SUBTYPE_SSL_SIG_ALG: "SSL_SIG_ALG",
    PP2_SUBTYPE_SSL_KEY_ALG: "SSL_KEY_ALG",
}


_SSL_STRING_NAME_OF = tuple(_SSL_STRING_NAMES.get(code) for code in range(256))  # as _DECODER_OF


def _decode_ssl_sub(code: int, value: bytes) -> Tlv:
    name = _SSL_STRING_NAME_OF[code]
    if name is None:
        return UnknownTlv(code, value)
    # The common name is UTF-8 (section 2.2.6); every other string is US-ASCII.
    text = _utf8(value, name) if code == PP2_SUBTYPE_SSL_CN else _ascii(value, name)
    return SslString(code, text)


@dataclass(frozen=True, slots=True)
class Ssl(_Registered):
    """PP2_TYPE_SSL: how the client reached the sender over TLS, with sub-TLVs."""

    CODE: ClassVar[int] = PP2_TYPE_SSL
    client: int
    verify: int
    sub_tlvs: tuple[Tlv, ...] = ()

    def payload(self) -> bytes:
        return _SSL_FIXED.pack(self.client, self.verify) + encode_tlvs(self.sub_tlvs)

    @property
    def client_used_tls(self) -> bool:
        return bool(self.client & PP2_CLIENT_SSL)

    @property
    def certificate_verified(self) -> bool:
        """A client certificate was presented and verified (``verify == 0``)."""
        return self.verify == 0 and bool(
            self.client & (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS)
        )

    def text(self, subtype: int) -> str | None:
        """The string of the first sub-TLV of ``subtype``, e.g. PP2_SUBTYPE_SSL_VERSION."""
        for sub in self.sub_tlvs:
            if isinstance(sub, SslString) and sub.subtype == subtype:
                return sub.text
        return None

    @classmethod
    def decode(cls, value: bytes) -> Ssl:
        if len(value) < _SSL_FIXED.size:
            raise _TlvValueError(f"SSL value is {len(value)} bytes, less than {_SSL_FIXED.size}")
        client, verify = _SSL_FIXED.unpack_from(value)
        subs = tuple(
            _decode_ssl_sub(code, sub_value)
            for code, _, sub_value in _split(value, _SSL_FIXED.size, "SSL sub-TLV")
        )
        return cls(client, verify, subs)


@dataclass(frozen=True, slots=True)
class AwsVpceId(_Registered):
    """PP2_TYPE_AWS, subtype VPCE_ID: the AWS PrivateLink endpoint id."""

    CODE: ClassVar[int] = PP2_TYPE_AWS
    vpce_id: str

    def payload(self) -> bytes:
        return bytes([PP2_SUBTYPE_AWS_VPCE_ID]) + self.vpce_id.encode("ascii")

    @classmethod
    def decode(cls, value: bytes) -> Tlv:
        if len(value) < 1 or value[0] != PP2_SUBTYPE_AWS_VPCE_ID or not value[1:].isascii():
            return UnknownTlv(cls.CODE, value)
        return cls(value[1:].decode("ascii"))


@dataclass(frozen=True, slots=True)
class AzureLinkId(_Registered):
    """PP2_TYPE_AZURE, subtype PRIVATEENDPOINT_LINKID: a little-endian uint32."""

    CODE: ClassVar[int] = PP2_TYPE_AZURE
    link_id: int

    def payload(self) -> bytes:
        return bytes([PP2_SUBTYPE_AZURE_PRIVATEENDPOINT_LINKID]) + self.link_id.to_bytes(
            4, "little"
        )

    @classmethod
    def decode(cls, value: bytes) -> Tlv:
        if len(value) != 5 or value[0] != PP2_SUBTYPE_AZURE_PRIVATEENDPOINT_LINKID:
            return UnknownTlv(cls.CODE, value)
        return cls(int.from_bytes(value[1:], "little"))


@dataclass(frozen=True, slots=True)
class GcpPscConnectionId(_Registered):
    """PP2_TYPE_GCP: the Private Service Connect connection id, a big-endian uint64."""

    CODE: ClassVar[int] = PP2_TYPE_GCP
    connection_id: int

    def payload(self) -> bytes:
        return self.connection_id.to_bytes(8, "big")

    @classmethod
    def decode(cls, value: bytes) -> Tlv:
        if len(value) != 8:
            return UnknownTlv(cls.CODE, value)
        return cls(int.from_bytes(value, "big"))


# Type code -> decoder.  A table, so adding a type is one line.
_DECODERS: dict[int, Callable[[bytes], Tlv]] = {
    PP2_TYPE_ALPN: Alpn.decode,
    PP2_TYPE_AUTHORITY: Authority.decode,
    PP2_TYPE_CRC32C: Crc32c.decode,
    PP2_TYPE_NOOP: Noop.decode,
    PP2_TYPE_UNIQUE_ID: UniqueId.decode,
    PP2_TYPE_SSL: Ssl.decode,
    PP2_TYPE_NETNS: Netns.decode,
    PP2_TYPE_AWS: AwsVpceId.decode,
    PP2_TYPE_AZURE: AzureLinkId.decode,
    PP2_TYPE_GCP: GcpPscConnectionId.decode,
}
# The same, indexed by the type byte: every connection's thread decodes, and on free-threaded
# CPython a lookup in a dict with int keys locks it (a tuple index does not).
_DECODER_OF: tuple[Callable[[bytes], Tlv] | None, ...] = tuple(
    _DECODERS.get(code) for code in range(256)
)


class RawTlv(NamedTuple):
    """One TLV as it lies in the header, before its value is interpreted."""

    code: int
    offset: int  # where the value starts in the whole header
    value: bytes


def _split(data: bytes, start: int, what: str) -> Iterator[tuple[int, int, bytes]]:
    """Yield (type, offset, value) for each TLV in ``data[start:]``, which they must fill."""
    offset = start
    end = len(data)
    while offset < end:
        if end - offset < TLV_HEADER_LENGTH:
            raise _TlvValueError(
                f"{end - offset} stray byte(s) at offset {offset}, too short for a {what} header"
            )
        code = data[offset]
        length = int.from_bytes(data[offset + 1 : offset + 3], "big")
        value_start = offset + TLV_HEADER_LENGTH
        if value_start + length > end:
            raise _TlvValueError(
                f"{what} 0x{code:02x} at offset {offset} declares {length} bytes "
                f"but only {end - value_start} remain"
            )
        yield code, value_start, data[value_start : value_start + length]
        offset = value_start + length


def split_tlvs(data: bytes, base_offset: int = 0) -> list[RawTlv]:
    """Split the TLV area of a v2 header into raw TLVs, checking only the structure.

    ``base_offset`` is where ``data`` starts inside the whole header, so that
    :attr:`RawTlv.offset` points into the header (the CRC32C check needs it).
    Raises :class:`HeaderError` (``V2_BAD_TLV``) when a TLV overruns the area.
    """
    try:
        return [RawTlv(code, base_offset + at, value) for code, at, value in _split(data, 0, "TLV")]
    except _TlvValueError as exc:
        raise HeaderError(Reason.V2_BAD_TLV, str(exc)) from None


def decode_tlv(raw: RawTlv) -> Tlv:
    """Interpret one raw TLV.  Raises :class:`HeaderError` (``V2_BAD_TLV``) for a bad value."""
    decoder = _DECODER_OF[raw.code]
    if decoder is None:
        return UnknownTlv(raw.code, raw.value)
    try:
        return decoder(raw.value)
    except _TlvValueError as exc:
        raise HeaderError(Reason.V2_BAD_TLV, str(exc)) from None


def decode_tlvs(data: bytes) -> tuple[Tlv, ...]:
    """Split and interpret a whole TLV area (no CRC32C verification: the header does that)."""
    return tuple(decode_tlv(raw) for raw in split_tlvs(data))


def encode_tlvs(tlvs: Iterable[Tlv]) -> bytes:
    """Encode TLVs in order.  Raises ValueError for a value too long for a TLV."""
    parts = []
    for tlv in tlvs:
        try:
            value = tlv.payload()
        except (OverflowError, struct.error) as error:  # an integer field out of range
            raise ValueError(f"TLV 0x{tlv.code:02x}: {error}") from error
        if len(value) > 0xFFFF:
            raise ValueError(f"TLV 0x{tlv.code:02x} value is {len(value)} bytes, over 65535")
        parts.append(bytes([tlv.code]) + len(value).to_bytes(2, "big") + value)
    return b"".join(parts)
