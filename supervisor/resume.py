"""Continuing an earlier attempt of the same job: ``lorasup start --resume-from RUN``.

A scheduler (SLURM's requeue, a Kubernetes pod retry) starts the job again after it was
cut off; the new attempt continues the trainer's saved state and counts its steps from
where it stopped, so a job asked for N steps ends at exactly N in total, however often it
was interrupted. What to continue from is read from the earlier attempt's run directory
(its records, not the trainer's output): the job's total, and the newest save recorded.
How the trainer continues is its adapter's rule (``AdapterBase.resume``), the same rule the
daemon's retries follow.

Each resumed attempt writes ``resume.json`` before it starts the trainer: the job's total
and the save it continues from. An attempt cut off before its trainer said anything still
hands both on to the next one.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorasup.supervisor.liveness import supervisor_alive
from lorasup.supervisor.rundir import EVENTS_JSONL, RESUME_JSON
from lorasup.trainers.base import Resume, UsageError

SCHEMA = "lorasup.resume/1"
#: the step of a ``step`` line, read without parsing the whole line (most lines are steps)
_STEP = re.compile(rb'^\{"t":[^,]*,"kind":"step","step":(\d+)')
#: lines longer than this are not records of ours (events are small)
MAX_LINE = 1 << 20


@dataclass(frozen=True)
class Record:
    """What an earlier attempt's run directory says about the job."""

    run_dir: Path
    #: the job's total step (None: the attempt never started its trainer)
    target_step: int | None
    #: the newest step known to be saved by this job (0: none)
    saved_step: int
    #: the last step recorded
    last_step: int
    outcome: str | None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


def read_marker(run_dir: Path) -> dict[str, Any]:
    """``resume.json`` of a run directory, {} when it has none (a first attempt)."""
    try:
        data = json.loads((run_dir / RESUME_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("schema") == SCHEMA else {}


def read_record(run_dir: Path) -> Record:
    """The job's total and newest save from a run directory; UsageError (one line) when it
    is no run or its supervisor still runs (two trainers would write one output)."""
    events = run_dir / EVENTS_JSONL
    marker = read_marker(run_dir)
    requested = resumed = started = None
    saved = _int(marker.get("saved_step")) or 0
    last = 0
    outcome: str | None = None
    try:
        handle = events.open("rb")
    except OSError as exc:
        raise UsageError(f"--resume-from {run_dir}: cannot read {EVENTS_JSONL}: "
                         f"{exc.strerror or exc}") from None
    with handle:
        for line in handle:
            step = _STEP.match(line)
            if step is not None:
                last = max(last, int(step[1]))
                continue
            if len(line) > MAX_LINE:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut off by a crash
            if not isinstance(record, dict):
                continue
            kind = record.get("kind")
            if kind == "started":
                started = record
                requested = _int(record.get("steps_requested"))
            elif kind == "resumed":
                resumed = _int(record.get("step"))
                saved = max(saved, resumed or 0)
                last = max(last, resumed or 0)
            elif kind == "checkpoint":
                saved = max(saved, _int(record.get("step")) or 0)
            elif kind == "outcome" and isinstance(record.get("outcome"), str):
                outcome = record["outcome"]
    if outcome is None and started is not None and supervisor_alive(started):
        raise UsageError(f"--resume-from {run_dir}: that run is still running (lorasup pid "
                         f"{started.get('supervisor_pid')}); stop it first")
    target = _int(marker.get("target_step"))
    if target is None and requested is not None:
        target = (resumed or 0) + requested
    return Record(run_dir=run_dir, target_step=target, saved_step=saved, last_step=last,
                  outcome=outcome)


def nothing_left(record: Record, target: int, resume: Resume | None) -> str | None:
    """Why there is nothing to resume (the job is done), or None."""
    done = resume.step if resume is not None and resume.step is not None else None
    if record.outcome == "completed":
        return f"{record.run_dir} completed the job ({target} steps): nothing to resume"
    if done is not None and done >= target:
        return f"{resume.point if resume else record.run_dir} holds step {done} of " \
               f"{target}: nothing to resume"
    return None


def write_marker(run_dir: Path, record: Record, target: int, resume: Resume | None) -> None:
    """``resume.json`` in the new run directory (0600): the chain's total and the save this
    attempt continues from (0: it starts fresh), for the attempt after it."""
    saved = 0
    if resume is not None:
        saved = resume.step if resume.step is not None else record.saved_step
    data = {"schema": SCHEMA, "resumed_from_run": str(record.run_dir), "target_step": target,
            "saved_step": saved, "point": resume.point if resume is not None else None,
            "fresh": resume is None}
    fd = os.open(run_dir / RESUME_JSON,
                 os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(data, sort_keys=True) + "\n")
