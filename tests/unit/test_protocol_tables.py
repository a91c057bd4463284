"""The v2 parser's lookup tables agree with the enums and with the spec's sizes (§2.2)."""

from __future__ import annotations

from mmproxy.header import UNIX_PATH_LENGTH, Command, Family, Transport
from mmproxy.protocol_v2 import (
    BLOCK_LENGTH_OF,
    COMMAND_OF,
    FAMILY_OF,
    IP_LENGTH_OF,
    TRANSPORT_OF,
    VALID_FAM_BYTE,
)


def test_each_table_is_indexed_by_its_enum_value() -> None:
    assert [member.value for member in COMMAND_OF] == list(range(len(Command)))
    assert [member.value for member in FAMILY_OF] == list(range(len(Family)))
    assert [member.value for member in TRANSPORT_OF] == list(range(len(Transport)))
    assert len(BLOCK_LENGTH_OF) == len(IP_LENGTH_OF) == len(Family)


def test_valid_fam_bytes_are_unspec_or_a_defined_family_over_a_defined_transport() -> None:
    defined = {
        family << 4 | transport
        for family in (Family.INET, Family.INET6, Family.UNIX)
        for transport in (Transport.STREAM, Transport.DGRAM)
    }
    assert {byte for byte in range(256) if VALID_FAM_BYTE[byte]} == defined | {0x00}


def test_address_block_sizes() -> None:
    for family in (Family.INET, Family.INET6):
        # two addresses and two 16-bit ports
        assert BLOCK_LENGTH_OF[family] == 2 * IP_LENGTH_OF[family] + 4
    assert IP_LENGTH_OF[Family.INET] == 4
    assert IP_LENGTH_OF[Family.INET6] == 16
    assert BLOCK_LENGTH_OF[Family.UNIX] == 2 * UNIX_PATH_LENGTH == 216
    assert BLOCK_LENGTH_OF[Family.UNSPEC] == IP_LENGTH_OF[Family.UNSPEC] == 0
