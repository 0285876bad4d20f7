"""The run report as a pure function of ``events.jsonl``.

The sink feeds every event record to a :class:`ReportBuilder` as it writes it, so a
report can be written at any moment of the run; ``lorasup report RUN_DIR`` feeds the same
records back from the file (:func:`rebuild`), so the report survives any crash of lorasup.

Conventions of the report (``schema`` "lorasup.report/1"):

- A value the trainer never reported is ``null`` (or absent from a list), never a
  placeholder. Per-step series are lists aligned with ``series.step``.
- Non-finite floats are written as the strings ``"nan"``, ``"inf"``, ``"-inf"``, exactly as
  in ``events.jsonl``; so ``null`` means "not reported" and ``"nan"`` means "reported NaN".
  Non-finite losses are kept in the series, counted in ``loss.nonfinite`` and left out of
  min/max/mean/std.
- ``loss.std`` is the sample standard deviation (n - 1), ``null`` for fewer than 2 values.
- ``series.ema_loss`` is lorasup's exponential moving average with ``EMA_ALPHA`` = 0.1:
  ``ema_1 = x_1``, ``ema_k = alpha * x_k + (1 - alpha) * ema_(k-1)`` over the finite values
  of the finest loss series (per-step ``loss``, else the trainer's ``avg_loss``), in step
  order, no bias correction; a step whose value is missing or non-finite gets ``null`` and
  leaves the average unchanged.
- ``series.s_per_step[i]`` is the time between the first reports of two consecutive timed
  steps divided by their step distance; the first timed step has ``null`` (its time
  includes the trainer's start-up).
- Only steps in the requested range (``resumed_from`` < step <= ``resumed_from`` +
  ``requested``) are recorded; anything outside it (e.g. TensorBoard scalars of an
  earlier run) is counted in a note.
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
import csv
import io
import json
import math
import os
import statistics
from array import array
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import structlog

from lorasup.supervisor.events import read_number
from lorasup.supervisor.liveness import LivenessTracker
from lorasup.supervisor.plot import render_loss_curves

__all__ = [
    "EMA_ALPHA",
    "SCHEMA",
    "ReportBuilder",
    "classify_tag",
    "read_events",
    "rebuild",
    "render_loss_curves",
    "write_all",
    "write_losses_csv",
    "write_report_json",
]

log = structlog.get_logger(__name__)

SCHEMA = "lorasup.report/1"
EMA_ALPHA = 0.1

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

#: bounds that keep memory O(steps) whatever the trainer logs
MAX_PROBLEMS = 200
MAX_NOTES = 500
MAX_SPARSE_TAGS = 100
MAX_STACK_CAPTURES = 20
MAX_STACK_PROCESSES = 64

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


def _time(value: Any) -> float | None:
    number = read_number(value)
    return number if number is not None and math.isfinite(number) else None


def _spell(value: float | None) -> float | str | None:
    """JSON has no NaN/inf: spell them as events.jsonl does."""
    if value is None or math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


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


class _Column:
    """One float per row, compact; a presence byte tells "not reported" from NaN."""

    __slots__ = ("present", "values")

    def __init__(self) -> None:
        self.values = array("d")
        self.present = bytearray()

    def set(self, row: int, value: float) -> None:
        size = len(self.values)
        if row == size:  # the common case: the next step, in order
            self.values.append(value)
            self.present.append(1)
            return
        missing = row + 1 - size
        if missing > 0:
            self.values.extend([0.0] * missing)
            self.present.extend(bytes(missing))
        self.values[row] = value
        self.present[row] = 1

    def get(self, row: int) -> float | None:
        if row < len(self.present) and self.present[row]:
            return self.values[row]
        return None


class _Sparse:
    """A (step, value) series appended in arrival order; the last value per step wins."""

    __slots__ = ("source", "steps", "values")

    def __init__(self, source: str) -> None:
        self.steps = array("q")
        self.values = array("d")
        self.source = source

    def add(self, step: int, value: float, source: str) -> None:
        self.steps.append(step)
        self.values.append(value)
        if source != self.source:
            self.source = _merge_source(self.source, source)

    def to_json(self) -> dict[str, Any]:
        merged = dict(zip(self.steps, self.values, strict=True))
        steps = sorted(merged)
        return {"step": steps, "value": [_spell(merged[s]) for s in steps], "source": self.source}


def _merge_source(a: str | None, b: str | None) -> str | None:
    if a is None or a == b:
        return b
    if b is None:
        return a
    return "+".join(sorted({*a.split("+"), *b.split("+")}, reverse=True))


# ---------------------------------------------------------------------------- builder

_Handler = Callable[["ReportBuilder", dict[str, Any], "float | None"], None]


class ReportBuilder:
    """Folds event records into report state: O(1) per event, memory O(steps).

    ``add`` never raises: an unknown kind or a malformed field is ignored, so a damaged
    ``events.jsonl`` still gives the best report its readable lines allow.
    """

    def __init__(self) -> None:
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
        # per-step rows, in arrival order
        self._row_of: dict[int, int] = {}
        self._step = array("q")
        self._t = _Column()  # t of the first `step` report of the row
        self._epoch = _Column()
        self._cols = {name: _Column() for name in
                      ("loss_c", "loss_tb", "avg_c", "avg_tb", "lr_c", "lr_tb")}
        self._lr_tags: dict[str, _Column] = {}
        self._lr_tag_sources: dict[str, str] = {}
        self._sorted = True
        # per-epoch and sparse scalars
        self._current_epoch: int | None = None
        self._epoch_totals: dict[int, int | None] = {}
        self._epoch_loss: _Sparse | None = None
        self._val_loss: dict[str, _Sparse] = {}
        self._other: dict[str, _Sparse] = {}
        self._dropped_tags: set[str] = set()
        # the rest of the story
        self._checkpoints: dict[str, None] = {}
        self._problems: dict[tuple[str, str], dict[str, Any]] = {}
        self._problems_dropped = 0
        self._signals: list[dict[str, Any]] = []
        self._notes: list[str] = []
        self._markers: dict[str, None] = {}
        self._model_files: list[str] = []
        # timing.* phases and stack captures: O(1) state of their own
        self._started_t: float | None = None
        self._exited_t: float | None = None
        self._first_step_t: float | None = None
        self._last_step_t: float | None = None
        self._top_step: int | None = None
        self._stacks: list[dict[str, Any]] = []
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
            self._notes.append(str(message))

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
            self.argv = [str(a) for a in argv]
        self.pid = _int(r.get("pid"))
        requested = _int(r.get("steps_requested"))
        if requested is not None:
            self.steps_requested = requested
        self.started_at = _time(r.get("wall_time"))
        self._started_t = t

    def _on_resumed(self, r: dict[str, Any], t: float | None) -> None:
        step = _int(r.get("step"))
        if step is not None and step >= 0:
            self.resumed_from = step

    def _row(self, step: int) -> int:
        """The row of ``step``, appended if new.

        Steps nearly always arrive in order: then rows are found by bisection in the step
        array and no per-step dict is kept (it would cost ~100 bytes a step). The first
        out-of-order step switches to a dict.
        """
        steps = self._step
        if self._sorted:
            count = len(steps)
            if count and step == steps[count - 1]:
                return count - 1
            if not count or step > steps[count - 1]:
                steps.append(step)
                return count
            at = bisect.bisect_left(steps, step)
            if steps[at] == step:
                return at
            self._row_of = {s: r for r, s in enumerate(steps)}
            self._sorted = False
        row = self._row_of.get(step)
        if row is None:
            row = len(steps)
            steps.append(step)
            self._row_of[step] = row
        return row

    def _on_step(self, r: dict[str, Any], t: float | None) -> None:
        step = _int(r.get("step"))
        if step is None:
            return
        self.add_step(t, step, read_number(r.get("loss")), read_number(r.get("avg_loss")),
                      read_number(r.get("lr")), _int(r.get("epoch")))

    def add_step(self, t: float | None, step: int, loss: float | None,
                 avg_loss: float | None, lr: float | None, epoch: int | None) -> None:
        """A step record with values already typed: the live sink's fast path."""
        if t is not None and (self.last_t is None or t > self.last_t):
            self.last_t = t
        self._time_step(step, t)
        row = self._row(step)
        first_report = self._t.get(row) is None
        if first_report and t is not None:
            self._t.set(row, t)
        cols = self._cols
        if loss is not None:
            cols["loss_c"].set(row, loss)
        if avg_loss is not None:
            cols["avg_c"].set(row, avg_loss)
        if lr is not None:
            cols["lr_c"].set(row, lr)
        if epoch is not None:
            self._epoch.set(row, epoch)
        elif first_report and self._current_epoch is not None and self._epoch.get(row) is None:
            self._epoch.set(row, self._current_epoch)

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
            return
        source = r.get("source") if isinstance(r.get("source"), str) else "console"
        tb = source == "tensorboard"
        kind = classify_tag(tag)
        if kind in ("loss", "avg_loss", "lr"):
            prefix = {"loss": "loss", "avg_loss": "avg", "lr": "lr"}[kind]
            self._cols[f"{prefix}_tb" if tb else f"{prefix}_c"].set(self._row(step), value)
        elif kind == "lr_tag":
            column = self._lr_tags.get(tag)
            if column is None:
                if len(self._lr_tags) >= MAX_SPARSE_TAGS:
                    self._dropped_tags.add(tag)
                    return
                column = self._lr_tags[tag] = _Column()
            column.set(self._row(step), value)
            self._lr_tag_sources[tag] = _merge_source(self._lr_tag_sources.get(tag), source) or ""
        elif kind == "epoch_loss":
            if self._epoch_loss is None:
                self._epoch_loss = _Sparse(source)
            self._epoch_loss.add(step, value, source)
        else:
            bucket = self._val_loss if kind == "val_loss" else self._other
            series = bucket.get(tag)
            if series is None:
                if len(bucket) >= MAX_SPARSE_TAGS:
                    self._dropped_tags.add(tag)
                    return
                series = bucket[tag] = _Sparse(source)
            series.add(step, value, source)

    def _on_epoch(self, r: dict[str, Any], t: float | None) -> None:
        epoch = _int(r.get("epoch"))
        if epoch is None:
            return
        self._current_epoch = epoch
        self._epoch_totals[epoch] = _int(r.get("total"))

    def _on_checkpoint(self, r: dict[str, Any], t: float | None) -> None:
        if isinstance(r.get("path"), str):
            self._checkpoints[r["path"]] = None

    def _on_finished(self, r: dict[str, Any], t: float | None) -> None:
        if isinstance(r.get("marker"), str):
            self._markers[r["marker"]] = None

    def _on_problem(self, r: dict[str, Any], t: float | None) -> None:
        problem, line = str(r.get("problem", ""))[:200], str(r.get("line", ""))[:1000]
        entry = self._problems.get((problem, line))
        if entry is not None:
            entry["count"] += 1
        elif len(self._problems) < MAX_PROBLEMS:
            self._problems[(problem, line)] = {"problem": problem, "line": line, "count": 1,
                                               "first_t": t}
        else:
            self._problems_dropped += 1

    def _on_rejected(self, r: dict[str, Any], t: float | None) -> None:
        self.rejected += 1

    def _on_signal(self, r: dict[str, Any], t: float | None) -> None:
        pids = r.get("pids")
        pid_list = [p for p in map(_int, pids) if p is not None] if isinstance(pids, list) else []
        self._signals.append({"signal": str(r.get("signal", "")),
                              "reason": str(r.get("reason", "")), "t": t, "pids": pid_list})

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
            self.outcome = r["outcome"]
        self.exit_code = _int(r.get("exit_code"))
        self.reason = str(r["reason"]) if "reason" in r else None
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
        "outcome": _on_outcome,
    }

    # ------------------------------------------------------------------ output

    def snapshot(self) -> dict[str, Any]:
        """The report as it stands now: JSON-serialisable, O(steps)."""
        notes = list(self._notes)
        lo = self.resumed_from or 0
        hi = lo + self.steps_requested if self.steps_requested is not None else None
        order = range(len(self._step)) if self._sorted else sorted(
            range(len(self._step)), key=self._step.__getitem__)
        rows = [i for i in order if self._step[i] > lo and (hi is None or self._step[i] <= hi)]
        # the resume point itself (a 0/N or 100/N bar frame) is no step and needs no note
        outside = sum(1 for s in self._step if s != lo and not (lo < s and (hi is None or s <= hi)))
        if outside:
            notes.append(f"{outside} step(s) outside the requested range "
                         f"{lo + 1}..{hi if hi is not None else ''} were reported and left out")

        steps = [self._step[i] for i in rows]
        times = [self._t.get(i) for i in rows]
        loss, loss_src = self._merged(rows, "loss")
        avg, avg_src = self._merged(rows, "avg")
        lr, lr_src = self._merged(rows, "lr")
        lr_by_tag = {tag: [col.get(i) for i in rows] for tag, col in sorted(self._lr_tags.items())}
        epochs_of = self._epochs_of(rows, notes)

        if any(v is not None for v in loss):
            basis, basis_values, basis_src = "loss", loss, loss_src
        elif any(v is not None for v in avg):
            basis, basis_values, basis_src = "avg_loss", avg, avg_src
            notes.append("loss statistics and the EMA are computed from the trainer's running "
                         "average (avg_loss): it reported no per-step loss")
        else:
            basis, basis_values, basis_src = None, [None] * len(rows), None
        ema = _ema(basis_values, EMA_ALPHA) if basis else [None] * len(rows)
        s_per_step = _seconds_per_step(steps, times)

        sources: dict[str, str | None] = {"loss": loss_src, "avg_loss": avg_src, "lr": lr_src}
        sources.update({tag: self._lr_tag_sources.get(tag) for tag in lr_by_tag})
        sources["ema_loss"] = "lorasup" if basis else None
        sources["s_per_step"] = "lorasup" if any(v is not None for v in s_per_step) else None
        missing = [name for name in ("loss", "avg_loss", "lr") if sources[name] is None
                   and not (name == "lr" and any(
                   v is not None for vals in lr_by_tag.values() for v in vals))]
        explanation = {name: self._why_missing(name) for name in missing}
        if self._dropped_tags:
            notes.append(f"{len(self._dropped_tags)} scalar tag(s) beyond {MAX_SPARSE_TAGS} "
                         "per kind were not kept")
        if self.bad_records:
            notes.append(f"{self.bad_records} event record(s) could not be interpreted")
        if self._problems_dropped:
            notes.append(f"{self._problems_dropped} further problem line(s) not listed")
        notes.extend(f"the trainer printed its completion marker {m!r}" for m in self._markers)

        epochs = self._epochs(loss, loss_src, epochs_of, basis == "loss", notes)
        timed = [(s, t) for s, t in zip(steps, times, strict=True) if t is not None]
        finite_sps = [v for v in s_per_step if v is not None]
        steps_per_s = None
        if len(timed) >= 2 and timed[-1][1] > timed[0][1]:
            steps_per_s = (timed[-1][0] - timed[0][0]) / (timed[-1][1] - timed[0][1])

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
                "first": steps[0] if steps else None,
                "last": steps[-1] if steps else None,
                "recorded": len(steps),
                "rejected_over_max": self.rejected,
            },
            "loss": _loss_stats(steps, basis_values, basis, basis_src),
            "epochs": epochs,
            "timing": {
                "started_at": self.started_at,
                "duration_s": self.last_t,
                "first_step_s": min((t for _, t in timed), default=None),
                "median_s_per_step": statistics.median(finite_sps) if finite_sps else None,
                "steps_per_s": steps_per_s,
                **self._phases(),
            },
            "problems": [dict(p) for p in self._problems.values()],
            "stacks": [dict(c) for c in self._stacks],
            "series": {
                "step": steps,
                "t": times,
                "epoch": epochs_of,
                "loss": [_spell(v) for v in loss],
                "avg_loss": [_spell(v) for v in avg],
                "lr": [_spell(v) for v in lr],
                "lr_by_tag": {tag: [_spell(v) for v in vals] for tag, vals in lr_by_tag.items()},
                "ema_loss": ema,
                "ema": {"alpha": EMA_ALPHA, "basis": basis},
                "s_per_step": s_per_step,
                "epoch_loss": self._epoch_loss.to_json() if self._epoch_loss else None,
                "val_loss": {tag: s.to_json() for tag, s in sorted(self._val_loss.items())},
                "other": {tag: s.to_json() for tag, s in sorted(self._other.items())},
                "sources": sources,
                "missing": missing,
                "explanation": explanation,
            },
            "artifacts": self.artifacts(),
            "notes": notes,
        }

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

    def _merged(self, rows: list[int], prefix: str) -> tuple[list[float | None], str | None]:
        """Per-step values where TensorBoard's full precision wins over the console's."""
        tb, console = self._cols[f"{prefix}_tb"], self._cols[f"{prefix}_c"]
        out: list[float | None] = []
        n_tb = n_console = 0
        for i in rows:
            value = tb.get(i)
            if value is not None:
                n_tb += 1
            else:
                value = console.get(i)
                n_console += value is not None
            out.append(value)
        source = ("tensorboard+console" if n_tb and n_console else "tensorboard" if n_tb
                  else "console" if n_console else None)
        return out, source

    def _epochs_of(self, rows: list[int], notes: list[str]) -> list[int | None]:
        out: list[int | None] = []
        for i in rows:
            value = self._epoch.get(i)
            out.append(int(value) if value is not None else None)
        totals = {t for t in self._epoch_totals.values() if t is not None}
        if None in out and totals == {1} and set(self._epoch_totals) == {1}:
            # a one-epoch run whose `epoch 1/1` line arrived late (buffered stdout)
            out = [1 if e is None else e for e in out]
        return out

    def _epochs(self, loss: list[float | None], loss_src: str | None,
                epochs_of: list[int | None], have_loss: bool,
                notes: list[str]) -> list[dict[str, Any]]:
        """Per-epoch means from the per-step loss, else the trainer's own epoch average."""
        counts: dict[int, int] = {}
        sums: dict[int, list[float]] = {}
        for value, epoch in zip(loss, epochs_of, strict=True):
            if epoch is None:
                continue
            counts[epoch] = counts.get(epoch, 0) + 1
            if value is not None and math.isfinite(value):
                sums.setdefault(epoch, []).append(value)
        trainer_means: dict[int, float] = {}
        if self._epoch_loss is not None:
            trainer_means = dict(zip(self._epoch_loss.steps, self._epoch_loss.values,
                                     strict=True))
        known = sorted({*counts, *self._epoch_totals, *trainer_means})
        unassigned = sum(e is None for e in epochs_of)
        if have_loss:
            if unassigned and known:
                notes.append(f"{unassigned} step(s) have no known epoch and are in no "
                             "per-epoch mean")
            return [{"epoch": e, "mean_loss": _spell(statistics.fmean(sums[e])) if e in sums
                     else None, "steps": counts.get(e, 0), "source": f"per-step loss ({loss_src})"}
                    for e in known]
        if trainer_means:
            src = self._epoch_loss.source if self._epoch_loss else None
            return [{"epoch": e, "mean_loss": _spell(trainer_means[e]) if e in trainer_means
                     else None, "steps": counts.get(e) or None,
                     "source": f"loss/epoch_average ({src})"} for e in known]
        if known:
            notes.append("per-epoch mean loss not available: the trainer reported no per-step "
                         "loss and no epoch average")
        return [{"epoch": e, "mean_loss": None, "steps": counts.get(e) or None, "source": None}
                for e in known]

    def _file(self, name: str) -> str | None:
        return name if self._files.get(name) else None

    def _why_missing(self, name: str) -> str:
        hint = _HINTS.get((self.trainer or "", name))
        if hint:
            return hint
        who = self.trainer or "the trainer"
        return f"{who} reported no {_SERIES_LABELS[name]} (console or TensorBoard)"


