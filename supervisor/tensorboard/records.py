"""One event file, record by record: TFRecord framing, CRCs, and damage handling.

``uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)``, all
little-endian; see the package docstring for what a damaged or growing file does.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import structlog

from lorasup.supervisor.tensorboard.crc import length_crc as crc_of_length
from lorasup.supervisor.tensorboard.crc import masked_crc32c
from lorasup.supervisor.tensorboard.proto import DecodeError, decode_record

log = structlog.get_logger()

MAX_RECORD_BYTES = 16 * 1024 * 1024
"""Records longer than this are never buffered (a scalar event is well under 1 KiB)."""
_CHUNK_BYTES = 1024 * 1024
_HEADER_BYTES = 12  # uint64 length + uint32 masked CRC of those 8 bytes
_FOOTER_BYTES = 4  # uint32 masked CRC of the data
_LEN_AND_CRC = struct.Struct("<QI")
_U32 = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class ScalarRecord:
    """One scalar as written: ``value`` is a float32 widened exactly for simple_value."""

    tag: str
    step: int
    value: float
    wall_time: float


class EventFileReader:
    """Follows one event file from a saved offset; see the module docstring for damage.

    Not thread-safe; ``EventFileFollower`` serializes its calls.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_record_bytes: int = MAX_RECORD_BYTES,
        chunk_bytes: int = _CHUNK_BYTES,
    ) -> None:
        if not 0 < max_record_bytes < 1 << 32:
            raise ValueError("max_record_bytes must be between 1 and 2**32 - 1")
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be positive")
        self.path = Path(path)
        self.max_record_bytes = max_record_bytes
        self.chunk_bytes = chunk_bytes
        self.offset = 0
        """File offset of the first byte not yet consumed (a record boundary)."""
        self.records_read = 0
        self.corrupt_records = 0
        self.oversized_records = 0
        self.file_version: str | None = None
        self.more_pending = False
        """The last ``read_new`` stopped at its ``max_records``."""
        # Resync state while the length header at self.offset fails its CRC.
        self._scan_from: int | None = None
        self._shrink_logged = False
        # A valid header has its top bytes zero (length <= max_record_bytes): a fast
        # bytes.find() prefilter for resync candidates.
        length_bytes = (max_record_bytes.bit_length() + 7) // 8
        self._zero_top = bytes(8 - length_bytes)
        self._zero_top_at = length_bytes

    def read_new(self, max_records: int | None = None) -> list[ScalarRecord]:
        """Every scalar in the records completed since the last call, in file order.

        ``max_records`` caps the records consumed by this call (memory for a big file
        found late); ``more_pending`` then says whether the cap stopped it.
        """
        out: list[ScalarRecord] = []
        self.more_pending = False
        try:
            fh = open(self.path, "rb")  # noqa: SIM115 - closed below, reopened per call
        except FileNotFoundError:
            return out
        with fh:
            size = os.fstat(fh.fileno()).st_size
            if size < self.offset:
                if not self._shrink_logged:
                    self._shrink_logged = True
                    log.warning("tensorboard.file_shrank", path=str(self.path),
                                size=size, offset=self.offset)
                return out
            if size > self.offset:
                self._read(fh, out, -1 if max_records is None else max_records)
        return out

    def _read(self, fh: BinaryIO, out: list[ScalarRecord], budget: int) -> None:
        masked = masked_crc32c
        length_crc_of = crc_of_length
        unpack_header = _LEN_AND_CRC.unpack_from
        unpack_crc = _U32.unpack_from
        max_len = self.max_record_bytes
        fh.seek(self.offset)
        buf = b""
        start = self.offset  # file offset of buf[0]
        pos = 0
        need = self.chunk_bytes
        while True:
            chunk = fh.read(max(self.chunk_bytes, need))
            if not chunk:
                return
            buf = buf[pos:] + chunk if pos < len(buf) else chunk
            start += pos
            pos = 0
            n = len(buf)
            need = self.chunk_bytes
            while pos + _HEADER_BYTES <= n:
                if budget == 0:
                    self.more_pending = True
                    return
                length, length_crc = unpack_header(buf, pos)
                if length_crc != length_crc_of(buf[pos : pos + 8], length):
                    self.offset = start + pos
                    if self._resync(fh):
                        fh.seek(self.offset)
                        buf, start, pos, n = b"", self.offset, 0, 0
                        break
                    return
                self._scan_from = None
                data_end = pos + _HEADER_BYTES + length
                if length > max_len:
                    self.offset = start + pos
                    if not self._skip_oversized(fh, length):
                        return
                    fh.seek(self.offset)
                    buf, start, pos, n = b"", self.offset, 0, 0
                    break
                if data_end + _FOOTER_BYTES > n:
                    need = data_end + _FOOTER_BYTES - n
                    break
                data = buf[pos + _HEADER_BYTES : data_end]
                if masked(data) != unpack_crc(buf, data_end)[0]:
                    self._corrupt("data CRC mismatch", start + pos)
                else:
                    self._decode(data, start + pos, out)
                pos = data_end + _FOOTER_BYTES
                self.offset = start + pos
                budget -= 1

    def _decode(self, data: bytes, offset: int, out: list[ScalarRecord]) -> None:
        try:
            event = decode_record(data)
        except (DecodeError, IndexError, struct.error, RecursionError) as exc:
            self._corrupt(f"undecodable event: {exc}", offset)
            return
        self.records_read += 1
        if event.file_version is not None:
            self.file_version = event.file_version
        for tag, value in event.scalars:
            out.append(ScalarRecord(tag, event.step, value, event.wall_time))

    def _corrupt(self, why: str, offset: int) -> None:
        self.corrupt_records += 1
        log.warning("tensorboard.corrupt_record", path=str(self.path), offset=offset, why=why)

    def _skip_oversized(self, fh: BinaryIO, length: int) -> bool:
        """Step over a trusted but huge record once all of it is in the file."""
        record_end = self.offset + _HEADER_BYTES + length + _FOOTER_BYTES
        if os.fstat(fh.fileno()).st_size < record_end:
            return False
        self.oversized_records += 1
        log.info("tensorboard.oversized_record_skipped", path=str(self.path),
                 offset=self.offset, length=length)
        self.offset = record_end
        return True

    def _resync(self, fh: BinaryIO) -> bool:
        """Find the next complete record passing both CRCs after the bad header at offset.

        True: ``self.offset`` moved there (one corrupt record counted). False: none yet;
        ``_scan_from`` remembers how far candidates were ruled out, for the next call.
        """
        bad_at = self.offset
        scan = max(bad_at + 1, self._scan_from or 0)
        if self._scan_from is None:
            log.warning("tensorboard.bad_length_crc", path=str(self.path), offset=bad_at)
        zero_top, zero_at = self._zero_top, self._zero_top_at
        while True:
            fh.seek(scan)
            window = fh.read(self.chunk_bytes + _HEADER_BYTES)
            if len(window) < _HEADER_BYTES:
                self._scan_from = scan
                return False
            i = 0
            last = len(window) - _HEADER_BYTES  # last candidate with a whole header here
            while True:
                hit = window.find(zero_top, i + zero_at)
                cand = hit - zero_at
                if hit < 0 or cand > last:
                    break
                length, length_crc = _LEN_AND_CRC.unpack_from(window, cand)
                if length <= self.max_record_bytes and masked_crc32c(
                    window[cand : cand + 8]
                ) == length_crc:
                    verdict = self._check_candidate(fh, scan + cand, length)
                    if verdict is None:  # not all in the file yet: wait here
                        self._scan_from = scan + cand
                        return False
                    if verdict:
                        self._scan_from = None
                        self.offset = scan + cand
                        self._corrupt(f"{scan + cand - bad_at} bytes with a bad length CRC",
                                      bad_at)
                        return True
                i = cand + 1
            scan += last + 1

    def _check_candidate(self, fh: BinaryIO, at: int, length: int) -> bool | None:
        """Whether the record at ``at`` passes its data CRC; None if it is incomplete."""
        fh.seek(at + _HEADER_BYTES)
        data = fh.read(length + _FOOTER_BYTES)
        if len(data) < length + _FOOTER_BYTES:
            return None
        return masked_crc32c(data[:length]) == _U32.unpack_from(data, length)[0]
