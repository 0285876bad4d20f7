"""The run report as a pure function of ``events.jsonl``, in memory that does not grow.

The sink feeds every event record to a :class:`ReportBuilder` as it writes it, so a
report can be written at any moment of the run; ``lorasup report RUN_DIR`` feeds the same
records back from the file (:func:`rebuild`, streaming), so the report survives any crash
of lorasup. The rooms: ``builder`` (the state, delegating to ``window``/``folded``/``pace``,
``sparse``, ``epochs``, ``problems``, ``ledger``, ``timing``), ``fold`` (records into it),
``snapshot``/``series``/``story`` (the report object and its words), ``csvfile``
(losses.csv), ``files`` (atomic writing), ``read`` (a run back from disk), ``values``.
Whatever the run's length, the builder holds the last :data:`WINDOW`-odd steps exactly (a
step may still be reported again, e.g. by TensorBoard a second later) and folds older ones
into running statistics and :data:`BUCKETS` min/max buckets per series
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

from lorasup.supervisor.report.builder import ReportBuilder
from lorasup.supervisor.report.files import dumps as _dumps
from lorasup.supervisor.report.files import write_all, write_report_json
from lorasup.supervisor.report.fold import classify_tag
from lorasup.supervisor.report.read import load, read_into, rebuild
from lorasup.supervisor.report.values import CSV_COLUMNS, EMA_ALPHA, SCHEMA, WINDOW
from lorasup.supervisor.rundir import EVENTS_JSONL, LOSSES_CSV
from lorasup.supervisor.summary import BUCKETS

__all__ = [
    "BUCKETS",
    "CSV_COLUMNS",
    "EMA_ALPHA",
    "EVENTS_JSONL",
    "LOSSES_CSV",
    "SCHEMA",
    "WINDOW",
    "ReportBuilder",
    "_dumps",
    "classify_tag",
    "load",
    "read_into",
    "rebuild",
    "write_all",
    "write_report_json",
]
