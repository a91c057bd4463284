"""mmproxy.tlv on its own: typed values, shape rules, vendor fallbacks, encoding limits."""

from __future__ import annotations

import pytest
from corpus import h, ssl_value, tlv

from mmproxy.errors import HeaderError, Reason
from mmproxy.tlv import (
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_CERT_SESS,
    PP2_CLIENT_SSL,
    PP2_SUBTYPE_SSL_CIPHER,
    PP2_SUBTYPE_SSL_CN,
    PP2_SUBTYPE_SSL_KEY_ALG,
    PP2_SUBTYPE_SSL_SIG_ALG,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_AWS,
    PP2_TYPE_AZURE,
    PP2_TYPE_CRC32C,
    PP2_TYPE_GCP,
    PP2_TYPE_NETNS,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    Alpn,
    Authority,
    AwsVpceId,
    AzureLinkId,
    Crc32c,
    GcpPscConnectionId,
    Netns,
    Noop,
    RawTlv,
    Ssl,
    SslString,
    Tlv,
    UniqueId,
    UnknownTlv,
    decode_tlvs,
    encode_tlvs,
    split_tlvs,
)


def test_registered_codes() -> None:
    assert (PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY, PP2_TYPE_CRC32C, PP2_TYPE_NOOP) == (1, 2, 3, 4)
    assert (PP2_TYPE_UNIQUE_ID, PP2_TYPE_SSL, PP2_TYPE_NETNS) == (0x05, 0x20, 0x30)
    assert (PP2_TYPE_GCP, PP2_TYPE_AWS, PP2_TYPE_AZURE) == (0xE0, 0xEA, 0xEE)
    subtypes = (
        PP2_SUBTYPE_SSL_VERSION,
        PP2_SUBTYPE_SSL_CN,
        PP2_SUBTYPE_SSL_CIPHER,
        PP2_SUBTYPE_SSL_SIG_ALG,
        PP2_SUBTYPE_SSL_KEY_ALG,
    )
    assert subtypes == (0x21, 0x22, 0x23, 0x24, 0x25)
    assert (PP2_CLIENT_SSL, PP2_CLIENT_CERT_CONN, PP2_CLIENT_CERT_SESS) == (1, 2, 4)


# (TLV, its type code, its encoded value)
TYPED = [
    (Alpn(b"h2"), 0x01, b"h2"),
    (Alpn(b""), 0x01, b""),
    (Authority("example.com"), 0x02, b"example.com"),
    (Authority("bücher.example"), 0x02, "bücher.example".encode()),
    (Crc32c(0xD45A11B9), 0x03, h("d4 5a 11 b9")),
    (Crc32c(), 0x03, bytes(4)),
    (Noop(), 0x04, b""),
    (Noop(b"\x00" * 7), 0x04, b"\x00" * 7),
    (UniqueId(b"\x01" * 128), 0x05, b"\x01" * 128),
    (Netns("blue"), 0x30, b"blue"),
    (Ssl(0x07, 0), 0x20, h("07 00000000")),
    (
        Ssl(0x01, 0x0A0B0C0D, (SslString(0x21, "TLSv1.3"), SslString(0x22, "Jürgen"))),
        0x20,
        ssl_value(0x01, 0x0A0B0C0D, tlv(0x21, b"TLSv1.3"), tlv(0x22, "Jürgen".encode())),
    ),
    (
        Ssl(0x00, 1, (UnknownTlv(0x26, b"?"),)),
        0x20,
        ssl_value(0x00, 1, tlv(0x26, b"?")),
    ),
    (AwsVpceId("vpce-0123456789abcdef0"), 0xEA, b"\x01vpce-0123456789abcdef0"),
    (AzureLinkId(0x21004501), 0xEE, h("01 01450021")),
    (GcpPscConnectionId(0x009B34D70A003C64), 0xE0, h("009b34d70a003c64")),
]
TYPED_IDS = [f"{type(t).__name__}-{i}" for i, (t, _, _) in enumerate(TYPED)]


@pytest.mark.parametrize(("value", "code", "payload"), TYPED, ids=TYPED_IDS)
def test_typed_tlv_payload_and_decode(value: Tlv, code: int, payload: bytes) -> None:
    assert value.code == code
    assert value.payload() == payload
    assert type(value).decode(payload) == value
    wire = tlv(code, payload)
    assert encode_tlvs([value]) == wire
    assert decode_tlvs(wire) == (value,)
    assert split_tlvs(wire) == [RawTlv(code, 3, payload)]


