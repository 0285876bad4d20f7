"""The store's rows as Python sees them: jobs, attempts, and a job's spec as it is kept
(JSON in the database and in each run's attempt.json), read back defensively: a stored row
that does not load fails its own job, never the daemon."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from lorasup.supervisor.serve.jobspec import JobSpec

#: states a job can be in; the last four are final
STATES = ("queued", "running", "completed", "failed", "cancelled", "lost")
ACTIVE = ("queued", "running")
FINAL = ("completed", "failed", "cancelled", "lost")

@dataclass
class JobRow:
    id: int
    name: str
    priority: int
    state: str
    outcome: str | None
    reason: str | None
    spec: JobSpec
    retries_used: int
    attempts: int
    not_before: float
    target_step: int | None
    saved_step: int
    steps_done: int | None
    last_loss: float | None
    stop_request: str | None
    waiting: str | None
    created: float
    updated: float
    #: why the stored spec could not be loaded (the job is failed, ``spec`` is a stand-in)
    broken: str | None = None


@dataclass
class AttemptRow:
    job_id: int
    n: int
    run_id: str
    run_dir: str
    why: str
    slot: str | None
    devices: str | None
    pid: int | None
    start_time: int | None
    boot_id: str | None
    started: float
    ended: float | None
    outcome: str | None
    exit_code: int | None
    end_reason: str | None
    steps: int | None


def _spec_json(spec: JobSpec) -> str:
    data = dict(spec.__dict__)
    data["output_dirs"] = list(spec.output_dirs)
    return json.dumps(data)


def spec_data(spec: JobSpec) -> dict[str, Any]:
    """The spec as stored (JSON-ready): also written into each run's attempt.json."""
    return dict(json.loads(_spec_json(spec)))


def load_spec(text: str) -> JobSpec:
    """A stored spec, type-checked (raises on anything else)."""
    return _spec(text)


def _spec(text: str) -> JobSpec:
    data = json.loads(text)
    data["output_dirs"] = tuple(data.get("output_dirs") or ())
    spec = JobSpec(**data)
    # A row written by another version or by hand: the fields the loop does arithmetic
    # and comparisons with must have their types, or this one job fails, not the daemon.
    for name in ("priority", "gpus", "retries", "steps"):
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} is {type(value).__name__}, not a whole number")
    if isinstance(spec.grace, bool) or not isinstance(spec.grace, int | float):
        raise TypeError(f"grace is {type(spec.grace).__name__}, not a number")
    if not isinstance(spec.values, dict) or not isinstance(spec.notify, dict):
        raise TypeError("values and notify must be tables")
    return spec


#: columns of ``jobs`` the loop computes with, and the types they must hold
_NUMBERS = {"priority": int, "retries_used": int, "attempts": int, "saved_step": int,
            "not_before": (int, float), "created": (int, float), "updated": (int, float)}
_OPTIONAL = {"target_step": int, "steps_done": int, "last_loss": (int, float)}


def _check_columns(data: dict[str, Any]) -> None:
    """SQLite keeps whatever was written into a column (a hand-edited row, another
    version): a value of the wrong type fails its job, not the scheduler's arithmetic."""
    for name, kind in (*_NUMBERS.items(), *_OPTIONAL.items()):
        value = data.get(name)
        if value is None and name in _OPTIONAL:
            continue
        if isinstance(value, bool) or not isinstance(value, kind):
            raise TypeError(f"column {name} holds {type(value).__name__} {str(value)[:40]!r}")
    if data.get("state") not in STATES:
        raise ValueError(f"unknown state {str(data.get('state'))[:40]!r}")


def broken_spec(row: sqlite3.Row) -> JobSpec:
    """What a job whose stored spec cannot be loaded still shows (its own columns)."""
    def number(name: str) -> int:
        value = row[name]
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    return JobSpec(values={}, name=str(row["name"]), priority=number("priority"),
                   gpus=number("gpus"), cwd="", retries=number("retries"), notify={},
                   trainer="", steps=0, grace=0.0, run_dir=None, logs_dir=None)
