"""Decoding a serialized ``tensorflow.Event`` protobuf, only as far as its scalars.

``wall_time``, ``step``, ``file_version`` and ``summary.value[].tag`` with ``simple_value``
or a one-element numeric ``tensor`` are read; every other field of every wire type is
skipped. A record that is not a well-formed Event raises :class:`DecodeError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from lorasup.supervisor.tensorboard.wire import (
    F32,
    F64,
    DecodeError,
    check_end,
    length_delimited,
    packed_or_single,
    signed64,
    skip_field,
    varint,
)

__all__ = ["DecodeError", "DecodedEvent", "decode_event", "decode_record"]


# TensorFlow DataType numbers of the scalar kinds a summary tensor can carry.
DT_FLOAT, DT_DOUBLE, DT_INT32, DT_INT64, DT_BFLOAT16, DT_HALF = 1, 2, 3, 9, 14, 19
_CONTENT_FORMATS = {
    DT_FLOAT: struct.Struct("<f"),
    DT_DOUBLE: struct.Struct("<d"),
    DT_INT32: struct.Struct("<i"),
    DT_INT64: struct.Struct("<q"),
    DT_HALF: struct.Struct("<e"),
}


def _num_elements(buf: bytes, pos: int, end: int) -> int | None:
    """Elements of a ``TensorShapeProto``; None when a size or the rank is unknown."""
    count = 1
    while pos < end:
        key, pos = varint(buf, pos)
        if key == 0x12:  # dim (2), a Dim message
            start, pos = length_delimited(buf, pos, end)
            size = 0  # proto3 default: an omitted size is 0
            while start < pos:
                dkey, start = varint(buf, start)
                if dkey == 0x08:  # size (1), int64
                    raw, start = varint(buf, start)
                    size = signed64(raw)
                else:
                    start = skip_field(buf, start, pos, dkey)
            check_end(start, pos)
            if size < 0:
                return None
            count *= size
        elif key == 0x18:  # unknown_rank (3), bool
            flag, pos = varint(buf, pos)
            if flag:
                return None
        else:
            pos = skip_field(buf, pos, end, key)
    check_end(pos, end)
    return count


def _half_from_bits(bits: int, dtype: int) -> float:
    bits &= 0xFFFF
    if dtype == DT_BFLOAT16:  # the top half of a float32
        return F32.unpack(struct.pack("<I", bits << 16))[0]
    return struct.unpack("<e", struct.pack("<H", bits))[0]


def _tensor_scalar(buf: bytes, pos: int, end: int) -> float | None:
    """The value of a one-element numeric ``TensorProto``; None for anything else.

    Follows TensorBoard's reading: ``tensor_content`` (raw little-endian bytes) wins over
    the typed repeated fields. A tensor with no values at all is skipped (TensorBoard
    fails on it; TensorFlow would read zeros, but no writer produces it).
    """
    dtype = 0
    elements: int | None = 1  # no tensor_shape means a scalar
    content: bytes | None = None
    values: dict[int, list[float]] = {}
    while pos < end:
        key, pos = varint(buf, pos)
        field = key >> 3
        if key == 0x08:  # dtype (1)
            dtype, pos = varint(buf, pos)
        elif key == 0x12:  # tensor_shape (2)
            start, pos = length_delimited(buf, pos, end)
            elements = _num_elements(buf, start, pos)
        elif key == 0x22:  # tensor_content (4)
            start, pos = length_delimited(buf, pos, end)
            content = buf[start:pos]
        elif field == 5:  # float_val
            pos = packed_or_single(buf, pos, end, key, F32, values.setdefault(5, []))
        elif field == 6:  # double_val
            pos = packed_or_single(buf, pos, end, key, F64, values.setdefault(6, []))
        elif field in (7, 10, 13):  # int_val, int64_val, half_val (16-bit patterns)
            pos = packed_or_single(buf, pos, end, key, None, values.setdefault(field, []))
        else:
            pos = skip_field(buf, pos, end, key)
    check_end(pos, end)
    if elements != 1:
        return None
    if dtype == DT_BFLOAT16 and content is not None:
        if len(content) != 2:
            return None
        return _half_from_bits(int.from_bytes(content, "little"), dtype)
    fmt = _CONTENT_FORMATS.get(dtype)
    if fmt is None and dtype != DT_BFLOAT16:
        return None  # strings, bools, complex, resources: not a scalar metric
    if content is not None:
        if fmt is None or len(content) != fmt.size:
            return None
        return float(fmt.unpack(content)[0])
    field = {DT_FLOAT: 5, DT_DOUBLE: 6, DT_INT32: 7, DT_INT64: 10}.get(dtype, 13)
    found = values.get(field)
    if not found:
        return None
    if field == 13:
        return _half_from_bits(int(found[0]), dtype)
    return float(found[0])


def _plugin_name(buf: bytes, pos: int, end: int) -> str:
    """``SummaryMetadata.plugin_data.plugin_name``, or "" when absent."""
    name = ""
    while pos < end:
        key, pos = varint(buf, pos)
        if key == 0x0A:  # plugin_data (1)
            start, pos = length_delimited(buf, pos, end)
            while start < pos:
                pkey, start = varint(buf, start)
                if pkey == 0x0A:  # plugin_name (1)
                    s, start = length_delimited(buf, start, pos)
                    name = buf[s:start].decode("utf-8", "replace")
                else:
                    start = skip_field(buf, start, pos, pkey)
            check_end(start, pos)
        else:
            pos = skip_field(buf, pos, end, key)
    check_end(pos, end)
    return name


def _summary_value(buf: bytes, pos: int, end: int) -> tuple[str, float] | None:
    """(tag, value) of a ``Summary.Value`` holding a scalar; None for images, text, etc."""
    tag = ""
    simple: float | None = None
    tensor: tuple[int, int] | None = None
    metadata: tuple[int, int] | None = None
    kind = 0  # the member of the ``value`` oneof seen last (protobuf: last one wins)
    while pos < end:
        key, pos = varint(buf, pos)
        if key == 0x0A:  # tag (1)
            start, pos = length_delimited(buf, pos, end)
            tag = buf[start:pos].decode("utf-8", "replace")
        elif key == 0x15:  # simple_value (2), float32
            if pos + 4 > end:
                raise DecodeError("simple_value runs past the end of its message")
            simple = F32.unpack_from(buf, pos)[0]
            pos += 4
            kind = 2
        elif key == 0x42:  # tensor (8)
            tensor = length_delimited(buf, pos, end)
            pos = tensor[1]
            kind = 8
        elif key == 0x4A:  # metadata (9)
            metadata = length_delimited(buf, pos, end)
            pos = metadata[1]
        else:
            field = key >> 3
            if 3 <= field <= 6 and key & 7 == 2:  # histo, image, audio: other oneof members
                kind = field
            pos = skip_field(buf, pos, end, key)
    check_end(pos, end)
    if kind == 2 and simple is not None:
        return tag, simple
    if kind == 8 and tensor is not None:
        if metadata is not None and _plugin_name(buf, *metadata) not in ("", "scalars"):
            return None  # a one-element tensor of another plugin (text, hparams) is no metric
        value = _tensor_scalar(buf, *tensor)
        if value is not None:
            return tag, value
    return None


@dataclass(frozen=True, slots=True)
class DecodedEvent:
    """The parts of an ``Event`` lorasup uses; ``scalars`` holds (tag, value) pairs."""

    wall_time: float
    step: int
    file_version: str | None
    scalars: tuple[tuple[str, float], ...]


def decode_event(data: bytes) -> DecodedEvent:
    """Decode one serialized ``tensorflow.Event``; raises DecodeError if malformed."""
    try:
        return decode_record(data)
    except DecodeError:
        raise
    except (IndexError, struct.error, RecursionError) as exc:  # cut short, absurdly nested
        raise DecodeError(f"truncated field: {exc}") from exc


def _decode_simple_event(buf: bytes) -> DecodedEvent | None:
    """The layout torch's SummaryWriter writes for one scalar, in one pass; else None.

    ``09 wall_time(8) 10 step(varint) 2a L1 [0a L2 [0a L3 tag 15 value(4)]]`` with
    one-byte lengths. Anything else (other fields, order or sizes) takes the general path.
    """
    n = len(buf)
    if n < 24 or buf[0] != 0x09 or buf[9] != 0x10:
        return None
    step = buf[10]
    pos = 11
    if step >= 0x80:
        step, pos = varint(buf, 10)
        if pos + 13 > n:
            return None
        step = signed64(step)
    if buf[pos] != 0x2A or buf[pos + 2] != 0x0A or buf[pos + 4] != 0x0A:
        return None
    l1, l2, l3 = buf[pos + 1], buf[pos + 3], buf[pos + 5]
    tag_end = pos + 6 + l3
    if l1 >= 0x80 or pos + 2 + l1 != n or l2 != l1 - 2 or l3 != l2 - 7 or buf[tag_end] != 0x15:
        return None
    tag = buf[pos + 6 : tag_end].decode("utf-8", "replace")
    return DecodedEvent(F64.unpack_from(buf, 1)[0], step, None,
                        ((tag, F32.unpack_from(buf, tag_end + 1)[0]),))


def decode_record(buf: bytes) -> DecodedEvent:
    """:func:`decode_event` without wrapping a short buffer's errors (the reader's hot path
    catches IndexError and struct.error itself)."""
    simple = _decode_simple_event(buf)
    if simple is not None:
        return simple
    wall_time = 0.0
    step = 0
    file_version: str | None = None
    scalars: list[tuple[str, float]] = []
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = varint(buf, pos)
        if key == 0x09:  # wall_time (1), double
            if pos + 8 > end:
                raise DecodeError("wall_time runs past the end of the event")
            wall_time = F64.unpack_from(buf, pos)[0]
            pos += 8
        elif key == 0x10:  # step (2), int64
            raw, pos = varint(buf, pos)
            step = signed64(raw)
        elif key == 0x1A:  # file_version (3)
            start, pos = length_delimited(buf, pos, end)
            file_version = buf[start:pos].decode("utf-8", "replace")
        elif key == 0x2A:  # summary (5)
            start, pos = length_delimited(buf, pos, end)
            while start < pos:  # Summary: value (1) repeated
                skey, start = varint(buf, start)
                if skey == 0x0A:
                    vstart, start = length_delimited(buf, start, pos)
                    pair = _summary_value(buf, vstart, start)
                    if pair is not None:
                        scalars.append(pair)
                else:
                    start = skip_field(buf, start, pos, skey)
            check_end(start, pos)
        else:
            pos = skip_field(buf, pos, end, key)
    check_end(pos, end)
    return DecodedEvent(wall_time, step, file_version, tuple(scalars))
