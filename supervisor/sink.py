"""The report sink task: events in, ``events.jsonl`` appended and flushed, report refreshed.

It runs in the run's event loop and does only small appends there; the PNG is drawn
once at the end in a worker thread. Its input is a bounded memory object stream of
batches (one batch per chunk of trainer output), so per-event cost stays low.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import ObjectReceiveStream

from lorasup.supervisor.events import Event, Step, step_json
from lorasup.supervisor.plot import render_in_child
from lorasup.supervisor.report import ReportBuilder, write_all, write_report_json

log = structlog.get_logger(__name__)

Batch = Sequence[tuple[float, Event]]

REFRESH_SECONDS = 10.0


class ReportSink:
    def __init__(self, run_dir: Path, model_files: Callable[[], list[str]],
                 refresh_seconds: float = REFRESH_SECONDS) -> None:
        self.run_dir = run_dir
        self.builder = ReportBuilder()
        self._model_files = model_files
        self._refresh = refresh_seconds
        self._events = (run_dir / "events.jsonl").open("a", encoding="utf-8")
        self.report: dict[str, Any] | None = None
        self.write_errors = 0

    def write(self, batch: Batch) -> None:
        lines = []
        add = self.builder.add
        add_step = self.builder.add_step
        for t, event in batch:
            t = round(t, 6)
            if type(event) is Step:
                # The hot path: one line per training step, formatted without json.dumps.
                lines.append(step_json(t, event))
                add_step(t, event.step, event.loss, event.avg_loss, event.lr, event.epoch)
                continue
            record = {"t": t}
            record.update(event.to_dict())
            lines.append(json.dumps(record, ensure_ascii=False, separators=(",", ":")))
            add(record)
        lines.append("")
        try:
            self._events.write("\n".join(lines))
            self._events.flush()
        except OSError as exc:
            # A full disk must not take the supervision down with it; the report still
            # holds what the builder saw.
            self.write_errors += 1
            if self.write_errors == 1:
                log.error("events_write_failed", error=str(exc), path=str(self._events.name))

    async def run(self, receive: ObjectReceiveStream[Batch]) -> None:
        """Consume until every sender closed, then write the final files."""
        next_refresh = anyio.current_time() + self._refresh
        try:
            async with receive:
                async for batch in receive:
                    self.write(batch)
                    if anyio.current_time() >= next_refresh:
                        # A snapshot of a long run takes a while: build and write it in a
                        # worker thread so the readers (and the step gate) keep running.
                        # The builder is not touched meanwhile: only this task feeds it.
                        began = anyio.current_time()
                        await anyio.to_thread.run_sync(self._refresh_report)
                        took = anyio.current_time() - began
                        # A very long run's snapshot is not free: keep it under ~10 % of
                        # the time.
                        next_refresh = anyio.current_time() + max(self._refresh, 10 * took)
        finally:
            self._events.close()
            with anyio.CancelScope(shield=True):
                await self.finish()

    def _refresh_report(self) -> None:
        write_report_json(self.run_dir, self.builder.snapshot())

    async def finish(self) -> None:
        """CSV and PNG first (in a worker thread, the PNG in a child process), then report.json."""
        self.report = await anyio.to_thread.run_sync(self._write_final)

    def _write_final(self) -> dict[str, Any]:
        # Looking for model files walks the output folders: not on the event loop.
        self.builder.set_model_files(self._model_files())
        return write_all(self.run_dir, self.builder, render=render_in_child)

