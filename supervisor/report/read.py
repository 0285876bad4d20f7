"""A run back from disk: ``events.jsonl`` fed to a builder, streaming, and the report's
files rebuilt from it (``lorasup report RUN_DIR``), whatever state lorasup left it in."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterable
from itertools import compress
from operator import not_
from pathlib import Path
from typing import Any

from lorasup.supervisor.liveness import lost_record
from lorasup.supervisor.report.builder import ReportBuilder
from lorasup.supervisor.report.files import write_all
from lorasup.supervisor.rundir import EVENTS_JSONL, LOSSES_CSV
from lorasup.supervisor.safefs import WriteFaults, write_all_fd

#: a step line exactly as the sink writes it (plain numbers only; anything else -> json)
_NUM = rb"(-?\d{1,30}(?:\.\d{1,30})?(?:[eE][-+]?\d{1,3})?)"
_STEP_LINE = re.compile(
    rb'^(?:\{"t":' + _NUM + rb',"kind":"step","step":(\d{1,18})(?:,"total":-?\d{1,18})?'
    rb'(?:,"loss":' + _NUM + rb')?(?:,"avg_loss":' + _NUM + rb')?(?:,"lr":' + _NUM + rb')?'
    rb'(?:,"epoch":(-?\d{1,18}))?\}|(.*))\r?$', re.M)
_READ_BLOCK = 1 << 20


def _floats(column: list[bytes]) -> list[float | None] | None:
    if column.count(b"") == len(column):
        return None
    if b"" not in column:
        return list(map(float, column))
    return [float(x) if x else None for x in column]


def read_into(builder: ReportBuilder, path: str | os.PathLike[str], *,
              on_skip: Callable[[int, str], None] | None = None) -> None:
    """Feed ``events.jsonl`` to ``builder``, streaming, in bounded memory.

    Step lines in the sink's own form are read in bulk with one regex per megabyte;
    every other line goes through ``json.loads``. A last line cut off mid-write (lorasup
    killed) or an unreadable line is skipped and reported to ``on_skip(line, why)``;
    nothing raises except opening the file.
    """
    with open(path, "rb") as fh:
        number = 0
        carry = b""
        while True:
            data = fh.read(_READ_BLOCK)
            if not data:
                break
            data = carry + data if carry else data
            end = data.rfind(b"\n")
            if end < 0:
                carry = data
                if len(carry) > 64 * _READ_BLOCK:  # one absurd line: skip it
                    number += 1
                    if on_skip is not None:
                        on_skip(number, "too long")
                    carry = b""
                continue
            carry = data[end + 1:]
            number = _read_lines(builder, data[:end], number, on_skip)
        if carry.strip():
            number += 1
            _read_one(builder, carry, number, on_skip, cut_off=True)


def _read_lines(builder: ReportBuilder, data: bytes, number: int,
                on_skip: Callable[[int, str], None] | None) -> int:
    found = _STEP_LINE.findall(data)
    if not found:
        return number
    cols = list(zip(*found, strict=True))
    steps = cols[1]
    start = 0
    for i in compress(range(len(steps)), map(not_, steps)):  # the lines that are no steps
        if i > start:
            _add_block(builder, cols, start, i)
        start = i + 1
        other = cols[6][i]
        if other.strip():
            _read_one(builder, other, number + i + 1, on_skip, cut_off=False)
    if start < len(steps):
        _add_block(builder, cols, start, len(steps))
    return number + len(steps)


def _add_block(builder: ReportBuilder, cols: list[tuple[bytes, ...]], start: int,
               end: int) -> None:
    whole = start == 0 and end == len(cols[0])
    t, step, loss, avg, lr, epoch = (list(c) if whole else list(c[start:end])
                                     for c in cols[:6])
    try:
        builder.add_steps(list(map(float, t)), list(map(int, step)), _floats(loss),
                          _floats(avg), _floats(lr),
                          None if epoch.count(b"") == len(epoch)
                          else [int(e) if e else None for e in epoch])
    except Exception:  # a report must survive any input
        builder.bad_records += end - start


def _read_one(builder: ReportBuilder, raw: bytes, number: int,
              on_skip: Callable[[int, str], None] | None, *, cut_off: bool) -> None:
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):  # includes UnicodeDecodeError
        if on_skip is not None:
            on_skip(number, "cut off" if cut_off else "undecodable")
        return
    if not isinstance(record, dict):
        if on_skip is not None:
            on_skip(number, "not an object")
        return
    builder.add(record)


def load(run_dir: str | os.PathLike[str],
         csv_out: Callable[[bytes], None] | None = None) -> ReportBuilder:
    """A builder fed with the run's ``events.jsonl`` (skipped lines noted)."""
    builder = ReportBuilder(csv_out=csv_out)
    skipped: list[tuple[int, str]] = []
    count = 0

    def skip(number: int, why: str) -> None:
        nonlocal count
        count += 1
        if len(skipped) < 3:
            skipped.append((number, why))

    read_into(builder, Path(run_dir) / EVENTS_JSONL, on_skip=skip)
    lost = lost_record(builder.started_record, builder.outcome is not None, builder.top_step)
    if lost is not None:
        builder.add(lost)  # its supervisor is gone: "lost", never "running" forever
    if count:
        first = ", ".join(f"line {n} ({why})" for n, why in skipped)
        builder.add_note(f"events.jsonl: {count} line(s) skipped: {first}"
                         + (", ..." if count > 3 else ""))
    return builder


def rebuild(run_dir: str | os.PathLike[str], *,
            model_files: Iterable[str | os.PathLike[str]] | None = None) -> dict[str, Any]:
    """Rebuild report.json, losses.csv and loss_curves.png from ``events.jsonl`` alone,
    streaming (memory does not grow with the run)."""
    import tempfile

    from lorasup.supervisor.plotchild import PlotChild

    run_dir = Path(run_dir)
    plot = PlotChild()
    plot.start()  # matplotlib's import overlaps the reading
    faults = WriteFaults()
    csv_fd, csv_tmp = -1, ""
    try:
        csv_fd, csv_tmp = tempfile.mkstemp(prefix=f".{LOSSES_CSV}.", suffix=".tmp",
                                           dir=run_dir)
    except OSError as exc:
        faults.record(LOSSES_CSV, exc)

    def csv_out(data: bytes) -> None:
        nonlocal csv_fd
        if csv_fd < 0:
            return
        try:
            write_all_fd(csv_fd, data)
        except OSError as exc:
            faults.record(LOSSES_CSV, exc)
            os.close(csv_fd)
            csv_fd = -1

    builder = load(run_dir, csv_out)
    if model_files is not None:
        builder.set_model_files(model_files)
    builder.finish_csv()
    if csv_fd >= 0:
        try:
            os.fchmod(csv_fd, 0o644)
            os.close(csv_fd)
            csv_fd = -1
            os.replace(csv_tmp, run_dir / LOSSES_CSV)
            builder.mark_written(LOSSES_CSV)
        except OSError as exc:
            faults.record(LOSSES_CSV, exc)
    if csv_tmp and not builder.is_written(LOSSES_CSV):
        with contextlib.suppress(OSError):
            os.unlink(csv_tmp)
    try:
        return write_all(run_dir, builder, render=plot.render, faults=faults,
                         csv_streamed=True)
    finally:
        plot.close()