# ---------------------------------------------------------------------------- statistics


def _ema(values: list[float | None], alpha: float) -> list[float | None]:
    out: list[float | None] = []
    state: float | None = None
    for value in values:
        if value is None or not math.isfinite(value):
            out.append(None)
            continue
        state = value if state is None else alpha * value + (1.0 - alpha) * state
        out.append(state)
    return out


def _seconds_per_step(steps: list[int], times: list[float | None]) -> list[float | None]:
    out: list[float | None] = []
    prev: tuple[int, float] | None = None
    for step, t in zip(steps, times, strict=True):
        if t is None:
            out.append(None)
            continue
        if prev is not None and step > prev[0] and t >= prev[1]:
            out.append((t - prev[1]) / (step - prev[0]))
        else:
            out.append(None)
        prev = (step, t)
    return out


def _loss_stats(steps: list[int], values: list[float | None], basis: str | None,
                source: str | None) -> dict[str, Any]:
    reported = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None]
    finite = [(s, v) for s, v in reported if math.isfinite(v)]
    low = min(finite, key=lambda sv: sv[1]) if finite else None
    high = max(finite, key=lambda sv: sv[1]) if finite else None
    numbers = [v for _, v in finite]
    return {
        "basis": basis,
        "source": source,
        "count": len(reported),
        "nonfinite": len(reported) - len(finite),
        "first": _spell(reported[0][1]) if reported else None,
        "final": _spell(reported[-1][1]) if reported else None,
        "min": low[1] if low else None,
        "min_step": low[0] if low else None,
        "max": high[1] if high else None,
        "max_step": high[0] if high else None,
        "mean": statistics.fmean(numbers) if numbers else None,
        "std": statistics.stdev(numbers) if len(numbers) >= 2 else None,
    }


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


