"""``losses.csv``: every recorded step at full resolution, written as the report folds rows.

The header is fixed by the first fold (the ``lr/<group>`` tags known then; a tag that
appears later is counted in a note); the EMA column follows the report's basis.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from lorasup.supervisor.report.values import CSV_COLUMNS
from lorasup.supervisor.report.window import Window


def csv_cells(column: Sequence[Any]) -> list[str]:
    """CSV cells of a column of numbers (no quoting needed): "" for None, repr for floats."""
    n = len(column)
    missing = column.count(None)
    if missing == n:
        return [""] * n
    if not missing:
        if column.count(column[0]) == n:
            return [repr(column[0])] * n
        distinct = set(column)
        if len(distinct) * 4 < n:  # times of a read, 3-digit bar values: format each once
            spelled = {v: repr(v) for v in distinct}
            return list(map(spelled.__getitem__, column))
        return list(map(repr, column))
    return ["" if v is None else repr(v) for v in column]


def rows_text(rows: Iterable[Sequence[Any]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode("utf-8")


class LossesCsv:
    """The CSV's text, streamed to ``out`` as rows are folded (or made at once)."""

    def __init__(self, out: Callable[[bytes], None] | None, window: Window,
                 one_epoch: Callable[[], bool]) -> None:
        self.out = out
        self.window = window
        self.one_epoch = one_epoch
        self.tags: list[str] | None = None
        self.basis: str | None = None
        #: lr tags that appeared after the header was written
        self.late_tags: set[str] = set()

    def header(self, basis_hint: str) -> bytes:
        self.tags = sorted(self.window.tags)
        self.basis = basis_hint
        return rows_text([list(CSV_COLUMNS) + self.tags])

    def body(self, rows: dict[str, Any]) -> bytes:
        assert self.tags is not None
        epochs = rows["epoch"]
        if None in epochs and self.one_epoch():
            epochs = [1 if e is None else e for e in epochs]
        ema = rows["ema:loss"] if self.basis == "loss" else rows["ema:avg_loss"]
        tags = rows["tags"]
        for tag in tags:
            if tag not in self.tags:
                self.late_tags.add(tag)
        n = len(rows["step"])
        columns = [rows["step"], rows["loss"], rows["avg_loss"], ema, rows["lr"], epochs,
                   rows["t"], *(tags.get(tag) or [None] * n for tag in self.tags)]
        # the EMA is derived: 8 significant digits (the repr of 17 digits costs 1 us a row)
        ema_cells = (list(map("{:.8g}".format, ema)) if None not in ema
                     else ["" if v is None else f"{v:.8g}" for v in ema])
        cells = [ema_cells if i == 3 else csv_cells(column)
                 for i, column in enumerate(columns)]
        return ("\n".join(map(",".join, zip(*cells, strict=True))) + "\n").encode()

    def basis_hint(self, rows: dict[str, Any] | None) -> str:
        if self.window.summary.stats["loss"].count or (
                rows is not None and rows["loss"].count(None) != len(rows["loss"])):
            return "loss"
        return "avg_loss"

    def write(self, rows: dict[str, Any]) -> None:
        """The rows of one fold (the window's ``on_fold``)."""
        assert self.out is not None
        text = b""
        if self.tags is None:
            text = self.header(self.basis_hint(rows))
        self.out(text + self.body(rows))

    def finish(self) -> None:
        """Write the rows still in the window (the end of a streamed ``losses.csv``)."""
        if self.out is None:
            return
        _summary, rows = self.window.snapshot_fold()
        if self.tags is None:
            self.out(self.header(self.basis_hint(rows)))
        if rows is not None:
            self.out(self.body(rows))

    def text(self) -> bytes:
        """All of ``losses.csv`` for a report that never streamed (nothing folded yet)."""
        out: list[bytes] = []
        saved = self.out, self.tags, self.basis
        self.out, self.tags = out.append, None
        try:
            self.finish()
        finally:
            self.out, self.tags, self.basis = saved
        return b"".join(out)
