"""The run report as a pure function of ``events.jsonl``, in memory that does not grow.

The sink feeds every event record to a :class:`ReportBuilder` as it writes it, so a
report can be written at any moment of the run; ``lorasup report RUN_DIR`` feeds the same
records back from the file (:func:`rebuild`, streaming), so the report survives any crash
of lorasup. Whatever the run's length, the builder holds the last :data:`WINDOW`-odd steps
exactly (a step may still be reported again, e.g. by TensorBoard a second later) and folds
older ones into running statistics and :data:`BUCKETS` min/max buckets per series
(:mod:`lorasup.supervisor.summary`), streaming them to ``losses.csv`` as it folds.

Conventions of the report (``schema`` "lorasup.report/2"):

- A value the trainer never reported is ``null`` (or absent from a list), never a
  placeholder. Series are lists aligned with ``series.step``.
- ``series.sampling`` says how: ``"every_step"`` (a run of at most ``BUCKETS`` steps: one
  entry per step, as in schema 1) or ``"buckets"`` (``bucket_steps`` consecutive steps per
  entry; ``step``/``t``/``epoch`` are those of the bucket's last step, each value series
  holds the bucket's last reported value, ``series.envelope.<name>.min/max`` its finite
  min/max). Full resolution is in ``events.jsonl`` and ``losses.csv``.
- Non-finite floats are written as the strings ``"nan"``, ``"inf"``, ``"-inf"``, exactly as
  in ``events.jsonl``; so ``null`` means "not reported" and ``"nan"`` means "reported NaN".
  Non-finite losses are kept in the series, counted in ``loss.nonfinite`` and left out of
  min/max/mean/std.
- ``loss.std`` is the sample standard deviation (n - 1), ``null`` for fewer than 2 values;
  mean and std never overflow (a std beyond the float range would read ``"inf"``).
- ``series.ema_loss`` is lorasup's exponential moving average with ``EMA_ALPHA`` = 0.1:
  ``ema_1 = x_1``, ``ema_k = alpha * x_k + (1 - alpha) * ema_(k-1)`` over the finite values
  of the finest loss series (per-step ``loss``, else the trainer's ``avg_loss``), in step
  order, no bias correction; a step whose value is missing or non-finite gets ``null`` and
  leaves the average unchanged.
- ``series.s_per_step``: steps that arrive in one read share one timestamp, so the pace is
  measured between reads: at the last step of each read, the time since the previous read
  divided by the steps in between; other steps have ``null`` (never a 0 s point), and so
  has the first read (its time includes the trainer's start-up). ``timing.median_s_per_step``
  is the median of those values (exact up to 2048 of them, then from a log histogram with
  1 % bins).
- Only steps in the requested range (``resumed_from`` < step <= ``resumed_from`` +
  ``requested``) are recorded; anything outside it (e.g. TensorBoard scalars of an
  earlier run) is counted in a note. A value for a step that was already folded into the
  statistics (more than ``WINDOW`` steps behind) is counted in a note and is in
  ``events.jsonl`` only.
- Where the time went, from the ``t`` of four records (a step's ``t`` is when lorasup parsed
  its first report): ``timing.startup_s`` = first step − ``started`` (the spawn),
  ``timing.training_s`` = last new step (the highest step number) − first step,
  ``timing.finish_s`` = ``exited`` − last new step (the final save, or the hang and the
  stop), ``timing.trainer_s`` = ``exited`` − ``started``. When all four are defined,
  ``trainer_s`` is computed as ``startup_s + training_s + finish_s``, so they add up
  exactly (the same span, free of float rounding). One that
  cannot be computed (no step recorded, no ``exited`` record) is ``null``, named in
  ``timing.missing`` with the reason in ``timing.explanation``.
- ``stacks``: each capture of the tree's Python stacks (before a stall kill, or on
  lorasup's SIGQUIT): reason, ``t``, and per process its pid, role, command, ``where``
  (the main thread's innermost frame) or ``error`` (why py-spy took no stack), and the
  innermost frames of its threads; the full stacks are in ``stacks.txt``.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import csv
import datetime
import io
import itertools
import json
import math
import os
import re
import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import compress
from operator import ne, not_
from pathlib import Path
from typing import Any, ClassVar

import structlog

from lorasup.supervisor.events import read_number
from lorasup.supervisor.liveness import lost_record
from lorasup.supervisor.safefs import WriteFaults, atomic_write, exists, write_all_fd
from lorasup.supervisor.summary import BUCKETS, Buckets, Sampled, Stats

__all__ = [
    "BUCKETS",
    "EMA_ALPHA",
    "SCHEMA",
    "WINDOW",
    "ReportBuilder",
    "classify_tag",
    "read_events",
    "read_into",
    "rebuild",
    "write_all",
    "write_report_json",
]

log = structlog.get_logger(__name__)

SCHEMA = "lorasup.report/2"
EMA_ALPHA = 0.1
#: steps kept exact (open to late values) before they are folded into the summary
WINDOW = 2048

EVENTS_JSONL = "events.jsonl"
REPORT_JSON = "report.json"
LOSSES_CSV = "losses.csv"
LOSS_CURVES_PNG = "loss_curves.png"
TRAINER_LOG = "trainer.log"

#: per-step loss tags: kohya, diffusers, transformers
LOSS_TAGS = frozenset({"loss/current", "train_loss", "loss", "train/loss"})
#: the trainer's running average (kohya)
AVG_LOSS_TAGS = frozenset({"loss/average"})
#: the trainer's per-epoch mean, logged with step = epoch number (kohya)
EPOCH_LOSS_TAGS = frozenset({"loss/epoch_average"})
#: a single learning rate; ``lr/<group>`` tags are kept per tag
LR_TAGS = frozenset({"lr", "learning_rate", "train/learning_rate"})

CSV_COLUMNS = ("step", "loss", "avg_loss", "ema_loss", "lr", "epoch", "t")

#: bounds that keep memory and report.json flat whatever the trainer logs
MAX_PROBLEMS = 200
MAX_NOTES = 500
MAX_SPARSE_TAGS = 100
MAX_STACK_CAPTURES = 20
MAX_STACK_PROCESSES = 64
MAX_LR_TAGS = 8
MAX_SIGNALS = 100
MAX_EPOCHS = 1000
SPARSE_POINTS = 256
#: a step number beyond this is junk, not a step
MAX_STEP = 1 << 62

_PREFIXES = ("loss", "avg", "lr")
_SERIES_LABELS = {
    "loss": "per-step loss",
    "avg_loss": "running-average loss",
    "lr": "learning rate",
}
#: what a person needs to know when a known trainer leaves a series out
_HINTS = {
    ("kohya", "loss"): "kohya's console shows only its running average (avr_loss); "
    "the per-step loss is in its TensorBoard files (loss/current, needs --logging_dir)",
    ("kohya", "lr"): "kohya's console shows no learning rate; it is in its TensorBoard "
    "files (lr/*, needs --logging_dir)",
}


# ---------------------------------------------------------------------------- helpers


def _int(value: Any) -> int | None:
    """An int from a JSON value; an integral float is accepted, anything else is not."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _step(value: Any) -> int | None:
    step = _int(value)
    return step if step is not None and 0 <= step < MAX_STEP else None


def _time(value: Any) -> float | None:
    number = read_number(value)
    return number if number is not None and math.isfinite(number) else None


