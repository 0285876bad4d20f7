"""CRC-32C (Castagnoli), as TFRecord frames carry it: a table loop in pure Python."""

from __future__ import annotations

_CRC32C_POLY = 0x82F63B78  # Castagnoli, bit-reversed


def _make_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC32C_POLY if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _make_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C of ``data``; pass a previous result as ``crc`` to continue it."""
    table = _CRC_TABLE
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes | bytearray | memoryview) -> int:
    """The masked CRC TFRecord stores (masking keeps CRCs of CRCs well distributed)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


_LENGTH_CRCS: dict[int, int] = {}
_LENGTH_CRC_CACHE_BELOW = 4096  # scalar events are ~40-100 bytes: a few dozen entries


def length_crc(header: bytes, length: int) -> int:
    """Masked CRC of a record's 8 length bytes; records repeat lengths, so cache small ones."""
    crc = _LENGTH_CRCS.get(length)
    if crc is None:
        crc = masked_crc32c(header)
        if length < _LENGTH_CRC_CACHE_BELOW:
            _LENGTH_CRCS[length] = crc
    return crc
