"""The report's window: the latest steps, exact and open to late values, sorted by step.

A step may be reported again (a second bar frame, a TensorBoard scalar a second later),
so the last :data:`WINDOW` to ``2 * WINDOW`` steps are kept as columns; older rows are
folded into :class:`Folded` (and streamed to ``losses.csv``) in blocks of ``WINDOW``.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any

from lorasup.supervisor.report.folded import Folded
from lorasup.supervisor.report.values import COLUMNS, WINDOW

#: (steps, t, epoch, columns, lr tags) of a block of rows
Rows = tuple[list[int], list[float | None], list[int | None],
             dict[str, list[float | None]], dict[str, list[float | None]]]


class Window:
    """The exact rows and the summary they fold into; memory O(WINDOW)."""

    def __init__(self, bounds: Callable[[], tuple[int, int | None]],
                 on_fold: Callable[[dict[str, Any]], None] | None = None) -> None:
        #: the requested range (resumed_from, resumed_from + requested]
        self.bounds = bounds
        #: receives the rows each fold made (losses.csv, streamed)
        self.on_fold = on_fold
        self.steps: list[int] = []
        self.t: list[float | None] = []
        self.epoch: list[int | None] = []
        self.cols: dict[str, list[float | None]] = {name: [] for name in COLUMNS}
        #: ``lr/<group>`` tags, one column each
        self.tags: dict[str, list[float | None]] = {}
        self.tag_sources: dict[str, str] = {}
        self.summary = Folded()
        #: whether any row was folded yet (a late value may then have nowhere to go)
        self.folded = False

    def is_late(self, step: int) -> bool:
        """A step at or below the highest one already folded into the summary."""
        return self.folded and step <= (self.summary.max_step or 0)

    def row(self, step: int) -> int:
        """The window row of ``step`` (appended or inserted if new); -1 for a step already
        folded into the summary."""
        steps = self.steps
        count = len(steps)
        if count and step == steps[-1]:
            return count - 1
        if not count or step > steps[-1]:
            if self.is_late(step):
                return -1
            steps.append(step)
            self.t.append(None)
            self.epoch.append(None)
            for column in self.cols.values():
                column.append(None)
            for column in self.tags.values():
                column.append(None)
            if count + 1 > 2 * WINDOW:
                self.fold(WINDOW)
                return len(self.steps) - 1
            return count
        at = bisect.bisect_left(steps, step)
        if steps[at] == step:
            return at
        if self.is_late(step):
            return -1
        steps.insert(at, step)
        self.t.insert(at, None)
        self.epoch.insert(at, None)
        for column in self.cols.values():
            column.insert(at, None)
        for column in self.tags.values():
            column.insert(at, None)
        return at

    def extend(self, steps: list[int], times: list[Any], epochs: list[int | None],
               loss: list[float | None] | None, avg_loss: list[float | None] | None,
               lr: list[float | None] | None) -> None:
        """New steps past every row, in increasing order (the fast path)."""
        n = len(steps)
        none = [None] * n
        self.steps.extend(steps)
        self.t.extend(times)
        self.epoch.extend(epochs)
        cols = self.cols
        cols["loss_c"].extend(loss or none)
        cols["avg_c"].extend(avg_loss or none)
        cols["lr_c"].extend(lr or none)
        for name in ("loss_tb", "avg_tb", "lr_tb"):
            cols[name].extend(none)
        for column in self.tags.values():
            column.extend(none)
        while len(self.steps) > 2 * WINDOW:
            self.fold(WINDOW)

    def add_tag(self, tag: str) -> None:
        self.tags[tag] = [None] * len(self.steps)

    def take(self, count: int) -> Rows:
        """The first ``count`` rows, removed from the window."""
        steps, t, epoch = self.steps[:count], self.t[:count], self.epoch[:count]
        del self.steps[:count], self.t[:count], self.epoch[:count]
        cols = {}
        for name, column in self.cols.items():
            cols[name] = column[:count]
            del column[:count]
        tags = {}
        for tag, column in self.tags.items():
            tags[tag] = column[:count]
            del column[:count]
        return steps, t, epoch, cols, tags

    def fold(self, count: int) -> None:
        rows = self.summary.fold(*self.take(count), *self.bounds())
        self.folded = True
        if self.on_fold is not None and rows is not None:
            self.on_fold(rows)

    def copy_rows(self) -> Rows:
        """Every row still in the window (copies: folding them must not change the window)."""
        return (list(self.steps), list(self.t), list(self.epoch),
                {k: list(v) for k, v in self.cols.items()},
                {k: list(v) for k, v in self.tags.items()})

    def snapshot_fold(self) -> tuple[Folded, dict[str, Any] | None]:
        """A copy of the summary with the window folded into it, and the rows it made."""
        summary = self.summary.copy()
        return summary, summary.fold(*self.copy_rows(), *self.bounds())
