"""Play a recording from ../shared/recordings back as a real child process.

Writes each chunk's bytes to the same fd (1 or 2) at its recorded time divided by
``--speed``, then exits with the recorded code (a negative code: kills itself with that
signal). Extra arguments (such as an injected ``--max_train_steps=N``) are ignored, so a
supervisor can treat this exactly like the trainer that was recorded.

    python replay.py RECORDING.jsonl [--speed 50] [--stop-at-signal]
                     [--tensorboard DIR] [ignored args...]

``--stop-at-signal``: a recording that got a signal from its recorder; replay until it,
then wait to be signalled for real and play the rest (the trainer's reaction) after.

``--tensorboard DIR``: DIR holds the event files the recorded run wrote
(``events.out.tfevents.*``). The replay writes them again, the way the run did, under the
``--logging_dir`` found in its own argv (``--logging_dir=X`` or ``--logging_dir X``; none:
nothing is written, as kohya writes nothing without it):

- where: a file directly in DIR (kohya's copies) goes to
  ``X/<timestamp>/network_train/<name>``, kohya's layout; a file in a subfolder of DIR goes
  to the same subpath below X;
- what: the recorded TFRecord bytes of each record, split by the framing and copied as
  they are (never re-encoded), in file order, flushed after each write;
- when: the ``file_version`` record at the time the run wrote it (its wall time minus the
  recording's ``started``, scaled like the chunks); the records of step k right after the
  stderr chunk holding the first progress-bar frame of step k (``steps: ... k/N``);
  ``epoch_average`` records, and records of steps no bar frame showed, at the end, just
  before exiting.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

EVENT_FILE_PREFIX = "events.out.tfevents."
#: a tqdm training bar frame (kohya ``steps:``, diffusers ``Steps:``) and its step
BAR = re.compile(rb"steps:\s+\d+%\|[^|\r\n]*\|\s*(\d+)/\d+", re.IGNORECASE)

# when a recorded record may be written
AT_TIME, AT_STEP, AT_END = "time", "step", "end"


@dataclass
class Record:
    raw: bytes  # the whole TFRecord: length, length CRC, data, data CRC
    when: str
    step: int = 0
    t: float = 0.0  # AT_TIME: seconds into the recording


@dataclass
class EventFile:
    relative: Path  # below the logging dir
    records: list[Record]
    next: int = 0
    fh: BinaryIO | None = None
    target: Path | None = field(default=None)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes):
    """(field number, value) of a protobuf message: ints, raw 8/4 bytes, or payloads."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:  # groups: no scalar event of a real writer has one
            return
        yield key >> 3, value


def _classify(data: bytes, started: float | None) -> Record:
    """When the record of this ``Event`` was written: by its file_version, step and tags."""
    wall_time = 0.0
    step = 0
    is_version = False
    tags: list[bytes] = []
    for number, value in _fields(data):
        if number == 1 and isinstance(value, bytes) and len(value) == 8:
            wall_time = struct.unpack("<d", value)[0]
        elif number == 2 and isinstance(value, int):
            step = value
        elif number == 3:
            is_version = True
        elif number == 5 and isinstance(value, bytes):  # summary: value (1) repeated
            for vnum, summary_value in _fields(value):
                if vnum == 1 and isinstance(summary_value, bytes):
                    tags.extend(tag for tnum, tag in _fields(summary_value)
                                if tnum == 1 and isinstance(tag, bytes))
    if is_version:
        t = wall_time - started if started is not None and wall_time > 0 else 0.0
        return Record(b"", AT_TIME, t=max(t, 0.0))
    if tags and all(b"epoch" in tag for tag in tags):
        return Record(b"", AT_END, step=step)
    return Record(b"", AT_STEP, step=step)


def _split(path: Path, started: float | None) -> list[Record]:
    """The records of a TFRecord file, by its framing (a torn tail is left out)."""
    blob = path.read_bytes()
    records: list[Record] = []
    pos = 0
    while pos + 12 <= len(blob):
        (length,) = struct.unpack_from("<Q", blob, pos)
        end = pos + 12 + length + 4
        if end > len(blob):
            break
        record = _classify(blob[pos + 12:pos + 12 + length], started)
        record.raw = blob[pos:end]
        records.append(record)
        pos = end
    return records


