"""The protobuf wire format, as far as reading an Event needs: varints, field keys, skipping
any field of any wire type, length-delimited and packed fields. Every read is bounded by
``end``; a field that runs past it raises :class:`DecodeError`."""

from __future__ import annotations

import struct


class DecodeError(ValueError):
    """The record passed its CRC but is not a well-formed ``Event`` protobuf."""


F32 = struct.Struct("<f")
F64 = struct.Struct("<d")

def varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; returns (value, position after it)."""
    byte = buf[pos]
    if byte < 0x80:
        return byte, pos + 1
    result = byte & 0x7F
    shift = 7
    pos += 1
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise DecodeError("varint longer than 10 bytes")


def check_end(pos: int, end: int) -> None:
    """A varint may run past its message's end; that message is malformed."""
    if pos != end:
        raise DecodeError("last field runs past the end of its message")


def signed64(value: int) -> int:
    """int32/int64 fields hold two's complement in 64 bits (negative numbers: 10 bytes)."""
    value &= 0xFFFFFFFFFFFFFFFF
    return value - (1 << 64) if value >= 1 << 63 else value


def skip_field(buf: bytes, pos: int, end: int, key: int) -> int:
    """Skip the value of an unknown field; returns the position after it."""
    wire_type = key & 7
    if wire_type == 0:
        _, pos = varint(buf, pos)
    elif wire_type == 1:
        pos += 8
    elif wire_type == 2:
        length, pos = varint(buf, pos)
        pos += length
    elif wire_type == 5:
        pos += 4
    elif wire_type == 3:  # deprecated group: skip fields up to its matching END_GROUP
        field = key >> 3
        while True:
            if pos >= end:
                raise DecodeError("unterminated group")
            inner, pos = varint(buf, pos)
            if inner & 7 == 4:
                if inner >> 3 != field:
                    raise DecodeError("mismatched end of group")
                break
            pos = skip_field(buf, pos, end, inner)
    else:  # 4 (END_GROUP without a start) and the unused 6, 7
        raise DecodeError(f"unexpected wire type {wire_type}")
    if pos > end:
        raise DecodeError("field runs past the end of its message")
    return pos


def length_delimited(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """Return (start, stop) of a length-delimited field's payload, checked against end."""
    length, pos = varint(buf, pos)
    stop = pos + length
    if stop > end:
        raise DecodeError("length-delimited field runs past the end of its message")
    return pos, stop


def packed_or_single(
    buf: bytes, pos: int, end: int, key: int, fixed: struct.Struct | None, out: list[float]
) -> int:
    """Append the values of a repeated numeric field (packed or one element) to ``out``."""
    wire_type = key & 7
    if wire_type == 2:
        start, stop = length_delimited(buf, pos, end)
        if fixed is None:
            while start < stop:
                value, start = varint(buf, start)
                out.append(signed64(value))
            if start != stop:
                raise DecodeError("packed varints run past their field")
        else:
            if (stop - start) % fixed.size:
                raise DecodeError("packed fixed-width field has a partial element")
            out.extend(v for (v,) in fixed.iter_unpack(buf[start:stop]))
        return stop
    if fixed is None and wire_type == 0:
        value, pos = varint(buf, pos)
        out.append(signed64(value))
        return pos
    if fixed is not None and wire_type == (5 if fixed.size == 4 else 1):
        if pos + fixed.size > end:
            raise DecodeError("fixed-width field runs past the end of its message")
        out.append(fixed.unpack_from(buf, pos)[0])
        return pos + fixed.size
    return skip_field(buf, pos, end, key)
