"""Write TensorBoard event files: a small TFRecord + protobuf encoder for tests and replays.

Written independently of ``supervisor.tensorboard`` (bitwise CRC, no shared code), so a
round trip through both checks each against the other; the real recordings check both
against TensorBoard itself.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable
from typing import BinaryIO

DT_FLOAT, DT_DOUBLE, DT_INT32, DT_STRING, DT_INT64, DT_BFLOAT16, DT_HALF = 1, 2, 3, 7, 9, 14, 19
WIRE_VARINT, WIRE_FIXED64, WIRE_LEN, WIRE_START_GROUP, WIRE_END_GROUP, WIRE_FIXED32 = (
    0, 1, 2, 3, 4, 5)


def crc32c(data: bytes) -> int:
    """Bit-at-a-time CRC-32C (Castagnoli): slow, obviously the definition."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """One TFRecord: length, masked CRC of the length, data, masked CRC of the data."""
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", masked_crc32c(length)) + data
            + struct.pack("<I", masked_crc32c(data)))


# ---------------------------------------------------------------------------- protobuf


def varint(value: int) -> bytes:
    """Base-128 varint; negative numbers as 64-bit two's complement (10 bytes)."""
    value &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def key(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def f_varint(field: int, value: int) -> bytes:
    return key(field, WIRE_VARINT) + varint(value)


def f_double(field: int, value: float) -> bytes:
    return key(field, WIRE_FIXED64) + struct.pack("<d", value)


def f_float(field: int, value: float) -> bytes:
    return key(field, WIRE_FIXED32) + struct.pack("<f", value)


def f_bytes(field: int, payload: bytes | str) -> bytes:
    if isinstance(payload, str):
        payload = payload.encode()
    return key(field, WIRE_LEN) + varint(len(payload)) + payload


def unknown_fields(first_field: int = 90) -> bytes:
    """One field of every wire type (group included) that no decoder here knows."""
    n = first_field
    return (f_varint(n, 300) + f_double(n + 1, 1.5) + f_bytes(n + 2, b"\x08\x01junk")
            + key(n + 3, WIRE_START_GROUP) + f_varint(1, 7) + f_bytes(2, b"x")
            + key(n + 3, WIRE_END_GROUP) + f_float(n + 4, 2.5))


def scalar_value(tag: str, value: float, *, extra: bytes = b"") -> bytes:
    """``Summary.Value`` with ``simple_value`` (what torch's SummaryWriter writes)."""
    return f_bytes(1, tag) + f_float(2, value) + extra


def tensor_proto(
    dtype: int,
    *,
    shape: Iterable[int] = (),
    content: bytes | None = None,
    float_val: Iterable[float] = (),
    double_val: Iterable[float] = (),
    int_val: Iterable[int] = (),
    int64_val: Iterable[int] = (),
    half_val: Iterable[int] = (),
    string_val: Iterable[bytes] = (),
    packed: bool = True,
    extra: bytes = b"",
) -> bytes:
    """A ``TensorProto``; ``packed=False`` writes repeated numbers one field each."""
    dims = b"".join(f_bytes(2, f_varint(1, size)) for size in shape)
    out = f_varint(1, dtype) + f_bytes(2, dims)
    if content is not None:
        out += f_bytes(4, content)

    def repeated(field: int, items: Iterable[float], fmt: str | None) -> bytes:
        items = list(items)
        if not items:
            return b""
        if fmt is None:
            if packed:
                return f_bytes(field, b"".join(varint(int(v)) for v in items))
            return b"".join(f_varint(field, int(v)) for v in items)
        if packed:
            return f_bytes(field, b"".join(struct.pack(fmt, v) for v in items))
        writer = f_float if fmt == "<f" else f_double
        return b"".join(writer(field, v) for v in items)

    out += repeated(5, float_val, "<f") + repeated(6, double_val, "<d")
    out += repeated(7, int_val, None) + repeated(10, int64_val, None)
    out += repeated(13, half_val, None)
    out += b"".join(f_bytes(8, s) for s in string_val)
    return out + extra


def tensor_value(tag: str, tensor: bytes, *, plugin_name: str | None = "scalars") -> bytes:
    """``Summary.Value`` with a tensor (tf.summary / new-style writers), plus metadata."""
    out = f_bytes(1, tag)
    if plugin_name is not None:
        out += f_bytes(9, f_bytes(1, f_bytes(1, plugin_name)))
    return out + f_bytes(8, tensor)


def event(
    *,
    wall_time: float,
    step: int | None = None,
    file_version: str | None = None,
    values: Iterable[bytes] = (),
    extra: bytes = b"",
) -> bytes:
    """A serialized ``Event``; ``values`` are encoded ``Summary.Value`` messages."""
    out = f_double(1, wall_time)
    if step is not None:
        out += f_varint(2, step)
    if file_version is not None:
        out += f_bytes(3, file_version)
    values = list(values)
    if values:
        out += f_bytes(5, b"".join(f_bytes(1, v) for v in values))
    return out + extra


# ---------------------------------------------------------------------------- files


def write_record(fh: BinaryIO, data: bytes) -> int:
    record = frame(data)
    fh.write(record)
    return len(record)


def write_file_version(
    fh: BinaryIO, wall_time: float | None = None, version: str = "brain.Event:2"
) -> int:
    """The first record of every event file; returns the bytes written."""
    stamp = time.time() if wall_time is None else wall_time
    return write_record(fh, event(wall_time=stamp, file_version=version))


def write_scalar_event(fh: BinaryIO, tag: str, step: int, value: float, wall_time: float) -> int:
    """One scalar as torch's SummaryWriter writes it; returns the bytes written."""
    return write_record(fh, event(wall_time=wall_time, step=step,
                                  values=[scalar_value(tag, value)]))
