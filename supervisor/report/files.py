"""The report's files at the end of a run: losses.csv and the PNG first, then report.json.

Every file is written atomically (a random O_EXCL temp name, then a rename), so a reader
never sees half a file, and no failure here raises: it is noted in the report instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from lorasup.supervisor.rundir import (
    EVENTS_JSONL,
    LOSS_CURVES_PNG,
    LOSSES_CSV,
    REPORT_JSON,
    TRAINER_LOG,
)
from lorasup.supervisor.safefs import WriteFaults, atomic_write, exists

if TYPE_CHECKING:
    from lorasup.supervisor.report.builder import ReportBuilder

log = structlog.get_logger("lorasup.supervisor.report")


def dumps(obj: Any, indent: int = 0) -> str:
    """Readable JSON: objects one key a line, flat lists (the series) on one line."""
    pad = " " * indent
    if isinstance(obj, dict) and obj:
        items = [f'{pad}  {json.dumps(k, ensure_ascii=False)}: {dumps(v, indent + 2)}'
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
    atomic_write(path, (dumps(report) + "\n").encode("utf-8"))
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
        from lorasup.supervisor.plotchild import render_in_child as render
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