def logging_dir(argv: list[str]) -> str | None:
    """The last ``--logging_dir`` value in argv, in either spelling."""
    found: str | None = None
    for i, arg in enumerate(argv):
        if arg.startswith("--logging_dir="):
            found = arg.split("=", 1)[1]
        elif arg == "--logging_dir" and i + 1 < len(argv):
            found = argv[i + 1]
    return found


class TensorBoardReplay:
    """Writes the recorded event files again, record by record, as the run did."""

    def __init__(self, recorded: Path, out_dir: Path, started: float | None) -> None:
        self.out_dir = out_dir
        self.stamp = time.strftime("%Y%m%d%H%M%S")
        self.files: list[EventFile] = []
        self.bar_step = -1
        for path in sorted(recorded.rglob(EVENT_FILE_PREFIX + "*")):
            if path.is_file():
                self.files.append(EventFile(path.relative_to(recorded),
                                            _split(path, started)))

    def next_time(self) -> float | None:
        """The recording time of the next timed record not yet written."""
        times = [f.records[f.next].t for f in self.files
                 if f.next < len(f.records) and f.records[f.next].when == AT_TIME]
        return min(times) if times else None

    def saw_chunk(self, fd: int, data: bytes) -> None:
        if fd == 2:
            for match in BAR.finditer(data):
                self.bar_step = max(self.bar_step, int(match[1]))
        self.release(now=None)

    def release(self, now: float | None, end: bool = False) -> None:
        """Write every record whose moment came, in file order (a file never skips one)."""
        for event_file in self.files:
            while event_file.next < len(event_file.records):
                record = event_file.records[event_file.next]
                due = end or (
                    record.when == AT_TIME and now is not None and record.t <= now
                ) or (record.when == AT_STEP and record.step <= self.bar_step)
                if not due:
                    break
                self._write(event_file, record.raw)
                event_file.next += 1

    def _write(self, event_file: EventFile, raw: bytes) -> None:
        if event_file.fh is None:
            relative = event_file.relative
            if len(relative.parts) == 1:  # kohya's copies: rebuild its folder layout
                relative = Path(self.stamp, "network_train", relative)
            event_file.target = self.out_dir / relative
            event_file.target.parent.mkdir(parents=True, exist_ok=True)
            event_file.fh = open(event_file.target, "wb")  # noqa: SIM115 - closed in close()
        event_file.fh.write(raw)
        event_file.fh.flush()

    def close(self) -> None:
        for event_file in self.files:
            if event_file.fh is not None:
                event_file.fh.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("recording")
    parser.add_argument("--speed", type=float, default=1.0)
    parser.add_argument("--stop-at-signal", action="store_true")
    parser.add_argument("--tensorboard", type=Path, default=None)
    args, ignored = parser.parse_known_args()
    with open(args.recording, encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    tb: TensorBoardReplay | None = None
    out_dir = logging_dir(ignored)
    if args.tensorboard is not None and out_dir is not None:
        started = records[0].get("started") if records and records[0]["kind"] == "meta" else None
        tb = TensorBoardReplay(args.tensorboard, Path(out_dir), started)
    start = time.monotonic()
    offset = 0.0
    received: list[int] = []

    def wait_until(t: float) -> None:
        """Sleep to recording time t, writing timed event records on the way."""
        while tb is not None:
            due = tb.next_time()
            if due is None or due > t:
                break
            delay = start + (due - offset) / args.speed - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            tb.release(now=due)
        delay = start + (t - offset) / args.speed - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    if args.stop_at_signal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda s, _f: received.append(s))
    code = 0
    for record in records:
        kind = record["kind"]
        if kind == "chunk":
            wait_until(record["t"])
            data = base64.b64decode(record["b64"])
            os.write(record["fd"], data)
            if tb is not None:
                tb.saw_chunk(record["fd"], data)
        elif kind == "signal" and args.stop_at_signal:
            while not received:
                signal.pause()
            # The rest of the recording is the reaction: play it from now on.
            offset = record["t"]
            start = time.monotonic()
        elif kind == "exit":
            code = int(record["returncode"])
            wait_until(record["t"])
            break
    if tb is not None:
        tb.release(now=None, end=True)
        tb.close()
    sys.stdout.flush()
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        signal.pause()
    return code


if __name__ == "__main__":
    sys.exit(main())