def _iso(epoch_s: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC (``2026-12-02T07:30:17.123Z``), for people."""
    if epoch_s is None:
        return None
    try:
        moment = datetime.datetime.fromtimestamp(epoch_s, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _spell(value: float | None) -> float | str | None:
    """JSON has no NaN/inf: spell them as events.jsonl does."""
    if value is None or value - value == 0.0:
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _spell_all(values: Sequence[float | None]) -> list[float | str | None]:
    finite_sum = sum(v for v in values if v is not None)
    if finite_sum - finite_sum == 0.0:
        return list(values)
    return [_spell(v) for v in values]


def classify_tag(tag: str) -> str:
    """Which series a scalar tag feeds: loss, avg_loss, epoch_loss, lr, lr_tag, val_loss, other."""
    if tag in LOSS_TAGS:
        return "loss"
    if tag in AVG_LOSS_TAGS:
        return "avg_loss"
    if tag in EPOCH_LOSS_TAGS:
        return "epoch_loss"
    if tag in LR_TAGS:
        return "lr"
    if tag.startswith("lr/"):
        return "lr_tag"
    lowered = tag.lower()
    if "val" in lowered and "loss" in lowered:
        return "val_loss"
    return "other"


def _merge_source(a: str | None, b: str | None) -> str | None:
    if a is None or a == b:
        return b
    if b is None:
        return a
    return "+".join(sorted({*a.split("+"), *b.split("+")}, reverse=True))


def _merged(tb: list[float | None], console: list[float | None]
            ) -> tuple[list[float | None], int, int]:
    """Per-step values where TensorBoard's full precision wins over the console's, and how
    many came from each."""
    n = len(tb)
    n_tb = n - tb.count(None)
    if not n_tb:
        return console, 0, n - console.count(None)
    if n_tb == n:
        return tb, n, 0
    out = [a if a is not None else b for a, b in zip(tb, console, strict=True)]
    return out, n_tb, n - out.count(None) - n_tb


def _csv_cells(column: Sequence[Any]) -> list[str]:
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


def _ema(values: Sequence[float | None], state: float | None
         ) -> tuple[list[float | None], float | None]:
    """The EMA at each value, and the state after them."""
    a, b = EMA_ALPHA, 1.0 - EMA_ALPHA
    out: list[float | None] = []
    append = out.append
    for value in values:
        if value is None or value - value != 0.0:
            append(None)
            continue
        state = value if state is None else a * value + b * state
        append(state)
    return out, state


class _Pace:
    """Seconds per step between reads (see the module docs), and their median."""

    __slots__ = ("exact", "g_step", "g_t", "hist", "n", "p_step", "p_t")

    EXACT = 2048

    def __init__(self) -> None:
        self.g_t: float | None = None
        self.g_step = 0
        self.p_t: float | None = None
        self.p_step = 0
        self.exact: list[float] = []
        self.hist: dict[int, int] = {}
        self.n = 0

    def copy(self) -> _Pace:
        other = _Pace.__new__(_Pace)
        other.g_t, other.g_step, other.p_t, other.p_step = (self.g_t, self.g_step,
                                                            self.p_t, self.p_step)
        other.exact, other.hist, other.n = list(self.exact), dict(self.hist), self.n
        return other

    def feed(self, steps: Sequence[int], times: Sequence[float | None]) -> list[tuple[int, float]]:
        points: list[tuple[int, float]] = []
        n = len(times)
        if times.count(times[0]) == n:  # the common case: steps of one read
            t = times[0]
            if t is not None:
                if t != self.g_t:
                    self._close(points)
                    self.g_t = t
                self.g_step = steps[-1]
            return points
        changes = list(compress(range(n - 1), map(ne, times, times[1:])))
        if len(changes) * 4 < n and None not in times:
            # a few reads: only the last row of each and the first row matter
            for i in (*changes, n - 1):
                points.extend(self.feed([steps[i]], [times[i]]))
            return points
        for step, t in zip(steps, times, strict=True):
            if t is None:
                continue
            if t == self.g_t:
                self.g_step = step
                continue
            self._close(points)
            self.g_t, self.g_step = t, step
        return points

    def close(self) -> list[tuple[int, float]]:
        points: list[tuple[int, float]] = []
        self._close(points)
        self.g_t = None
        return points

    def _close(self, points: list[tuple[int, float]]) -> None:
        if self.g_t is None:
            return
        if self.p_t is not None and self.g_step > self.p_step and self.g_t >= self.p_t:
            value = (self.g_t - self.p_t) / (self.g_step - self.p_step)
            points.append((self.g_step, value))
            self.n += 1
            if len(self.exact) < self.EXACT:
                self.exact.append(value)
            key = round(math.log2(value) * 70) if value > 0 else -(1 << 20)
            self.hist[key] = self.hist.get(key, 0) + 1
        self.p_t, self.p_step = self.g_t, self.g_step

    def median(self) -> float | None:
        if not self.n:
            return None
        if self.n <= len(self.exact):
            return statistics.median(self.exact)
        half, seen = self.n / 2, 0
        for key in sorted(self.hist):
            seen += self.hist[key]
            if seen >= half:
                return 0.0 if key == -(1 << 20) else 2.0 ** (key / 70)
        return None


# ---------------------------------------------------------------------------- summary


class _Summary:
    """Everything the report keeps of the steps folded out of the window."""

    def __init__(self) -> None:
        self.rows = 0  # in-range steps folded
        self.max_step: int | None = None  # the highest step folded, in range or not
        self.outside = 0
        self.stats = {"loss": Stats(), "avg_loss": Stats()}
        self.ema: dict[str, float | None] = {"loss": None, "avg_loss": None}
        self.sources = {p: [0, 0] for p in _PREFIXES}  # prefix -> [tensorboard, console]
        self.tag_present: dict[str, int] = {}
        self.epochs: dict[int | None, list[Any]] = {}  # epoch -> [steps, Stats of loss]
        self.epochs_dropped = 0
        self.pace = _Pace()
        #: does the trainer's running average restart at each epoch? counted at epoch
        #: boundaries where both it and the per-step loss are known
        self.last_epoch: int | None = None
        self.avg_restarts = 0
        self.avg_carries = 0
        self.min_t: float | None = None
        self.first_timed: tuple[int, float] | None = None
        self.last_timed: tuple[int, float] | None = None
        self.buckets = Buckets()

    def copy(self) -> _Summary:
        other = _Summary.__new__(_Summary)
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
        for prefix in _PREFIXES:
            values, n_tb, n_console = _merged(cols[prefix + "_tb"], cols[prefix + "_c"])
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
            ema_loss, self.ema["loss"] = _ema(loss, self.ema["loss"])
        if avg.count(None) != n:
            ema_avg, self.ema["avg_loss"] = _ema(avg, self.ema["avg_loss"])
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


# ---------------------------------------------------------------------------- builder

_Handler = Callable[["ReportBuilder", dict[str, Any], "float | None"], None]
_COLS = ("loss_c", "loss_tb", "avg_c", "avg_tb", "lr_c", "lr_tb")


class ReportBuilder:
    """Folds event records into report state: O(1) per event, memory O(1) in steps.

    ``add`` never raises: an unknown kind or a malformed field is ignored (and counted), so
    a damaged ``events.jsonl`` still gives the best report its readable lines allow.
    ``csv_out``, when given, receives ``losses.csv`` text as rows are folded (then call
    :meth:`finish_csv` at the end); otherwise the CSV is made by :meth:`csv_text`.
    """

    def __init__(self, csv_out: Callable[[bytes], None] | None = None) -> None:
        self.run_id: str | None = None
        self.trainer: str | None = None
        self.argv: list[str] | None = None
        self.pid: int | None = None
        self.steps_requested: int | None = None
        self.started_at: float | None = None
        self.resumed_from: int | None = None
        self.outcome: str | None = None
        self.exit_code: int | None = None
        self.reason: str | None = None
        self.outcome_returncode: int | None = None
        self.exited_returncode: int | None = None
        self.rejected = 0
        self.last_t: float | None = None
        self.bad_records = 0
        #: values for steps already folded into the summary (kept in events.jsonl only)
        self.late_values = 0
        # the window: the latest steps, exact, sorted by step
        self._ws: list[int] = []
        self._wt: list[float | None] = []
        self._we: list[int | None] = []
        self._wc: dict[str, list[float | None]] = {name: [] for name in _COLS}
        self._wtags: dict[str, list[float | None]] = {}
        self._lr_tag_sources: dict[str, str] = {}
        self._sum = _Summary()
        self._folded = False
        # losses.csv, streamed
        self._csv_out = csv_out
        self._csv_tags: list[str] | None = None
        self._csv_basis: str | None = None
        self._csv_late_tags: set[str] = set()
        # per-epoch and sparse scalars
        self._current_epoch: int | None = None
        self._epoch_totals: dict[int, int | None] = {}
        self._epoch_loss: Sampled | None = None
        self._val_loss: dict[str, Sampled] = {}
        self._other: dict[str, Sampled] = {}
        self._dropped_tags: set[str] = set()
        self._dropped_tag_count = 0
        # the rest of the story
        self._checkpoints: dict[str, None] = {}
        self._checkpoints_dropped = 0
        self._problems: dict[tuple[str, str], dict[str, Any]] = {}
        self._problems_dropped = 0
        #: lorasup sent SIGINT; a traceback line seen after it, not yet judged
        self._sigint_seen = False
        self._recent_problems: collections.deque[tuple[str, str, float | None]] = (
            collections.deque(maxlen=16))
        self._pending_traceback: tuple[str, str, float | None, str | None] | None = None
        self._signals: list[dict[str, Any]] = []
        self._signals_dropped = 0
        self._notes: list[str] = []
        self._notes_dropped = 0
        self._markers: dict[str, None] = {}
        self._model_files: list[str] = []
        #: the engine's ``artifacts`` record arrived (the run's files were looked up)
        self.artifacts_recorded = False
        #: the curves of the run this one continues (a ``history`` record), or None
        self._history: dict[str, Any] | None = None
        # timing.* phases and stack captures: O(1) state of their own
        self._started_t: float | None = None
        self._exited_t: float | None = None
        self._first_step_t: float | None = None
        self._last_step_t: float | None = None
        self._top_step: int | None = None
        self._stacks: list[dict[str, Any]] = []
        self.started_record: dict[str, Any] | None = None
        #: run-dir files the report names; the sink writes the first two from the start
        self._files = {EVENTS_JSONL: True, TRAINER_LOG: True, LOSSES_CSV: False,
                       LOSS_CURVES_PNG: False}

    # ------------------------------------------------------------------ input

    def add(self, record: dict[str, Any]) -> None:
        """Take one ``events.jsonl`` record; anything malformed is ignored, never raised."""
        try:
            if not isinstance(record, dict):
                self.bad_records += 1
                return
            t = _time(record.get("t"))
            if t is not None and (self.last_t is None or t > self.last_t):
                self.last_t = t
            handler = self._HANDLERS.get(record.get("kind"))  # type: ignore[arg-type]
            if handler is not None:
                handler(self, record, t)
        except Exception:  # a report must survive any input; count it and go on
            self.bad_records += 1

    def add_note(self, message: str) -> None:
        """Put something on record (e.g. lines of events.jsonl that could not be read)."""
        if len(self._notes) < MAX_NOTES:
            self._notes.append(str(message)[:2000])
        else:
            self._notes_dropped += 1

    def set_model_files(self, paths: Iterable[str | os.PathLike[str]]) -> None:
        """The model files found on disk (the builder itself never looks at the disk)."""
        self._model_files = [os.fspath(p) for p in paths]

    def mark_written(self, artifact: str, present: bool = True) -> None:
        """Record whether a run-dir file (e.g. ``loss_curves.png``) exists, for ``artifacts``."""
        self._files[artifact] = present

    def _on_started(self, r: dict[str, Any], t: float | None) -> None:
        if isinstance(r.get("run_id"), str):
            self.run_id = r["run_id"]
        if isinstance(r.get("trainer"), str):
            self.trainer = r["trainer"]
        argv = r.get("argv")
        if isinstance(argv, list):
            self.argv = [str(a) for a in argv[:10_000]]
        self.pid = _int(r.get("pid"))
        requested = _step(r.get("steps_requested"))
        if requested is not None:
            self.steps_requested = requested
        self.started_at = _time(r.get("wall_time"))
        self._started_t = t
        #: who supervises the run (pid, start time, boot id): tells a lost run apart
        self.started_record = {k: r.get(k) for k in ("supervisor_pid", "supervisor_start",
                                                     "boot_id")}

    def _on_resumed(self, r: dict[str, Any], t: float | None) -> None:
        step = _step(r.get("step"))
        if step is not None:
            self.resumed_from = step

    def _row(self, step: int) -> int:
        """The window row of ``step`` (appended or inserted if new); -1 for a step already
        folded into the summary."""
        steps = self._ws
        count = len(steps)
        if count and step == steps[-1]:
            return count - 1
        if not count or step > steps[-1]:
            if self._folded and step <= (self._sum.max_step or 0):
                return -1
            steps.append(step)
            self._wt.append(None)
            self._we.append(None)
            for column in self._wc.values():
                column.append(None)
            for column in self._wtags.values():
                column.append(None)
            if count + 1 > 2 * WINDOW:
                self._fold(WINDOW)
                return len(self._ws) - 1
            return count
        at = bisect.bisect_left(steps, step)
        if steps[at] == step:
            return at
        if self._folded and step <= (self._sum.max_step or 0):
            return -1
        steps.insert(at, step)
        self._wt.insert(at, None)
        self._we.insert(at, None)
        for column in self._wc.values():
            column.insert(at, None)
        for column in self._wtags.values():
            column.insert(at, None)
        return at

    def _on_step(self, r: dict[str, Any], t: float | None) -> None:
        step = _step(r.get("step"))
        if step is None:
            self.bad_records += 1
            return
        self.add_step(t, step, read_number(r.get("loss")), read_number(r.get("avg_loss")),
                      read_number(r.get("lr")), _int(r.get("epoch")))

    def add_step(self, t: float | None, step: int, loss: float | None,
                 avg_loss: float | None, lr: float | None, epoch: int | None) -> None:
        """A step record with values already typed."""
        if t is not None and (self.last_t is None or t > self.last_t):
            self.last_t = t
        self._time_step(step, t)
        row = self._row(step)
        if row < 0:
            self.late_values += 1
            return
        first_report = self._wt[row] is None
        if first_report and t is not None:
            self._wt[row] = t
        cols = self._wc
        if loss is not None:
            cols["loss_c"][row] = loss
        if avg_loss is not None:
            cols["avg_c"][row] = avg_loss
        if lr is not None:
            cols["lr_c"][row] = lr
        if epoch is not None:
            self._we[row] = epoch
        elif first_report and self._current_epoch is not None and self._we[row] is None:
            self._we[row] = self._current_epoch

    def add_steps(self, t: float | Sequence[float], steps: list[int],
                  loss: list[float | None] | None = None,
                  avg_loss: list[float | None] | None = None,
                  lr: list[float | None] | None = None,
                  epoch: list[int | None] | None = None) -> None:
        """A block of step records (the fast path): new steps in strictly increasing order
        are appended in bulk; anything else goes step by step."""
        n = len(steps)
        if not n:
            return
        times: list[Any] = [t] * n if isinstance(t, int | float) else list(t)
        total = sum(times)
        if total - total != 0.0:  # a non-finite time (a junk line) is no time
            times = [x if x - x == 0.0 else None for x in times]
        timed = [x for x in times if x is not None] if total - total != 0.0 else times
        last_t = max(timed, default=None)
        if last_t is not None and (self.last_t is None or last_t > self.last_t):
            self.last_t = last_t
        ws = self._ws
        simple = ((not ws or steps[0] > ws[-1])
                  and (not self._folded or steps[0] > (self._sum.max_step or 0))
                  and (n == 1 or steps == list(range(steps[0], steps[0] + n))
                       or all(a < b for a, b in itertools.pairwise(steps))))
        if not simple:
            for i in range(n):
                self.add_step(times[i], steps[i], loss[i] if loss else None,
                              avg_loss[i] if avg_loss else None, lr[i] if lr else None,
                              epoch[i] if epoch else None)
            return
        # increasing steps: the first and the last in range say all _time_step needs to know
        lo, hi = self._range()
        first = bisect.bisect_right(steps, lo)
        last = (n if hi is None else bisect.bisect_right(steps, hi)) - 1
        if first <= last:
            if times[first] is None or times[last] is None:
                for i in range(first, last + 1):
                    self._time_step(steps[i], times[i])
            else:
                self._time_step(steps[first], times[first])
                self._time_step(steps[last], times[last])
        none = [None] * n
        ws.extend(steps)
        self._wt.extend(times)
        if epoch is None or epoch.count(None) == n:
            self._we.extend([self._current_epoch] * n if self._current_epoch is not None
                            else none)
        else:
            current = self._current_epoch
            self._we.extend([e if e is not None else current for e in epoch])
        cols = self._wc
        cols["loss_c"].extend(loss or none)
        cols["avg_c"].extend(avg_loss or none)
        cols["lr_c"].extend(lr or none)
        for name in ("loss_tb", "avg_tb", "lr_tb"):
            cols[name].extend(none)
        for column in self._wtags.values():
            column.extend(none)
        while len(ws) > 2 * WINDOW:
            self._fold(WINDOW)

    @property
    def top_step(self) -> int | None:
        """The highest step recorded in the requested range (None before the first)."""
        return self._top_step

    def _time_step(self, step: int, t: float | None) -> None:
        """When the first and the last new step (in the requested range) were seen."""
        lo = self.resumed_from or 0
        if t is None or step <= lo or (self.steps_requested is not None
                                       and step > lo + self.steps_requested):
            return
        if self._first_step_t is None:
            self._first_step_t = t
        if self._top_step is None or step > self._top_step:
            self._top_step = step
            self._last_step_t = t

    def _on_scalar(self, r: dict[str, Any], t: float | None) -> None:
        tag, step, value = r.get("tag"), _int(r.get("step")), read_number(r.get("value"))
        if not isinstance(tag, str) or step is None or value is None:
            self.bad_records += 1
            return
        tag = tag[:200]
        source = r.get("source") if isinstance(r.get("source"), str) else "console"
        source = source[:40]
        tb = source == "tensorboard"
        kind = classify_tag(tag)
        if kind in ("loss", "avg_loss", "lr", "lr_tag"):
            if not 0 <= step < MAX_STEP:
                self.bad_records += 1
                return
            if kind == "lr_tag" and tag not in self._wtags:
                if len(self._wtags) >= MAX_LR_TAGS:
                    self._drop_tag(tag)
                    return
                self._wtags[tag] = [None] * len(self._ws)
            row = self._row(step)
            if row < 0:
                self.late_values += 1
                return
            if kind == "lr_tag":
                self._wtags[tag][row] = value
                self._lr_tag_sources[tag] = (
                    _merge_source(self._lr_tag_sources.get(tag), source) or "")
                return
            prefix = {"loss": "loss", "avg_loss": "avg", "lr": "lr"}[kind]
            self._wc[f"{prefix}_tb" if tb else f"{prefix}_c"][row] = value
            return
        if kind == "epoch_loss":
            if self._epoch_loss is None:
                self._epoch_loss = Sampled(source, SPARSE_POINTS)
            series = self._epoch_loss
        else:
            bucket = self._val_loss if kind == "val_loss" else self._other
            series = bucket.get(tag)  # type: ignore[assignment]
            if series is None:
                if len(bucket) >= MAX_SPARSE_TAGS:
                    self._drop_tag(tag)
                    return
                series = bucket[tag] = Sampled(source, SPARSE_POINTS)
        series.add(step, value)
        if source != series.source:
            series.source = _merge_source(series.source, source) or source

    def _drop_tag(self, tag: str) -> None:
        if tag not in self._dropped_tags:
            self._dropped_tag_count += 1
            if len(self._dropped_tags) < 1000:
                self._dropped_tags.add(tag)

    def _on_epoch(self, r: dict[str, Any], t: float | None) -> None:
        epoch = _int(r.get("epoch"))
        if epoch is None:
            return
        self._current_epoch = epoch
        if epoch in self._epoch_totals or len(self._epoch_totals) < MAX_EPOCHS:
            self._epoch_totals[epoch] = _int(r.get("total"))

    def _on_checkpoint(self, r: dict[str, Any], t: float | None) -> None:
        if isinstance(r.get("path"), str):
            if r["path"] in self._checkpoints or len(self._checkpoints) < MAX_PROBLEMS:
                self._checkpoints[r["path"][:4096]] = None
            else:
                self._checkpoints_dropped += 1

    def _on_artifacts(self, r: dict[str, Any], t: float | None) -> None:
        self.artifacts_recorded = True
        files = r.get("model_files")
        if isinstance(files, list):
            self._model_files = [f[:4096] for f in files[:MAX_PROBLEMS] if isinstance(f, str)]
        found = r.get("checkpoints")
        if isinstance(found, list):
            # absolute: announced ones resolved against the trainer's folder, then found ones
            self._checkpoints = {p[:4096]: None for p in found[:MAX_PROBLEMS]
                                 if isinstance(p, str)}
        if isinstance(r.get("error"), str):
            self.add_note(r["error"])

    def _on_history(self, r: dict[str, Any], t: float | None) -> None:
        steps = r.get("step")
        if not isinstance(steps, list) or not steps or len(steps) > 4 * BUCKETS:
            return
        n = len(steps)
        if not all(_step(s) is not None for s in steps):
            self.bad_records += 1
            return
        block: dict[str, Any] = {"run_id": str(r.get("run_id", ""))[:200],
                                 "resumed_from": _step(r.get("resumed_from")), "step": steps}
        for name in ("loss", "avg_loss", "ema_loss", "lr"):
            values = r.get(name)
            ok = isinstance(values, list) and len(values) == n
            block[name] = ([v if v is None or (isinstance(v, int | float | str) and not
                            isinstance(v, bool)) else None for v in values] if ok else [None] * n)
        self._history = block
        basis, last = r.get("ema_basis"), read_number(r.get("ema_last"))
        if basis in ("loss", "avg_loss") and last is not None and math.isfinite(last) \
                and not self._folded:
            # the EMA goes on from where the earlier run left it
            self._sum.ema[basis] = last

    def _on_finished(self, r: dict[str, Any], t: float | None) -> None:
        if isinstance(r.get("marker"), str) and len(self._markers) < 20:
            self._markers[r["marker"][:200]] = None

    def _on_problem(self, r: dict[str, Any], t: float | None) -> None:
        problem, line = str(r.get("problem", ""))[:200], str(r.get("line", ""))[:1000]
        self._judge_problem(problem, line, t)

    def _judge_problem(self, problem: str, line: str, t: float | None) -> None:
        if not self._sigint_seen:
            self._recent_problems.append((problem, line, t))
        if self._sigint_seen:  # in file order: a problem's t is its read's time, not later
            # After lorasup's own SIGINT, a traceback ending in KeyboardInterrupt is the
            # trainer being stopped, not a trainer problem: hold the traceback line until
            # the exception line says which it was.
            pending, self._pending_traceback = self._pending_traceback, None
            if problem == "traceback":
                if pending is not None:
                    self._add_problem(*pending)
                self._pending_traceback = (problem, line, t, None)
                return
            if problem == "exception" and line.startswith("KeyboardInterrupt"):
                why = "after lorasup's SIGINT (the trainer being stopped)"
                if pending is not None:
                    self._add_problem(pending[0], pending[1], pending[2], why)
                self._add_problem(problem, line, t, why)
                return
            if pending is not None:
                self._add_problem(*pending)
        self._add_problem(problem, line, t, None)

    def _add_problem(self, problem: str, line: str, t: float | None,
                     expected: str | None) -> None:
        key = (problem, line) if expected is None else (problem, line, "expected")
        entry = self._problems.get(key)  # type: ignore[arg-type]
        if entry is not None:
            entry["count"] += 1
        elif len(self._problems) < MAX_PROBLEMS:
            entry = {"problem": problem, "line": line, "count": 1, "first_t": t}
            if expected is not None:
                entry["expected"] = expected
            self._problems[key] = entry  # type: ignore[index]
        else:
            self._problems_dropped += 1

    def _on_rejected(self, r: dict[str, Any], t: float | None) -> None:
        self.rejected += 1

    def _on_signal(self, r: dict[str, Any], t: float | None) -> None:
        if len(self._signals) >= MAX_SIGNALS:
            self._signals_dropped += 1
            return
        pids = r.get("pids")
        pid_list = ([p for p in map(_int, pids[:1000]) if p is not None]
                    if isinstance(pids, list) else [])
        if r.get("signal") == "SIGINT" and not self._sigint_seen:
            self._sigint_seen = True
            # Output the signal caused may be in the file before the signal's record (two
            # readers, one file): problems at or after its time are judged again.
            again = []
            while (self._recent_problems and t is not None
                   and (self._recent_problems[-1][2] or -math.inf) >= t):
                again.append(self._recent_problems.pop())
            for problem, line, at in reversed(again):
                entry = self._problems.get((problem, line))
                if entry is not None:
                    entry["count"] -= 1
                    if not entry["count"]:
                        del self._problems[(problem, line)]
                self._judge_problem(problem, line, at)
        self._signals.append({"signal": str(r.get("signal", ""))[:40],
                              "reason": str(r.get("reason", ""))[:200], "t": t,
                              "pids": pid_list})

    def _on_exited(self, r: dict[str, Any], t: float | None) -> None:
        self.exited_returncode = _int(r.get("returncode"))
        self._exited_t = t

    def _on_stacks(self, r: dict[str, Any], t: float | None) -> None:
        if len(self._stacks) >= MAX_STACK_CAPTURES:
            return
        processes = r.get("processes")
        self._stacks.append({
            "t": t, "reason": str(r.get("reason", "")),
            "file": r["file"] if isinstance(r.get("file"), str) else None,
            "seconds": _time(r.get("seconds")),
            "processes": [p for p in processes[:MAX_STACK_PROCESSES] if isinstance(p, dict)]
            if isinstance(processes, list) else []})

    def _on_note(self, r: dict[str, Any], t: float | None) -> None:
        if "message" in r:
            self.add_note(str(r["message"]))

    def _on_outcome(self, r: dict[str, Any], t: float | None) -> None:
        if isinstance(r.get("outcome"), str):
            self.outcome = r["outcome"][:100]
        self.exit_code = _int(r.get("exit_code"))
        self.reason = str(r["reason"])[:2000] if "reason" in r else None
        self.outcome_returncode = _int(r.get("trainer_returncode"))

    _HANDLERS: ClassVar[dict[str, _Handler]] = {
        "started": _on_started,
        "resumed": _on_resumed,
        "step": _on_step,
        "scalar": _on_scalar,
        "epoch": _on_epoch,
        "checkpoint": _on_checkpoint,
        "finished": _on_finished,
        "problem": _on_problem,
        "rejected": _on_rejected,
        "signal": _on_signal,
        "exited": _on_exited,
        "stacks": _on_stacks,
        "note": _on_note,
        "artifacts": _on_artifacts,
        "history": _on_history,
        "outcome": _on_outcome,
    }

    # ------------------------------------------------------------------ folding

    def _range(self) -> tuple[int, int | None]:
        lo = self.resumed_from or 0
        return lo, (lo + self.steps_requested if self.steps_requested is not None else None)

    def _take(self, count: int) -> tuple[list[int], list[float | None], list[int | None],
                                         dict[str, list[float | None]],
                                         dict[str, list[float | None]]]:
        """The first ``count`` window rows, removed from the window."""
        steps, t, epoch = self._ws[:count], self._wt[:count], self._we[:count]
        del self._ws[:count], self._wt[:count], self._we[:count]
        cols = {}
        for name, column in self._wc.items():
            cols[name] = column[:count]
            del column[:count]
        tags = {}
        for tag, column in self._wtags.items():
            tags[tag] = column[:count]
            del column[:count]
        return steps, t, epoch, cols, tags

    def _fold(self, count: int) -> None:
        rows = self._sum.fold(*self._take(count), *self._range())
        self._folded = True
        if self._csv_out is not None and rows is not None:
            self._write_csv(rows)

    def _window(self) -> tuple[list[int], list[float | None], list[int | None],
                               dict[str, list[float | None]], dict[str, list[float | None]]]:
        return (list(self._ws), list(self._wt), list(self._we),
                {k: list(v) for k, v in self._wc.items()},
                {k: list(v) for k, v in self._wtags.items()})

    # ------------------------------------------------------------------ losses.csv

    def _csv_header(self, basis_hint: str) -> bytes:
        self._csv_tags = sorted(self._wtags)
        self._csv_basis = basis_hint
        return self._csv_rows_text([list(CSV_COLUMNS) + self._csv_tags])

    @staticmethod
    def _csv_rows_text(rows: Iterable[Sequence[Any]]) -> bytes:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        return buf.getvalue().encode("utf-8")

    def _one_epoch(self) -> bool:
        """A one-epoch run: steps with no epoch (`epoch 1/1` came late) are in epoch 1."""
        return (set(self._epoch_totals) == {1}
                and {v for v in self._epoch_totals.values() if v is not None} == {1})

    def _csv_body(self, rows: dict[str, Any]) -> bytes:
        assert self._csv_tags is not None
        epochs = rows["epoch"]
        if None in epochs and self._one_epoch():
            epochs = [1 if e is None else e for e in epochs]
        ema = rows["ema:loss"] if self._csv_basis == "loss" else rows["ema:avg_loss"]
        tags = rows["tags"]
        for tag in tags:
            if tag not in self._csv_tags:
                self._csv_late_tags.add(tag)
        n = len(rows["step"])
        columns = [rows["step"], rows["loss"], rows["avg_loss"], ema, rows["lr"], epochs,
                   rows["t"], *(tags.get(tag) or [None] * n for tag in self._csv_tags)]
        # the EMA is derived: 8 significant digits (the repr of 17 digits costs 1 us a row)
        ema_cells = (list(map("{:.8g}".format, ema)) if None not in ema
                     else ["" if v is None else f"{v:.8g}" for v in ema])
        cells = [ema_cells if i == 3 else _csv_cells(column)
                 for i, column in enumerate(columns)]
        return ("\n".join(map(",".join, zip(*cells, strict=True))) + "\n").encode()

    def _basis_hint(self, rows: dict[str, Any] | None) -> str:
        if self._sum.stats["loss"].count or (
                rows is not None and rows["loss"].count(None) != len(rows["loss"])):
            return "loss"
        return "avg_loss"

    def _write_csv(self, rows: dict[str, Any]) -> None:
        assert self._csv_out is not None
        text = b""
        if self._csv_tags is None:
            text = self._csv_header(self._basis_hint(rows))
        self._csv_out(text + self._csv_body(rows))

    def finish_csv(self) -> None:
        """Write the rows still in the window (the end of a streamed ``losses.csv``)."""
        if self._csv_out is None:
            return
        snapshot_sum = self._sum.copy()
        rows = snapshot_sum.fold(*self._window(), *self._range())
        if self._csv_tags is None:
            self._csv_out(self._csv_header(self._basis_hint(rows)))
        if rows is not None:
            self._csv_out(self._csv_body(rows))

    def csv_text(self) -> bytes:
        """All of ``losses.csv`` for a builder that never streamed (nothing folded yet)."""
        out: list[bytes] = []
        saved = self._csv_out, self._csv_tags, self._csv_basis
        self._csv_out, self._csv_tags = out.append, None
        try:
            self.finish_csv()
        finally:
            self._csv_out, self._csv_tags, self._csv_basis = saved
        return b"".join(out)

    # ------------------------------------------------------------------ output

    def snapshot(self) -> dict[str, Any]:
        """The report as it stands now: JSON-serialisable, its size bounded."""
        notes = list(self._notes)
        summary = self._sum.copy()
        rows = summary.fold(*self._window(), *self._range())
        pace_points = summary.close()
        lo, hi = self._range()
        if summary.outside:
            notes.append(f"{summary.outside} step(s) outside the requested range "
                         f"{lo + 1}..{hi if hi is not None else ''} were reported and left out")
        if self.late_values:
            notes.append(f"{self.late_values} value(s) arrived for steps more than {WINDOW} "
                         "steps back, already summarised: they are in events.jsonl only")
        sources_count = summary.sources
        src = {p: ("tensorboard+console" if tb and c else "tensorboard" if tb
                   else "console" if c else None) for p, (tb, c) in sources_count.items()}
        loss_src, avg_src, lr_src = src["loss"], src["avg"], src["lr"]
        stats = summary.stats
        if stats["loss"].count:
            basis, basis_src = "loss", loss_src
        elif stats["avg_loss"].count:
            basis, basis_src = "avg_loss", avg_src
            notes.append("loss statistics and the EMA are computed from the trainer's running "
                         "average (avg_loss): it reported no per-step loss")
        else:
            basis, basis_src = None, None
        tags = sorted(t for t in summary.tag_present) if not rows else sorted(
            set(summary.tag_present) | set(self._wtags))
        one_epoch = self._one_epoch()
        every_step = not self._folded and summary.rows <= BUCKETS
        if every_step:
            series = self._series_every_step(rows, basis, tags, pace_points, one_epoch)
        else:
            series = self._series_buckets(summary, basis, tags, one_epoch)
        sources: dict[str, str | None] = {"loss": loss_src, "avg_loss": avg_src, "lr": lr_src}
        sources.update({tag: self._lr_tag_sources.get(tag) for tag in tags})
        sources["ema_loss"] = "lorasup" if basis else None
        sources["s_per_step"] = "lorasup" if summary.pace.n else None
        if self._dropped_tag_count:
            notes.append(f"{self._dropped_tag_count} scalar tag(s) beyond {MAX_SPARSE_TAGS} "
                         f"per kind ({MAX_LR_TAGS} for lr/*) were not kept")
        if self._csv_late_tags:
            notes.append(f"losses.csv has no column for {len(self._csv_late_tags)} lr tag(s) "
                         "that appeared after its header was written")
        if self.bad_records:
            notes.append(f"{self.bad_records} event record(s) could not be interpreted")
        if self._problems_dropped:
            notes.append(f"{self._problems_dropped} further problem line(s) not listed")
        if self._signals_dropped:
            notes.append(f"{self._signals_dropped} further signal(s) not listed")
        if self._checkpoints_dropped:
            notes.append(f"{self._checkpoints_dropped} further checkpoint(s) not listed")
        if summary.epochs_dropped:
            notes.append(f"{summary.epochs_dropped} step(s) in epochs beyond the first "
                         f"{MAX_EPOCHS} are in no per-epoch mean")
        if self._notes_dropped:
            notes.append(f"{self._notes_dropped} further note(s) not kept")
        notes.extend(f"the trainer printed its completion marker {m!r}" for m in self._markers)

        epochs = self._epochs(summary, basis == "loss", loss_src, one_epoch, notes)
        steps_per_s = None
        first, last = summary.first_timed, summary.last_timed
        if first and last and last[1] > first[1] and last[0] > first[0]:
            steps_per_s = (last[0] - first[0]) / (last[1] - first[1])
        loss_stats = stats[basis] if basis else Stats()
        median = summary.pace.median()
        last_at = (self.started_at + self.last_t
                   if self.started_at is not None and self.last_t is not None else None)
        series.update({
            "ema": {"alpha": EMA_ALPHA, "basis": basis},
            "epoch_loss": self._sampled_json(self._epoch_loss) if self._epoch_loss else None,
            "val_loss": {tag: self._sampled_json(s) for tag, s in sorted(self._val_loss.items())},
            "other": {tag: self._sampled_json(s) for tag, s in sorted(self._other.items())},
            "sources": sources,
            "history": dict(self._history) if self._history is not None else None,
            "avg_loss_resets": self._avg_resets(summary, src["avg"] is not None,
                                                src["loss"] is not None),
        })
        series["missing"], series["explanation"] = self._missing(series, sources, tags, basis)
        return {
            "schema": SCHEMA,
            "run_id": self.run_id,
            "trainer": self.trainer,
            "command": self.argv,
            "status": ("running" if self.outcome is None
                       else "lost" if self.outcome == "lost" else "finished"),
            "outcome": self.outcome,
            "reason": self.reason,
            "exit_code": self.exit_code,
            "trainer_returncode": self.outcome_returncode if self.outcome_returncode is not None
            else self.exited_returncode,
            "signals_sent": [dict(s) for s in self._signals],
            "steps": {
                "requested": self.steps_requested,
                "resumed_from": self.resumed_from,
                "first": self._first_step(summary),
                "last": summary.buckets.step[max(summary.buckets.used(), default=0)]
                if summary.rows else None,
                "recorded": summary.rows,
                "rejected_over_max": self.rejected,
            },
            "loss": {
                "basis": basis,
                "source": basis_src,
                "count": loss_stats.count,
                "nonfinite": loss_stats.nonfinite,
                "first": _spell(loss_stats.first),
                "final": _spell(loss_stats.final),
                "min": loss_stats.min,
                "min_step": loss_stats.min_step,
                "max": loss_stats.max,
                "max_step": loss_stats.max_step,
                "mean": _spell(loss_stats.mean),
                "std": _spell(loss_stats.std),
            },
            "epochs": epochs,
            "timing": {
                "started_at": self.started_at,
                "started_at_iso": _iso(self.started_at),
                "last_event_at": last_at,
                "last_event_at_iso": _iso(last_at),
                "duration_s": self.last_t,
                "first_step_s": summary.min_t,
                "median_s_per_step": median,
                "steps_per_s": steps_per_s,
                **self._phases(),
            },
            "problems": self._problem_list(),
            "stacks": [dict(c) for c in self._stacks],
            "series": series,
            "artifacts": self.artifacts(),
            "notes": notes,
        }

    @staticmethod
    def _avg_resets(summary: _Summary, have_avg: bool, have_loss: bool) -> dict[str, Any]:
        """Whether the trainer's running average restarts at each epoch, from the data."""
        restarts, carries = summary.avg_restarts, summary.avg_carries
        checked = restarts + carries
        if not have_avg:
            return {"each_epoch": None, "boundaries_checked": 0,
                    "explanation": "no running average was reported"}
        if not checked:
            why = ("no epoch boundary was seen" if have_loss else
                   "needs the per-step loss at an epoch boundary to tell")
            return {"each_epoch": None, "boundaries_checked": 0, "explanation": why}
        each = restarts == checked
        return {"each_epoch": each, "boundaries_checked": checked,
                "explanation": "at the first step of every new epoch it equals that step's "
                               "loss: a per-epoch average" if each else
                               f"it goes on across {carries} of {checked} epoch boundaries"}

    def _problem_list(self) -> list[dict[str, Any]]:
        problems = [dict(p) for p in self._problems.values()]
        pending = self._pending_traceback
        if pending is not None:  # a traceback after SIGINT whose exception line never came
            key = pending[:2]
            known = self._problems.get(key)  # type: ignore[arg-type]
            if known is not None:
                at = list(self._problems).index(key)  # type: ignore[arg-type]
                problems[at]["count"] += 1
            else:
                problems.append({"problem": pending[0], "line": pending[1], "count": 1,
                                 "first_t": pending[2]})
        return problems

    def _phases(self) -> dict[str, Any]:
        """timing.startup_s/training_s/finish_s/trainer_s (see the module docstring)."""
        start, first, last, end = (self._started_t, self._first_step_t, self._last_step_t,
                                   self._exited_t)
        no_step = "no step was recorded"
        no_exit = ("the trainer's exit is not in events.jsonl (still running, or lorasup "
                   "was killed)")
        no_start = "the start of the trainer is not in events.jsonl"
        phases: dict[str, float | None] = {
            "startup_s": first - start if first is not None and start is not None else None,
            "training_s": last - first if last is not None and first is not None else None,
            "finish_s": end - last if end is not None and last is not None else None,
            "trainer_s": end - start if end is not None and start is not None else None,
        }
        if None not in phases.values():
            # The same span, summed in this order, so that the three add up exactly.
            phases["trainer_s"] = phases["startup_s"] + phases["training_s"] + phases["finish_s"]
        why = {"startup_s": no_start if start is None else no_step,
               "training_s": no_step,
               "finish_s": no_step if last is None else no_exit,
               "trainer_s": no_start if start is None else no_exit}
        missing = [name for name, value in phases.items() if value is None]
        return {**phases, "missing": missing, "explanation": {name: why[name] for name in missing}}

    @staticmethod
    def _first_step(summary: _Summary) -> int | None:
        used = summary.buckets.used()
        if not used:
            return None
        # the first bucket's first step is not kept; the first row folded is its base
        return summary.buckets.base if summary.buckets.shift else summary.buckets.step[used[0]]

    def _series_every_step(self, rows: dict[str, Any] | None, basis: str | None,
                           tags: list[str], pace_points: list[tuple[int, float]],
                           one_epoch: bool) -> dict[str, Any]:
        if rows is None:
            rows = {"step": [], "t": [], "epoch": [], "loss": [], "avg_loss": [], "lr": [],
                    "ema:loss": [], "ema:avg_loss": [], "tags": {}}
        steps = rows["step"]
        n = len(steps)
        pace = dict(rows.get("pace", ()))
        pace.update(pace_points)
        epochs = rows["epoch"]
        if one_epoch and None in epochs:
            # a one-epoch run whose `epoch 1/1` line arrived late (buffered stdout)
            epochs = [1 if e is None else e for e in epochs]
        return {
            "sampling": {"method": "every_step", "points": n, "bucket_steps": 1},
            "step": list(steps),
            "t": list(rows["t"]),
            "epoch": list(epochs),
            "loss": _spell_all(rows["loss"]),
            "avg_loss": _spell_all(rows["avg_loss"]),
            "lr": _spell_all(rows["lr"]),
            "lr_by_tag": {tag: _spell_all(rows["tags"].get(tag) or [None] * n)
                          for tag in tags},
            "ema_loss": list(rows["ema:" + basis]) if basis else [None] * n,
            "s_per_step": [pace.get(s) for s in steps],
        }

    def _series_buckets(self, summary: _Summary, basis: str | None, tags: list[str],
                        one_epoch: bool) -> dict[str, Any]:
        b = summary.buckets
        used = b.used()

        def pick(values: list[Any]) -> list[Any]:
            return _spell_all([values[k] for k in used])

        def lists(name: str) -> list[list[Any]] | None:
            return b.series.get(name)

        out: dict[str, Any] = {
            "sampling": {"method": "buckets", "points": len(used), "bucket_steps": b.width,
                         "buckets": b.count, "first_bucket_step": b.base,
                         "value": "the last value reported in the bucket",
                         "envelope": "finite min and max in the bucket"},
            "step": [b.step[k] for k in used],
            "t": [b.t[k] for k in used],
            "epoch": [1 if one_epoch and b.epoch[k] is None else b.epoch[k] for k in used],
        }
        none = [None] * len(used)
        envelope: dict[str, Any] = {}
        for name in ("loss", "avg_loss", "lr", "s_per_step"):
            found = lists(name)
            out[name] = pick(found[2]) if found else none
            if found and name != "lr":
                envelope[name] = {"min": pick(found[0]), "max": pick(found[1])}
        found = lists("ema:" + basis) if basis else None
        out["ema_loss"] = pick(found[2]) if found else none
        out["lr_by_tag"] = {}
        for tag in tags:
            found = lists("tag:" + tag)
            out["lr_by_tag"][tag] = pick(found[2]) if found else none
        out["envelope"] = envelope
        return out

    @staticmethod
    def _sampled_json(series: Sampled) -> dict[str, Any]:
        items = series.items()
        out = {"step": [s for s, _ in items], "value": _spell_all([v for _, v in items]),
               "source": series.source}
        if series.shift:
            out["sampling"] = {"method": "buckets", "bucket_steps": 1 << series.shift,
                               "value": "the value at the bucket's last step"}
        return out

    def artifacts(self) -> dict[str, Any]:
        """The files a run left, as report.json names them."""
        return {
            "checkpoints": list(self._checkpoints),
            "model_files": list(self._model_files),
            "report_json": REPORT_JSON,
            "loss_curves_png": self._file(LOSS_CURVES_PNG),
            "losses_csv": self._file(LOSSES_CSV),
            "events_jsonl": self._file(EVENTS_JSONL),
            "trainer_log": self._file(TRAINER_LOG),
        }

    def _epochs(self, summary: _Summary, have_loss: bool, loss_src: str | None,
                one_epoch: bool, notes: list[str]) -> list[dict[str, Any]]:
        """Per-epoch means from the per-step loss, else the trainer's own epoch average."""
        per_epoch = dict(summary.epochs)
        unassigned = per_epoch.pop(None, None)
        if unassigned is not None and one_epoch:
            entry = per_epoch.get(1)
            if entry is None:
                per_epoch[1] = unassigned
            else:  # merge: counts add up; the loss statistics are re-folded by weight
                merged = entry[1].copy()
                _merge_stats(merged, unassigned[1])
                per_epoch[1] = [entry[0] + unassigned[0], merged]
            unassigned = None
        trainer_means: dict[int, float] = {}
        if self._epoch_loss is not None:
            trainer_means = dict(self._epoch_loss.items())
        known = sorted({*per_epoch, *self._epoch_totals, *trainer_means})[:MAX_EPOCHS]
        entries = self._epochs_entries(per_epoch, known, have_loss, loss_src, trainer_means,
                                       unassigned, notes)
        # The last epoch is partial when it has fewer steps than the run's fullest epoch
        # (a stop mid-epoch, or --steps not a multiple of the epoch); null: nothing to compare.
        counts = [e["steps"] for e in entries[:-1] if e["steps"]]
        for entry in entries:
            entry["partial"] = False if counts else None
        if entries and counts and entries[-1]["steps"] is not None:
            entries[-1]["partial"] = entries[-1]["steps"] < max(counts)
        return entries

    def _epochs_entries(self, per_epoch: dict[Any, list[Any]], known: list[int],
                        have_loss: bool, loss_src: str | None, trainer_means: dict[int, float],
                        unassigned: list[Any] | None, notes: list[str]
                        ) -> list[dict[str, Any]]:
        if have_loss:
            if unassigned is not None and unassigned[0] and known:
                notes.append(f"{unassigned[0]} step(s) have no known epoch and are in no "
                             "per-epoch mean")
            return [{"epoch": e, "mean_loss": _spell(per_epoch[e][1].mean) if e in per_epoch
                     else None, "steps": per_epoch[e][0] if e in per_epoch else 0,
                     "source": f"per-step loss ({loss_src})"} for e in known]
        if trainer_means:
            src = self._epoch_loss.source if self._epoch_loss else None
            return [{"epoch": e, "mean_loss": _spell(trainer_means[e]) if e in trainer_means
                     else None, "steps": per_epoch[e][0] if e in per_epoch else None,
                     "source": f"loss/epoch_average ({src})"} for e in known]
        if known:
            notes.append("per-epoch mean loss not available: the trainer reported no per-step "
                         "loss and no epoch average")
        return [{"epoch": e, "mean_loss": None,
                 "steps": per_epoch[e][0] if e in per_epoch else None, "source": None}
                for e in known]

    def _file(self, name: str) -> str | None:
        return name if self._files.get(name) else None

    def _missing(self, series: dict[str, Any], sources: dict[str, str | None],
                 tags: list[str], basis: str | None) -> tuple[list[str], dict[str, str]]:
        """Every series that is null (or null at every step), each with the reason."""
        no_steps = not series["step"]
        missing: list[str] = []
        why: dict[str, str] = {}
        for name in ("loss", "avg_loss", "lr"):
            if sources[name] is None:
                missing.append(name)
                why[name] = self._why_missing(name, tags, no_steps)
        for tag in tags:
            if all(v is None for v in series["lr_by_tag"].get(tag) or ()):
                missing.append(tag)
                why[tag] = "no step was recorded" if no_steps else "no value in the sampled steps"
        if basis is None:
            missing.append("ema_loss")
            why["ema_loss"] = ("no step was recorded" if no_steps else
                               "no loss to smooth: neither a per-step loss nor the trainer's "
                               "running average was reported")
        if sources["s_per_step"] is None:
            missing.append("s_per_step")
            why["s_per_step"] = ("no step was recorded" if no_steps else
                                 "steps came in fewer than two reads of the trainer's output "
                                 "after the first (which includes its start-up)")
        if all(e is None for e in series["epoch"]):
            missing.append("epoch")
            why["epoch"] = ("no step was recorded" if no_steps else
                            f"{self.trainer or 'the trainer'} reported no epoch")
        if series["epoch_loss"] is None:
            missing.append("epoch_loss")
            why["epoch_loss"] = (f"{self.trainer or 'the trainer'} reported no per-epoch "
                                 "average (e.g. kohya's loss/epoch_average, written at the "
                                 "end of each epoch); per-epoch means are in `epochs`")
        return missing, why

    def _logging_dir(self) -> str | None:
        """The --logging_dir in the command (lorasup injects one for kohya)."""
        argv = self.argv or []
        for i, arg in enumerate(argv):
            if arg == "--logging_dir" and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith("--logging_dir="):
                return arg.split("=", 1)[1]
        return None

    def _why_missing(self, name: str, tags: list[str] | None = None,
                     no_steps: bool = False) -> str:
        who = self.trainer or "the trainer"
        if name == "lr" and tags:
            return (f"{who} reports its learning rate per parameter group: see "
                    f"series.lr_by_tag ({', '.join(tags[:4])})")
        if no_steps:
            return "no step was recorded"
        hint = _HINTS.get((self.trainer or "", name))
        if hint:
            logging_dir = self._logging_dir()
            if logging_dir is None:
                return hint
            # lorasup (or the user) gave --logging_dir: the files were looked for
            what = {"loss": "loss/current", "lr": "lr/*"}.get(name, name)
            return (hint.split("(", 1)[0].rstrip() + f" ({what}); none was read from "
                    f"{logging_dir}")
        return f"{who} reported no {_SERIES_LABELS[name]} (console or TensorBoard)"


def _merge_stats(into: Stats, other: Stats) -> None:
    """Chan's merge of ``other``'s mean/M2 into ``into`` (scaled to a common exponent)."""
    if not other.n:
        return
    if not into.n:
        into.n, into.e, into.mu, into.q = other.n, other.e, other.mu, other.q
        return
    e = max(into.e, other.e)
    ra, rb = math.ldexp(1.0, into.e - e), math.ldexp(1.0, other.e - e)
    mu_a, q_a, mu_b, q_b = into.mu * ra, into.q * ra * ra, other.mu * rb, other.q * rb * rb
    n = into.n + other.n
    delta = mu_b - mu_a
    into.mu = mu_a + delta * other.n / n
    into.q = q_a + q_b + delta * delta * into.n / n * other.n
    into.n, into.e = n, e


# ---------------------------------------------------------------------------- files


def _dumps(obj: Any, indent: int = 0) -> str:
    """Readable JSON: objects one key a line, flat lists (the series) on one line."""
    pad = " " * indent
    if isinstance(obj, dict) and obj:
        items = [f'{pad}  {json.dumps(k, ensure_ascii=False)}: {_dumps(v, indent + 2)}'
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(obj, list) and any(isinstance(x, dict) or (isinstance(x, str) and len(x) > 40)
                                     for x in obj):
        items = [f"{pad}  {json.dumps(x, ensure_ascii=False, allow_nan=False)}" for x in obj]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def write_report_json(run_dir: str | os.PathLike[str], report: dict[str, Any]) -> Path:
    """Write ``report.json`` atomically (random O_EXCL temp name, rename); returns its path."""
    path = Path(run_dir) / REPORT_JSON
    atomic_write(path, (_dumps(report) + "\n").encode("utf-8"))
    return path


def write_all(run_dir: str | os.PathLike[str], builder: ReportBuilder, *,
              render: Callable[[dict[str, Any], Path], object] | None = None,
              faults: WriteFaults | None = None, csv_streamed: bool = False,
              ) -> dict[str, Any]:
    """The end-of-run files: CSV and PNG first, then report.json naming them; returns it.

    No failure here raises: a file that cannot be written is noted in the report (and in
    ``faults``), and report.json is written if the disk allows it. ``render`` draws the
    PNG (the live sink draws it in a child process); ``csv_streamed``: the caller wrote
    losses.csv already.
    """
    run_dir = Path(run_dir)
    faults = faults if faults is not None else WriteFaults()
    for name in (EVENTS_JSONL, TRAINER_LOG):
        if name not in faults.counts:
            builder.mark_written(name, exists(run_dir / name))
    if not csv_streamed:
        try:
            atomic_write(run_dir / LOSSES_CSV, builder.csv_text())
            builder.mark_written(LOSSES_CSV)
        except OSError as exc:
            faults.record(LOSSES_CSV, exc)
    report = builder.snapshot()
    if render is None:
        from lorasup.supervisor.plot import render_in_child as render
    try:
        render(report, run_dir / LOSS_CURVES_PNG)
        builder.mark_written(LOSS_CURVES_PNG)
    except OSError as exc:
        faults.record(LOSS_CURVES_PNG, exc)
    except Exception as exc:  # matplotlib can fail in many ways; the report must not
        log.warning("loss_curves_failed", error=repr(exc))
        builder.add_note(f"loss_curves.png could not be rendered: {exc!r}"[:500])
    note = faults.note()
    if note:
        builder.add_note(note)
    report = builder.snapshot()
    try:
        write_report_json(run_dir, report)
    except OSError as exc:
        faults.record(REPORT_JSON, exc)
    return report


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


def read_events(path: str | os.PathLike[str], *,
                on_skip: Callable[[int, str], None] | None = None) -> Iterator[dict[str, Any]]:
    """The records of ``events.jsonl`` one by one, skipping lines that cannot be read."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            text = raw.strip()
            if not text:
                continue
            try:
                record = json.loads(text)
            except (ValueError, RecursionError):
                if on_skip is not None:
                    on_skip(number, "undecodable" if raw.endswith(b"\n") else "cut off")
                continue
            if not isinstance(record, dict):
                if on_skip is not None:
                    on_skip(number, "not an object")
                continue
            yield record


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

    from lorasup.supervisor.plot import PlotChild

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
    if csv_tmp and not builder._files.get(LOSSES_CSV):
        with contextlib.suppress(OSError):
            os.unlink(csv_tmp)
    try:
        return write_all(run_dir, builder, render=plot.render, faults=faults,
                         csv_streamed=True)
    finally:
        plot.close()