def _atomic_write(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never half of one (tmp + fsync + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable; not possible everywhere, not essential
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def write_report_json(run_dir: str | os.PathLike[str], report: dict[str, Any]) -> Path:
    """Write ``report.json`` atomically; returns its path."""
    path = Path(run_dir) / REPORT_JSON
    _atomic_write(path, (_dumps(report) + "\n").encode("utf-8"))
    return path


def _cell(value: Any) -> str:
    return "" if value is None else str(value) if not isinstance(value, float) else repr(value)


def write_losses_csv(run_dir: str | os.PathLike[str], report: dict[str, Any]) -> Path:
    """``losses.csv``: one row per step, empty cells where the trainer reported nothing.

    Columns: step, loss, avg_loss, ema_loss, lr, epoch, t, then one per ``lr/<group>`` tag.
    """
    series = report["series"]
    tags = list(series.get("lr_by_tag", {}))
    columns = [series.get(name) or [] for name in ("loss", "avg_loss", "ema_loss", "lr",
                                                   "epoch", "t")]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*CSV_COLUMNS, *tags])
    for i, step in enumerate(series["step"]):
        row = [step, *(col[i] if i < len(col) else None for col in columns),
               *(series["lr_by_tag"][tag][i] for tag in tags)]
        writer.writerow([_cell(v) for v in row])
    path = Path(run_dir) / LOSSES_CSV
    _atomic_write(path, buf.getvalue().encode("utf-8"))
    return path


