"""CRC32C (Castagnoli), the checksum of the PROXY v2 ``PP2_TYPE_CRC32C`` TLV.

RFC 4960 appendix B defines it: reflected polynomial 0x82F63B78, initial value
and final XOR 0xFFFFFFFF.  A header is at most 16 + 65535 bytes and the TLV is
rare, so a table-driven loop in pure Python is fast enough and keeps the
parser free of C extensions (which would re-enable the GIL on free-threaded
builds).
"""

from __future__ import annotations

_POLYNOMIAL = 0x82F63B78


def _make_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _POLYNOMIAL if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _make_table()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """Return the CRC32C of ``data`` as an unsigned 32-bit integer."""
    crc = 0xFFFFFFFF
    table = _TABLE
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
