"""The steps folded out of the report's window: statistics, EMAs, epochs, pace, buckets.

Each block of rows (sorted by step) is folded once, in step order; what the block made
on the way (merged series, EMAs, pace points) is handed back for ``losses.csv`` and for an
every-step report.
"""

from __future__ import annotations

from itertools import compress
from operator import ne
from typing import Any

from lorasup.supervisor.report.pace import Pace
from lorasup.supervisor.report.values import MAX_EPOCHS, PREFIXES, ema
from lorasup.supervisor.report.values import merged as tb_over_console
from lorasup.supervisor.summary import Buckets, Stats


class Folded:
    """Everything the report keeps of the steps folded out of the window: O(1) in steps."""

    def __init__(self) -> None:
        self.rows = 0  # in-range steps folded
        self.max_step: int | None = None  # the highest step folded, in range or not
        self.outside = 0
        self.stats = {"loss": Stats(), "avg_loss": Stats()}
        self.ema: dict[str, float | None] = {"loss": None, "avg_loss": None}
        self.sources = {p: [0, 0] for p in PREFIXES}  # prefix -> [tensorboard, console]
        self.tag_present: dict[str, int] = {}
        self.epochs: dict[int | None, list[Any]] = {}  # epoch -> [steps, Stats of loss]
        self.epochs_dropped = 0
        self.pace = Pace()
        #: does the trainer's running average restart at each epoch? counted at epoch
        #: boundaries where both it and the per-step loss are known
        self.last_epoch: int | None = None
        self.avg_restarts = 0
        self.avg_carries = 0
        self.min_t: float | None = None
        self.first_timed: tuple[int, float] | None = None
        self.last_timed: tuple[int, float] | None = None
        self.buckets = Buckets()

    def copy(self) -> Folded:
        other = Folded.__new__(Folded)
        other.__dict__.update(self.__dict__)
        other.stats = {k: v.copy() for k, v in self.stats.items()}
        other.ema = dict(self.ema)
        other.sources = {k: list(v) for k, v in self.sources.items()}
        other.tag_present = dict(self.tag_present)
        other.epochs = {k: [v[0], v[1].copy()] for k, v in self.epochs.items()}
        other.pace = self.pace.copy()
        other.buckets = self.buckets.copy()
        return other

    def fold(self, steps: list[int], t: list[float | None], epoch: list[int | None],
             cols: dict[str, list[float | None]], tags: dict[str, list[float | None]],
             lo: int, hi: int | None) -> dict[str, Any] | None:
        """Fold rows (sorted by step) into the summary; returns the per-row values made
        on the way (merged series, EMAs), for losses.csv and an every-step report."""
        if not steps:
            return None
        self.max_step = steps[-1] if self.max_step is None else max(self.max_step, steps[-1])
        if steps[0] <= lo or (hi is not None and steps[-1] > hi):
            keep = [i for i, s in enumerate(steps) if lo < s and (hi is None or s <= hi)]
            self.outside += sum(1 for s in steps if s != lo) - len(keep)
            steps = [steps[i] for i in keep]
            t = [t[i] for i in keep]
            epoch = [epoch[i] for i in keep]
            cols = {k: [v[i] for i in keep] for k, v in cols.items()}
            tags = {k: [v[i] for i in keep] for k, v in tags.items()}
            if not steps:
                return None
        self.rows += len(steps)
        merged: dict[str, list[float | None]] = {}
        for prefix in PREFIXES:
            values, n_tb, n_console = tb_over_console(cols[prefix + "_tb"],
                                                      cols[prefix + "_c"])
            merged[prefix] = values
            counts = self.sources[prefix]
            counts[0] += n_tb
            counts[1] += n_console
        loss, avg, lr = merged["loss"], merged["avg"], merged["lr"]
        self.stats["loss"].add_column(steps, loss)
        self.stats["avg_loss"].add_column(steps, avg)
        n = len(steps)
        none = [None] * n
        ema_loss, ema_avg = none, none
        if loss.count(None) != n:
            ema_loss, self.ema["loss"] = ema(loss, self.ema["loss"])
        if avg.count(None) != n:
            ema_avg, self.ema["avg_loss"] = ema(avg, self.ema["avg_loss"])
        for tag, values in tags.items():
            present = n - values.count(None)
            if present:
                self.tag_present[tag] = self.tag_present.get(tag, 0) + present
        self._fold_epochs(steps, epoch, loss)
        self._check_avg_restarts(epoch, loss, avg)
        self._fold_times(steps, t)
        buckets = self.buckets
        segments = buckets.segments(steps)
        buckets.add_rows(segments, steps, t, epoch)
        for name, values in (("loss", loss), ("avg_loss", avg), ("lr", lr),
                             ("ema:loss", ema_loss), ("ema:avg_loss", ema_avg)):
            buckets.add_column(name, segments, values)
        for tag, values in tags.items():
            buckets.add_column("tag:" + tag, segments, values)
        pace = self.pace.feed(steps, t)
        for step, value in pace:
            buckets.add_point("s_per_step", step, value)
        return {"pace": pace, "step": steps, "t": t, "epoch": epoch, "loss": loss, "avg_loss": avg,
                "lr": lr, "ema:loss": ema_loss, "ema:avg_loss": ema_avg, "tags": tags}

    def _fold_epochs(self, steps: list[int], epoch: list[int | None],
                     loss: list[float | None]) -> None:
        n, start = len(steps), 0
        while start < n:
            e = epoch[start]
            end = n if start == 0 and epoch.count(e) == n else start + 1
            while end < n and epoch[end] == e:
                end += 1
            entry = self.epochs.get(e)
            if entry is None:
                if len(self.epochs) >= MAX_EPOCHS:
                    self.epochs_dropped += end - start
                    start = end
                    continue
                entry = self.epochs[e] = [0, Stats()]
            entry[0] += end - start
            entry[1].add_column(steps[start:end], loss[start:end])
            start = end

    def _check_avg_restarts(self, epoch: list[int | None], loss: list[float | None],
                            avg: list[float | None]) -> None:
        """At the first step of each new epoch, a running average that restarts equals
        that step's loss (to the console's rounding); one that goes on does not."""
        previous = [self.last_epoch, *epoch[:-1]]
        for i in compress(range(len(epoch)), map(ne, epoch, previous)):
            e, before = epoch[i], previous[i]
            if e is None:
                continue
            if before is not None and e > before:
                x, a = loss[i], avg[i]
                if x is not None and a is not None and x - x == 0.0 and a - a == 0.0:
                    if abs(a - x) <= 2e-3 * max(1.0, abs(x)):
                        self.avg_restarts += 1
                    else:
                        self.avg_carries += 1
        known = [e for e in epoch if e is not None]
        if known:
            self.last_epoch = known[-1]

    def _fold_times(self, steps: list[int], t: list[float | None]) -> None:
        timed = t if None not in t else [x for x in t if x is not None]
        if not timed:
            return
        low = min(timed)
        if self.min_t is None or low < self.min_t:
            self.min_t = low
        first = next(i for i, x in enumerate(t) if x is not None)
        last = len(t) - 1 - next(i for i, x in enumerate(reversed(t)) if x is not None)
        if self.first_timed is None:
            self.first_timed = (steps[first], t[first])  # type: ignore[assignment]
        self.last_timed = (steps[last], t[last])  # type: ignore[assignment]

    def close(self) -> list[tuple[int, float]]:
        """The pace of the last read (at the end of a snapshot's copy)."""
        points = self.pace.close()
        for step, value in points:
            self.buckets.add_point("s_per_step", step, value)
        return points
