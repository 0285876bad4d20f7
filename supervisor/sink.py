"""The report sink task: events in, ``events.jsonl`` appended and flushed, report refreshed.

It runs in the run's event loop and does only small appends there: the report state is
O(1) in the run's length (see :mod:`lorasup.supervisor.report`), ``losses.csv`` is streamed
as steps are folded, and the PNG is drawn by a child process started with the run (so
matplotlib's import is done by the time the run ends). Its input is a bounded memory
object stream of batches (one batch per chunk of trainer output).

No write here can end a run: a full disk, an I/O error or a planted symlink is counted,
logged once per file, put on record as a note, and named in :attr:`ReportSink.unwritten`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from lorasup.supervisor.events import Artifacts, Event, Note, Step, step_json
from lorasup.supervisor.fastbars import StepBlock
from lorasup.supervisor.history import find_history
from lorasup.supervisor.plotchild import PlotChild
from lorasup.supervisor.report.builder import ReportBuilder
from lorasup.supervisor.report.files import write_all, write_report_json
from lorasup.supervisor.rundir import EVENTS_JSONL, LOSSES_CSV, REPORT_JSON
from lorasup.supervisor.safefs import WriteFaults, open_append, open_new, write_all_fd

log = structlog.get_logger(__name__)

Batch = Sequence[tuple[float, Event]]

REFRESH_SECONDS = 10.0


async def emit(send: ObjectSendStream[Batch], batch: Batch) -> None:
    """Hand a batch to the sink; a sink that died (a bug of ours) loses the batch only."""
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
        await send.send(batch)


class ReportSink:
    def __init__(self, run_dir: Path, model_files: Callable[[], list[str]],
                 refresh_seconds: float = REFRESH_SECONDS, plot: PlotChild | None = None,
                 ) -> None:
        self.run_dir = run_dir
        self.faults = WriteFaults()
        self.builder = ReportBuilder(csv_out=self._write_csv)
        self._model_files = model_files
        self._refresh = refresh_seconds
        self._csv_fd: int | None = None  # None: not opened yet; -1: given up
        self._events_fd = -1
        try:
            self._events_fd = open_append(run_dir / EVENTS_JSONL)
        except OSError as exc:
            self._fault(EVENTS_JSONL, exc)
        # Started now at the latest (``lorasup start`` passes one started before its own
        # imports), before the trainer: its matplotlib import overlaps the run.
        if plot is None:
            plot = PlotChild()
            plot.start()
        self._plot = plot
        self.report: dict[str, Any] | None = None
        self._history_sought = False

    @property
    def unwritten(self) -> list[str]:
        """The run-dir files that could not be (fully) written, for the final log line."""
        return self.faults.unwritten

    def _fault(self, name: str, exc: OSError) -> None:
        first = name not in self.faults.counts
        self.faults.record(name, exc)
        if first:
            message = f"{name} could not be written ({exc}); the run goes on"
            self.builder.add_note(message)
            if name != EVENTS_JSONL and self._events_fd >= 0:
                t = self.builder.last_t or 0.0  # the run's clock as far as the sink knows it
                self._append_events(Note(message=message).to_json(t).encode() + b"\n")

    def _append_events(self, data: bytes) -> None:
        try:
            write_all_fd(self._events_fd, data)
        except OSError as exc:
            self._fault(EVENTS_JSONL, exc)

    def _write_csv(self, data: bytes) -> None:
        if self._csv_fd is None:
            try:
                self._csv_fd = open_new(self.run_dir / LOSSES_CSV, 0o644)
            except OSError as exc:
                self._csv_fd = -1
                self._fault(LOSSES_CSV, exc)
        if self._csv_fd < 0:
            return
        try:
            write_all_fd(self._csv_fd, data)
        except OSError as exc:
            self._fault(LOSSES_CSV, exc)

    def write(self, batch: Batch) -> None:
        lines: list[bytes] = []
        builder = self.builder
        steps: list[tuple[float, Step]] = []  # parsed steps in a row, given to the builder at once
        for t, event in batch:
            t = round(t, 6)
            kind = type(event)
            if kind is Step:
                steps.append((t, event))  # type: ignore[arg-type]
                continue
            if steps:
                lines.append(_add_steps(builder, steps))
                steps = []
            if kind is StepBlock:
                # The hot path: a read's worth of steps, its lines already formatted.
                lines.append(event.lines)  # type: ignore[attr-defined]
                event.feed(builder)  # type: ignore[attr-defined]
                continue
            record = {"t": t}
            record.update(event.to_dict())
            lines.append(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
                         + b"\n")
            builder.add(record)
        if steps:
            lines.append(_add_steps(builder, steps))
        if self._events_fd >= 0 and lines:
            self._append_events(b"".join(lines))

    async def run(self, receive: ObjectReceiveStream[Batch]) -> None:
        """Consume until every sender closed, then write the final files."""
        next_refresh = anyio.current_time() + self._refresh
        try:
            async with receive:
                async for batch in receive:
                    self.write(batch)
                    if self.builder.resumed_from is not None and not self._history_sought:
                        await self._seek_history()
                    if anyio.current_time() >= next_refresh:
                        # O(1) in the run's length: a copy of the summary plus the window.
                        report = self.builder.snapshot()
                        await anyio.to_thread.run_sync(self._write_report, report)
                        next_refresh = anyio.current_time() + self._refresh
        finally:
            with anyio.CancelScope(shield=True):
                await self.finish()

    async def _seek_history(self) -> None:
        """A resumed run: record the curves of the run it continues (once, in a thread:
        it reads the neighbours' report.json files)."""
        self._history_sought = True
        builder = self.builder
        try:
            found = await anyio.to_thread.run_sync(
                find_history, self.run_dir, builder.trainer, builder.resumed_from)
        except Exception as exc:  # the history is a nicety; the run goes on without it
            log.warning("history_failed", error=repr(exc))
            return
        if found is not None:
            self.write([(builder.last_t or 0.0, found)])

    def _write_report(self, report: dict[str, Any]) -> None:
        try:
            write_report_json(self.run_dir, report)
        except OSError as exc:
            self._fault(REPORT_JSON, exc)

    async def finish(self) -> None:
        """CSV and PNG first (in a worker thread, the PNG in a child process), then report.json."""
        self.report = await anyio.to_thread.run_sync(self._write_final)

    def _write_final(self) -> dict[str, Any]:
        self._plot.hurry()  # its import (if still going) overlaps the work below
        builder = self.builder
        if not builder.artifacts_recorded:
            # The engine records what the run left before its outcome; when that record
            # never came, look here (in this worker thread: it walks the output folders)
            # and record it, so that a rebuilt report still names the files.
            try:
                found = Artifacts(model_files=tuple(self._model_files()))
            except Exception as exc:  # a path the OS refuses (ENAMETOOLONG) is no failure
                log.warning("model_files_failed", error=repr(exc))
                found = Artifacts(error=f"model files could not be listed: {exc!r}"[:500])
            self.write([(builder.last_t or 0.0, found)])  # the sink keeps no clock
        builder.finish_csv()
        if self._csv_fd is not None and self._csv_fd >= 0:
            try:
                os.close(self._csv_fd)
            except OSError as exc:
                self._fault(LOSSES_CSV, exc)
            self._csv_fd = -1
        if self._csv_fd is not None and LOSSES_CSV not in self.faults.counts:
            builder.mark_written(LOSSES_CSV)
        if self._events_fd >= 0:
            try:
                os.close(self._events_fd)
            except OSError as exc:
                self._fault(EVENTS_JSONL, exc)
            self._events_fd = -1
        return write_all(self.run_dir, builder, render=self._plot.render, faults=self.faults,
                         csv_streamed=True)


def _add_steps(builder: ReportBuilder, steps: list[tuple[float, Step]]) -> bytes:
    """Parsed steps of one batch, in bulk: a run of new steps is appended to the report at
    once, not step by step (a trainer printing thousands a second notices the difference);
    returns their events.jsonl lines."""
    if len(steps) == 1:
        t, event = steps[0]
        builder.add_step(t, event.step, event.loss, event.avg_loss, event.lr, event.epoch)
        return step_json(t, event).encode() + b"\n"
    events = [event for _, event in steps]
    builder.add_steps([t for t, _ in steps], [e.step for e in events],
                      [e.loss for e in events], [e.avg_loss for e in events],
                      [e.lr for e in events], [e.epoch for e in events])
    return b"".join([step_json(t, event).encode() + b"\n" for t, event in steps])
