"""What the report lists besides the curves: notes, checkpoints and files, stack captures,
completion markers, and the history of the run this one continues. Each list is bounded."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from lorasup.supervisor.report.values import (
    MAX_NOTES,
    MAX_PROBLEMS,
    MAX_STACK_CAPTURES,
    MAX_STACK_PROCESSES,
    to_time,
)
from lorasup.supervisor.rundir import (
    EVENTS_JSONL,
    LOSS_CURVES_PNG,
    LOSSES_CSV,
    REPORT_JSON,
    TRAINER_LOG,
)


class Ledger:
    """The lists of the report that are not series."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.notes_dropped = 0
        self.markers: dict[str, None] = {}
        self.checkpoints: dict[str, None] = {}
        self.checkpoints_dropped = 0
        self.model_files: list[str] = []
        self.stacks: list[dict[str, Any]] = []
        #: the curves of the run this one continues (a ``history`` record), or None
        self.history: dict[str, Any] | None = None
        #: run-dir files the report names; the sink writes the first two from the start
        self.files = {EVENTS_JSONL: True, TRAINER_LOG: True, LOSSES_CSV: False,
                      LOSS_CURVES_PNG: False}

    def note(self, message: str) -> None:
        if len(self.notes) < MAX_NOTES:
            self.notes.append(str(message)[:2000])
        else:
            self.notes_dropped += 1

    def marker(self, marker: str) -> None:
        if len(self.markers) < 20:
            self.markers[marker[:200]] = None

    def checkpoint(self, path: str) -> None:
        if path in self.checkpoints or len(self.checkpoints) < MAX_PROBLEMS:
            self.checkpoints[path[:4096]] = None
        else:
            self.checkpoints_dropped += 1

    def set_model_files(self, paths: Iterable[str | os.PathLike[str]]) -> None:
        self.model_files = [os.fspath(p) for p in paths]

    def found_files(self, r: dict[str, Any]) -> None:
        """The engine's ``artifacts`` record: the files it looked up on disk."""
        files = r.get("model_files")
        if isinstance(files, list):
            self.model_files = [f[:4096] for f in files[:MAX_PROBLEMS] if isinstance(f, str)]
        found = r.get("checkpoints")
        if isinstance(found, list):
            # absolute: announced ones resolved against the trainer's folder, then found ones
            self.checkpoints = {p[:4096]: None for p in found[:MAX_PROBLEMS]
                                if isinstance(p, str)}
        if isinstance(r.get("error"), str):
            self.note(r["error"])

    def capture(self, r: dict[str, Any], t: float | None) -> None:
        """A ``stacks`` record: one capture of the tree's Python stacks."""
        if len(self.stacks) >= MAX_STACK_CAPTURES:
            return
        processes = r.get("processes")
        self.stacks.append({
            "t": t, "reason": str(r.get("reason", "")),
            "file": r["file"] if isinstance(r.get("file"), str) else None,
            "seconds": to_time(r.get("seconds")),
            "processes": [p for p in processes[:MAX_STACK_PROCESSES] if isinstance(p, dict)]
            if isinstance(processes, list) else []})

    def file(self, name: str) -> str | None:
        return name if self.files.get(name) else None

    def artifacts(self) -> dict[str, Any]:
        """The files a run left, as report.json names them."""
        return {
            "checkpoints": list(self.checkpoints),
            "model_files": list(self.model_files),
            "report_json": REPORT_JSON,
            "loss_curves_png": self.file(LOSS_CURVES_PNG),
            "losses_csv": self.file(LOSSES_CSV),
            "events_jsonl": self.file(EVENTS_JSONL),
            "trainer_log": self.file(TRAINER_LOG),
        }