def write_all(run_dir: str | os.PathLike[str], builder: ReportBuilder, *,
              render: Callable[[dict[str, Any], Path], object] = render_loss_curves,
              ) -> dict[str, Any]:
    """The end-of-run files: PNG and CSV first, then report.json naming them; returns it.

    A failed PNG render is logged and noted, never fatal: the JSON report matters most.
    ``render`` draws the PNG (the live sink draws it in a child process).
    """
    run_dir = Path(run_dir)
    for name in (EVENTS_JSONL, TRAINER_LOG):
        builder.mark_written(name, (run_dir / name).exists())
    report = builder.snapshot()
    failed = False
    try:
        write_losses_csv(run_dir, report)
        builder.mark_written(LOSSES_CSV)
    except OSError as exc:
        failed = True
        log.warning("losses_csv_failed", error=str(exc))
        builder.add_note(f"losses.csv could not be written: {exc}")
    try:
        render(report, run_dir / LOSS_CURVES_PNG)
        builder.mark_written(LOSS_CURVES_PNG)
    except Exception as exc:  # matplotlib can fail in many ways; the report must not
        failed = True
        log.warning("loss_curves_failed", error=repr(exc))
        builder.add_note(f"loss_curves.png could not be rendered: {exc!r}")
    if failed:
        report = builder.snapshot()  # with the notes saying what is missing
    else:
        report["artifacts"] = builder.artifacts()  # a second snapshot of a long run is costly
    write_report_json(run_dir, report)
    return report