def test_unknown_tlv_is_kept_raw() -> None:
    unknown = UnknownTlv(0xF0, b"\x00\x01")
    assert unknown.code == 0xF0
    assert unknown.payload() == b"\x00\x01"
    assert decode_tlvs(tlv(0xF0, b"\x00\x01")) == (unknown,)


def test_decode_keeps_order_and_repeats() -> None:
    wire = tlv(0x01, b"a") + tlv(0xFF) + tlv(0x01, b"b") + tlv(0x04)
    tlvs = decode_tlvs(wire)
    assert tlvs == (Alpn(b"a"), UnknownTlv(0xFF, b""), Alpn(b"b"), Noop())
    assert encode_tlvs(tlvs) == wire


def test_decode_empty() -> None:
    assert decode_tlvs(b"") == ()
    assert encode_tlvs([]) == b""


def test_raw_offsets_are_relative_to_the_header() -> None:
    wire = tlv(0x01, b"h2") + tlv(0x03, bytes(4)) + tlv(0x03, bytes(4))
    raw = split_tlvs(wire, 28)
    # Both CRC32Cs are split out; refusing the second is the header parser's job.
    assert [t.offset for t in raw] == [28 + 3, 28 + 5 + 3, 28 + 5 + 7 + 3]
    assert [t.code for t in raw] == [0x01, 0x03, 0x03]


# ----------------------------------------------------------------- shape rules

SHAPE_ERRORS = [
    ("crc-0", tlv(0x03)),
    ("crc-3", tlv(0x03, bytes(3))),
    ("crc-5", tlv(0x03, bytes(5))),
    ("unique-id-129", tlv(0x05, bytes(129))),
    ("authority-ff", tlv(0x02, b"\xff")),
    ("authority-surrogate", tlv(0x02, b"\xed\xa0\x80")),
    ("netns-8bit", tlv(0x30, b"n\xe9t")),
    ("ssl-0", tlv(0x20)),
    ("ssl-4", tlv(0x20, bytes(4))),
    ("ssl-sub-stub", tlv(0x20, ssl_value(1, 0, b"\x21\x00"))),
    ("ssl-sub-over", tlv(0x20, ssl_value(1, 0, tlv(0x21, b"TLS", length=4)))),
    ("ssl-version-8bit", tlv(0x20, ssl_value(1, 0, tlv(0x21, b"TLS\xa0")))),
    ("ssl-cn-bad-utf8", tlv(0x20, ssl_value(1, 0, tlv(0x22, b"\xc3")))),
    ("ssl-cipher-8bit", tlv(0x20, ssl_value(1, 0, tlv(0x23, b"\x80")))),
    ("ssl-sig-alg-8bit", tlv(0x20, ssl_value(1, 0, tlv(0x24, b"\x80")))),
    ("ssl-key-alg-8bit", tlv(0x20, ssl_value(1, 0, tlv(0x25, b"\x80")))),
    ("stub-1", b"\x01"),
    ("stub-2", b"\x01\x00"),
    ("over", tlv(0x01, b"h2", length=3)),
    ("over-after-valid", tlv(0x04) + tlv(0xE0, bytes(8), length=9)),
]


@pytest.mark.parametrize("wire", [w for _, w in SHAPE_ERRORS], ids=[i for i, _ in SHAPE_ERRORS])
def test_shape_rules_refuse(wire: bytes) -> None:
    with pytest.raises(HeaderError) as info:
        decode_tlvs(wire)
    assert info.value.reason is Reason.V2_BAD_TLV
    assert info.value.detail


def test_shape_boundaries_accepted() -> None:
    assert decode_tlvs(tlv(0x05, bytes(128))) == (UniqueId(bytes(128)),)
    assert decode_tlvs(tlv(0x20, bytes(5))) == (Ssl(0, 0),)
    assert decode_tlvs(tlv(0x02, "ü".encode())) == (Authority("ü"),)
    ssl_cn = tlv(0x20, ssl_value(0, 0, tlv(0x22, "日本".encode())))
    assert decode_tlvs(ssl_cn) == (Ssl(0, 0, (SslString(0x22, "日本"),)),)


def test_overrun_detail_names_the_type() -> None:
    with pytest.raises(HeaderError) as info:
        decode_tlvs(tlv(0x02, b"ab", length=9))
    assert "0x02" in info.value.detail


# ----------------------------------------------------------------- vendor fallbacks

