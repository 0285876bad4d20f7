"""The event types of one run and their JSON form.

Adapters turn trainer lines into these; the engine adds its own (started, signal,
exited, outcome). Each event becomes one line of ``events.jsonl`` with the run-relative
time ``t`` in front, and the report is rebuilt from those lines alone, so the JSON form
is the contract: absent values are left out, never filled with a placeholder.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from lorasup.supervisor.numbers import read_float

SCHEMA = "lorasup.events/1"

#: field names per event class, computed once (``dataclasses.fields`` is slow per call)
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _number(value: float) -> float | str:
    """JSON has no NaN/inf; a diverged loss must still be written, so spell it."""
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


#: kept under its old name for the readers of events.jsonl: the one tolerant float reader
read_number = read_float


@dataclass(frozen=True, slots=True)
class Event:
    """Base: subclasses set ``kind`` and declare their fields."""

    kind: ClassVar[str] = "event"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        names = _FIELD_NAMES.get(type(self))
        if names is None:
            names = _FIELD_NAMES[type(self)] = tuple(f.name for f in fields(self))
        for name in names:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, float):
                value = _number(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[name] = value
        return out

    def to_json(self, t: float) -> str:
        record = {"t": round(t, 6)}
        record.update(self.to_dict())
        return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Started(Event):
    kind: ClassVar[str] = "started"
    run_id: str
    trainer: str
    argv: tuple[str, ...]
    pid: int
    steps_requested: int
    wall_time: float
    #: who supervises the run: with these, a reader can tell a live run from a lost one
    supervisor_pid: int | None = None
    #: the supervisor's start time in clock ticks since boot (/proc/PID/stat), which tells
    #: a reused pid apart
    supervisor_start: int | None = None
    boot_id: str | None = None


@dataclass(frozen=True, slots=True)
class Step(Event):
    """Progress at optimizer step ``step``; a step may be reported again with more values.

    ``loss`` is the per-step loss, ``avg_loss`` the trainer's own running average; either
    is None when the trainer's output does not carry it.
    """

    kind: ClassVar[str] = "step"
    step: int
    total: int | None = None
    loss: float | None = None
    avg_loss: float | None = None
    lr: float | None = None
    epoch: int | None = None


@dataclass(frozen=True, slots=True)
class Resumed(Event):
    """The trainer continues an earlier run: its step numbers start after ``step``."""

    kind: ClassVar[str] = "resumed"
    step: int


@dataclass(frozen=True, slots=True)
class Scalar(Event):
    """A named metric at a step from a richer source (e.g. TensorBoard event files)."""

    kind: ClassVar[str] = "scalar"
    tag: str
    step: int
    value: float
    source: str = "console"
    wall_time: float | None = None


@dataclass(frozen=True, slots=True)
class Epoch(Event):
    kind: ClassVar[str] = "epoch"
    epoch: int
    total: int | None = None


@dataclass(frozen=True, slots=True)
class Checkpoint(Event):
    kind: ClassVar[str] = "checkpoint"
    path: str
    step: int | None = None


@dataclass(frozen=True, slots=True)
class Finished(Event):
    """The trainer printed its completion marker (its adapter knows it: ``model saved.``)."""

    kind: ClassVar[str] = "finished"
    marker: str


@dataclass(frozen=True, slots=True)
class Problem(Event):
    """A known failure pattern in the output: ``problem`` names it, ``line`` shows it."""

    kind: ClassVar[str] = "problem"
    problem: str
    line: str


@dataclass(frozen=True, slots=True)
class Rejected(Event):
    """A step beyond the requested N: counted, never recorded as a step."""

    kind: ClassVar[str] = "rejected"
    step: int


@dataclass(frozen=True, slots=True)
class SignalSent(Event):
    kind: ClassVar[str] = "signal"
    signal: str
    reason: str
    pids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Exited(Event):
    kind: ClassVar[str] = "exited"
    returncode: int


@dataclass(frozen=True, slots=True)
class Note(Event):
    """Something the supervisor wants on record (a watchdog firing, a fallback taken)."""

    kind: ClassVar[str] = "note"
    message: str


@dataclass(frozen=True, slots=True)
class Stacks(Event):
    """Python stacks of the trainer's tree (py-spy), taken before a stall kill or on SIGQUIT.

    ``processes``: one small dict per process (pid, role, command, threads with their
    innermost frames, or ``error`` saying why no stack could be taken); the full stacks are
    in ``file`` (stacks.txt in the run directory), absent when it could not be written.
    """

    kind: ClassVar[str] = "stacks"
    reason: str
    processes: tuple[dict[str, Any], ...] = ()
    file: str | None = None
    seconds: float | None = None


@dataclass(frozen=True, slots=True)
class Artifacts(Event):
    """What the run left on disk, looked up once when the trainer is gone (absolute paths):
    recorded so that a report rebuilt from events.jsonl names the same files."""

    kind: ClassVar[str] = "artifacts"
    checkpoints: tuple[str, ...] = ()
    model_files: tuple[str, ...] = ()
    error: str | None = None


@dataclass(frozen=True, slots=True)
class History(Event):
    """The curves of the run this resumed run continues (copied from its report, at most
    2048 points): the resumed run's report shows the whole history, and its EMA goes on
    from ``ema_last``. Values are spelled as in report.json ("nan" for NaN)."""

    kind: ClassVar[str] = "history"
    run_id: str
    resumed_from: int
    step: tuple[int, ...] = ()
    loss: tuple[Any, ...] = ()
    avg_loss: tuple[Any, ...] = ()
    ema_loss: tuple[Any, ...] = ()
    lr: tuple[Any, ...] = ()
    ema_basis: str | None = None
    ema_last: float | None = None


@dataclass(frozen=True, slots=True)
class Outcome(Event):
    kind: ClassVar[str] = "outcome"
    outcome: str
    exit_code: int
    reason: str
    trainer_returncode: int | None = None


def _json_float(value: float) -> str:
    return repr(value) if math.isfinite(value) else f'"{_number(value)}"'


def step_json(t: float, event: Step) -> str:
    """``Step.to_json`` without the generic machinery: one of these per training step."""
    out = f'{{"t":{t!r},"kind":"step","step":{event.step}'
    if event.total is not None:
        out += f',"total":{event.total}'
    if event.loss is not None:
        out += f',"loss":{_json_float(event.loss)}'
    if event.avg_loss is not None:
        out += f',"avg_loss":{_json_float(event.avg_loss)}'
    if event.lr is not None:
        out += f',"lr":{_json_float(event.lr)}'
    if event.epoch is not None:
        out += f',"epoch":{event.epoch}'
    return out + "}"