def read_events(path: str | os.PathLike[str], *,
                on_skip: Callable[[int, str], None] | None = None) -> Iterator[dict[str, Any]]:
    """The records of ``events.jsonl``, skipping lines that cannot be read.

    A last line cut off mid-write (lorasup killed) or an undecodable line is skipped and
    reported to ``on_skip(line_number, why)``; nothing raises except opening the file.
    """
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            text = raw.strip()
            if not text:
                continue
            try:
                record = json.loads(text)
            except ValueError:  # includes UnicodeDecodeError
                if on_skip is not None:
                    on_skip(number, "undecodable" if raw.endswith(b"\n") else "cut off")
                continue
            if not isinstance(record, dict):
                if on_skip is not None:
                    on_skip(number, "not an object")
                continue
            yield record


def rebuild(run_dir: str | os.PathLike[str], *,
            model_files: Iterable[str | os.PathLike[str]] | None = None) -> dict[str, Any]:
    """Rebuild report.json, losses.csv and loss_curves.png from ``events.jsonl`` alone."""
    run_dir = Path(run_dir)
    builder = ReportBuilder()
    liveness = LivenessTracker()
    skipped: list[tuple[int, str]] = []
    for record in read_events(run_dir / EVENTS_JSONL,
                              on_skip=lambda n, why: skipped.append((n, why))):
        builder.add(record)
        liveness.observe(record)
    lost = liveness.lost_record()
    if lost is not None:
        builder.add(lost)
    if skipped:
        first = ", ".join(f"line {n} ({why})" for n, why in skipped[:3])
        builder.add_note(f"events.jsonl: {len(skipped)} line(s) skipped: {first}"
                         + (", ..." if len(skipped) > 3 else ""))
    if model_files is not None:
        builder.set_model_files(model_files)
    return write_all(run_dir, builder)