FALLBACKS = [
    ("aws-empty", 0xEA, b""),
    ("aws-subtype-2", 0xEA, b"\x02vpce-1"),
    ("aws-non-ascii", 0xEA, b"\x01vpce-\xe9"),
    ("azure-empty", 0xEE, b""),
    ("azure-4", 0xEE, h("01 450021")),
    ("azure-6", 0xEE, h("01 01450021 ff")),
    ("azure-subtype-0", 0xEE, h("00 01450021")),
    ("gcp-0", 0xE0, b""),
    ("gcp-7", 0xE0, bytes(7)),
    ("gcp-9", 0xE0, bytes(9)),
]


@pytest.mark.parametrize(
    ("code", "value"), [(c, v) for _, c, v in FALLBACKS], ids=[i for i, _, _ in FALLBACKS]
)
def test_vendor_shape_mismatch_is_kept_as_unknown(code: int, value: bytes) -> None:
    decoder = {0xEA: AwsVpceId, 0xEE: AzureLinkId, 0xE0: GcpPscConnectionId}[code]
    assert decoder.decode(value) == UnknownTlv(code, value)
    assert decode_tlvs(tlv(code, value)) == (UnknownTlv(code, value),)


def test_vendor_values() -> None:
    assert AwsVpceId.decode(b"\x01") == AwsVpceId("")
    assert AzureLinkId.decode(h("01 ffffffff")) == AzureLinkId(0xFFFFFFFF)
    assert AzureLinkId(1).payload() == h("01 01000000")  # little-endian
    assert GcpPscConnectionId.decode(b"\xff" * 8) == GcpPscConnectionId(2**64 - 1)
    assert GcpPscConnectionId(1).payload() == h("00000000 00000001")  # big-endian


# ----------------------------------------------------------------- SSL helpers


def test_ssl_text() -> None:
    ssl = Ssl(
        PP2_CLIENT_SSL,
        0,
        (
            UnknownTlv(0x21, b"not a string sub-TLV"),
            SslString(PP2_SUBTYPE_SSL_VERSION, "TLSv1.2"),
            SslString(PP2_SUBTYPE_SSL_VERSION, "TLSv1.3"),
            SslString(PP2_SUBTYPE_SSL_CN, "client.example"),
        ),
    )
    assert ssl.text(PP2_SUBTYPE_SSL_VERSION) == "TLSv1.2"
    assert ssl.text(PP2_SUBTYPE_SSL_CN) == "client.example"
    assert ssl.text(PP2_SUBTYPE_SSL_CIPHER) is None
    assert Ssl(0, 0).text(PP2_SUBTYPE_SSL_VERSION) is None


@pytest.mark.parametrize(
    ("client", "used_tls"),
    [(0x00, False), (0x01, True), (0x02, False), (0x03, True), (0x07, True), (0xFE, False)],
)
def test_ssl_client_used_tls(client: int, used_tls: bool) -> None:
    assert Ssl(client, 0).client_used_tls is used_tls


@pytest.mark.parametrize(
    ("client", "verify", "verified"),
    [
        (0x00, 0, False),  # no certificate at all
        (0x01, 0, False),  # TLS, but no client certificate
        (0x02, 0, True),  # certificate on this connection, verified
        (0x04, 0, True),  # certificate in the session, verified
        (0x07, 0, True),
        (0x03, 1, False),  # presented, failed verification
        (0x06, 0xFFFFFFFF, False),
    ],
)
def test_ssl_certificate_verified(client: int, verify: int, verified: bool) -> None:
    assert Ssl(client, verify).certificate_verified is verified


def test_ssl_string_encodings() -> None:
    assert SslString(PP2_SUBTYPE_SSL_CN, "Jürgen").payload() == "Jürgen".encode()
    assert SslString(PP2_SUBTYPE_SSL_CIPHER, "AES").payload() == b"AES"
    assert SslString(PP2_SUBTYPE_SSL_KEY_ALG, "RSA2048").code == PP2_SUBTYPE_SSL_KEY_ALG


# ----------------------------------------------------------------- encode limits


def test_encode_tlvs_value_limit() -> None:
    biggest = encode_tlvs([Noop(bytes(0xFFFF))])
    assert biggest[:3] == h("04 ffff")
    assert len(biggest) == 3 + 0xFFFF
    with pytest.raises(ValueError, match="65535"):
        encode_tlvs([Noop(bytes(0x10000))])
    with pytest.raises(ValueError, match="65535"):
        encode_tlvs([UnknownTlv(0xF0, bytes(70000))])
    with pytest.raises(ValueError, match="65535"):  # nested: an SSL sub-TLV too long
        encode_tlvs([Ssl(1, 0, (UnknownTlv(0x26, bytes(0x10000)),))])
