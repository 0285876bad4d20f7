"""The report builder: event records in, report state out, O(1) per event and in memory.

The builder owns the run's identity and outcome; each other part of the report is a
small object of its own that the builder delegates to: the :class:`Window` of exact steps
(folding into the summary), :class:`Sparse` scalars, :class:`Epochs`, :class:`Problems`
and signals, the :class:`Ledger` of notes and files, the :class:`Phases` of the timing,
and ``losses.csv`` (:class:`LossesCsv`). Records are routed by :data:`fold.HANDLERS`; the
report object is put together by :func:`snapshot.snapshot`. What the report must know of
the trainer (scalar tags, hints, the expected-exit rule) it asks the trainer's adapter,
found by the name in the ``started`` record.
"""

from __future__ import annotations

import bisect
import itertools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from lorasup.supervisor.report.csvfile import LossesCsv
from lorasup.supervisor.report.epochs import Epochs
from lorasup.supervisor.report.fold import HANDLERS
from lorasup.supervisor.report.ledger import Ledger
from lorasup.supervisor.report.problems import Problems
from lorasup.supervisor.report.snapshot import snapshot
from lorasup.supervisor.report.sparse import Sparse
from lorasup.supervisor.report.timing import Phases
from lorasup.supervisor.report.values import to_time
from lorasup.supervisor.report.window import Window
from lorasup.trainers import recorded_adapter, scalar_tags
from lorasup.trainers.base import AdapterBase


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
        #: the engine's ``artifacts`` record arrived (the run's files were looked up)
        self.artifacts_recorded = False
        #: who supervises the run (pid, start time, boot id), from its ``started`` record
        self.started_record: dict[str, Any] | None = None
        #: what the report knows of the trainer: its adapter, once the start names it
        self.adapter: AdapterBase = AdapterBase()
        self._scalar_tags: Mapping[str, str] | None = None
        self.window = Window(self.range)
        self.epochs = Epochs()
        self.csv = LossesCsv(csv_out, self.window, self.epochs.one_epoch)
        if csv_out is not None:
            self.window.on_fold = self.csv.write
        self.sparse = Sparse()
        self.problems = Problems(self._expected_exit)
        self.ledger = Ledger()
        self.phases = Phases()

    # ------------------------------------------------------------------ the trainer

    def set_trainer(self, name: str) -> None:
        """The run's trainer (its ``started`` record): its adapter answers for it."""
        self.trainer = name
        self.adapter = recorded_adapter(name)
        self._scalar_tags = None

    @property
    def scalar_tags(self) -> Mapping[str, str]:
        """TensorBoard tag -> series, as the trainer's adapter declares them."""
        if self._scalar_tags is None:
            self._scalar_tags = scalar_tags(self.trainer)
        return self._scalar_tags

    def _expected_exit(self, problem: str, line: str) -> bool | None:
        return self.adapter.expected_exit(problem, line)

    # ------------------------------------------------------------------ input

    def add(self, record: dict[str, Any]) -> None:
        """Take one ``events.jsonl`` record; anything malformed is ignored, never raised."""
        try:
            if not isinstance(record, dict):
                self.bad_records += 1
                return
            t = to_time(record.get("t"))
            if t is not None and (self.last_t is None or t > self.last_t):
                self.last_t = t
            handler = HANDLERS.get(record.get("kind"))  # type: ignore[arg-type]
            if handler is not None:
                handler(self, record, t)
        except Exception:  # a report must survive any input; count it and go on
            self.bad_records += 1

    def add_note(self, message: str) -> None:
        """Put something on record (e.g. lines of events.jsonl that could not be read)."""
        self.ledger.note(message)

    def set_model_files(self, paths: Iterable[str | os.PathLike[str]]) -> None:
        """The model files found on disk (the builder itself never looks at the disk)."""
        self.ledger.set_model_files(paths)

    def mark_written(self, artifact: str, present: bool = True) -> None:
        """Record whether a run-dir file (e.g. ``loss_curves.png``) exists, for ``artifacts``."""
        self.ledger.files[artifact] = present

    def is_written(self, artifact: str) -> bool:
        return bool(self.ledger.files.get(artifact))

    def range(self) -> tuple[int, int | None]:
        """The requested steps: (resumed_from, resumed_from + requested]."""
        lo = self.resumed_from or 0
        return lo, (lo + self.steps_requested if self.steps_requested is not None else None)

    @property
    def top_step(self) -> int | None:
        """The highest step recorded in the requested range (None before the first)."""
        return self.phases.top_step

    def _time_step(self, step: int, t: float | None) -> None:
        self.phases.step(step, t, self.resumed_from or 0, self.steps_requested)

    def add_step(self, t: float | None, step: int, loss: float | None,
                 avg_loss: float | None, lr: float | None, epoch: int | None) -> None:
        """A step record with values already typed."""
        if t is not None and (self.last_t is None or t > self.last_t):
            self.last_t = t
        self._time_step(step, t)
        window = self.window
        row = window.row(step)
        if row < 0:
            self.late_values += 1
            return
        first_report = window.t[row] is None
        if first_report and t is not None:
            window.t[row] = t
        cols = window.cols
        if loss is not None:
            cols["loss_c"][row] = loss
        if avg_loss is not None:
            cols["avg_c"][row] = avg_loss
        if lr is not None:
            cols["lr_c"][row] = lr
        if epoch is not None:
            window.epoch[row] = epoch
        elif first_report and self.epochs.current is not None and window.epoch[row] is None:
            window.epoch[row] = self.epochs.current

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
        window = self.window
        ws = window.steps
        simple = ((not ws or steps[0] > ws[-1]) and not window.is_late(steps[0])
                  and (n == 1 or steps == list(range(steps[0], steps[0] + n))
                       or all(a < b for a, b in itertools.pairwise(steps))))
        if not simple:
            for i in range(n):
                self.add_step(times[i], steps[i], loss[i] if loss else None,
                              avg_loss[i] if avg_loss else None, lr[i] if lr else None,
                              epoch[i] if epoch else None)
            return
        # increasing steps: the first and the last in range say all _time_step needs to know
        lo, hi = self.range()
        first = bisect.bisect_right(steps, lo)
        last = (n if hi is None else bisect.bisect_right(steps, hi)) - 1
        if first <= last:
            if times[first] is None or times[last] is None:
                for i in range(first, last + 1):
                    self._time_step(steps[i], times[i])
            else:
                self._time_step(steps[first], times[first])
                self._time_step(steps[last], times[last])
        current = self.epochs.current
        if epoch is None or epoch.count(None) == n:
            epochs: list[int | None] = [current] * n
        else:
            epochs = [e if e is not None else current for e in epoch]
        window.extend(steps, times, epochs, loss, avg_loss, lr)

    # ------------------------------------------------------------------ output

    def finish_csv(self) -> None:
        """Write the rows still in the window (the end of a streamed ``losses.csv``)."""
        self.csv.finish()

    def csv_text(self) -> bytes:
        """All of ``losses.csv`` for a builder that never streamed (nothing folded yet)."""
        return self.csv.text()

    def snapshot(self) -> dict[str, Any]:
        """The report as it stands now: JSON-serialisable, its size bounded."""
        return snapshot(self)

    def artifacts(self) -> dict[str, Any]:
        """The files a run left, as report.json names them."""
        return self.ledger.artifacts()
