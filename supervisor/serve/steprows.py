"""The series' bulk path over a run of step records (curves.py): the regexes that read
them as ``events.step_json`` writes them, and :class:`Rows`, which finds one record's line
again when a bucket needs its time or lr (read only there, not for a million rows)."""

from __future__ import annotations

import bisect
import math
import operator
import re

#: a step record as events.step_json writes it (the fast path; anything else goes through
#: json.loads): t, step, total, loss, avg_loss, lr
STEP_LINE = re.compile(
    rb'\{"t":([-0-9.e+]+),"kind":"step","step":([0-9]{1,18})(?:,"total":([0-9]{1,18}))?'
    rb'(?:,"loss":("?[-0-9.e+naif]+"?))?(?:,"avg_loss":("?[-0-9.e+naif]+"?))?'
    rb'(?:,"lr":("?[-0-9.e+naif]+"?))?(?:,"epoch":([0-9]{1,18}))?\}')
#: the bulk path's pass over a run of step records: each line whole, only the fields read
#: for every row kept (step, loss, avg_loss, epoch); the rest is read where it is needed
STEP_ROWS = re.compile(
    rb'(?m)^\{"t":[-0-9.e+]++,"kind":"step","step":(0|[1-9][0-9]{0,17}+)'
    rb'(?:,"total":[0-9]{1,18}+)?+'
    rb'(?:,"loss":("?[-0-9.e+naif]++"?))?+(?:,"avg_loss":("?[-0-9.e+naif]++"?))?+'
    rb'(?:,"lr":"?[-0-9.e+naif]++"?)?+(?:,"epoch":([0-9]{1,18}+))?+\}\n')
ROW_STEP, ROW_LOSS, ROW_EPOCH = (operator.itemgetter(g) for g in (0, 1, 3))
STEP_TOTAL = re.compile(rb'"total":([0-9]{1,18})')
class Rows:
    """Where the bulk path's rows are in their segment, found when a bucket needs one's
    time or lr: each row is one whole line (STEP_ROWS matched it), its step written without
    leading zeros and followed by a comma (a loss or avg_loss follows), and the steps are
    sorted, so a row is found by its step, searched from the last row found."""

    def __init__(self, segment: bytes, steps: list[int]) -> None:
        self.segment, self.steps = segment, steps
        self.row, self.at = 0, 0  # a row, and where its line starts

    def line(self, row: int) -> re.Match[bytes]:
        """``row``'s line, matched by STEP_LINE (rows asked for in order)."""
        seg, steps, at, known = self.segment, self.steps, self.at, self.row
        if row > known:
            step = steps[row]
            first = row if steps[row - 1] < step else bisect.bisect_left(
                steps, step, known, row)
            if first > known:  # a larger step: its first row is the first line naming it
                at = seg.rfind(b"\n", 0, seg.index(b',"step":%d,' % step, at)) + 1
            else:
                first = known
            for _ in range(row - first):  # a repeated step: the lines after its first
                at = seg.index(b"\n", at) + 1
            self.row, self.at = row, at
        return STEP_LINE.match(seg, at)  # type: ignore[return-value]

    def lr(self, line: re.Match[bytes], row: int, first: int) -> float | None:
        """The last finite lr of rows ``first..row`` (what the line path keeps), ``line``
        being ``row``'s."""
        seg = self.segment
        while True:
            text = line.group(6)
            if text is not None:
                lr = float(text.strip(b'"'))
                if math.isfinite(lr):
                    return lr
            row -= 1
            if row < first:
                return None
            above = seg.rfind(b"\n", 0, line.start() - 1) + 1  # the line before
            line = STEP_LINE.match(seg, above)  # type: ignore[assignment]
