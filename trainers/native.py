"""The lorasup line protocol: any trainer may speak it on stdout to be read exactly.

One JSON object per line, starting with ``{"lorasup":1,``; the ``kind`` key says what it is:

- ``{"lorasup":1,"kind":"step","step":3,"total":200,"loss":0.51,"lr":1e-4,"epoch":1}``
  (``step`` required; ``avg_loss`` too; the rest optional; non-finite numbers as the
  strings "nan"/"inf")
- ``{"lorasup":1,"kind":"resume","step":100}``: a resumed run; its steps are 101, 102, ...
- ``{"lorasup":1,"kind":"epoch","epoch":2,"total":5}``
- ``{"lorasup":1,"kind":"checkpoint","path":"lora_output/x.safetensors","step":200}``
- ``{"lorasup":1,"kind":"finished","marker":"saved"}``: the trainer's final save is done
- ``{"lorasup":1,"kind":"problem","problem":"dataset","line":"no images in ..."}``

Anything else on either stream is free text for people (and still scanned for problems).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterable, Sequence

from lorasup.supervisor.events import (
    Checkpoint,
    Epoch,
    Event,
    Finished,
    Problem,
    Resumed,
    Step,
)
from lorasup.supervisor.numbers import read_count, read_float, read_step
from lorasup.trainers.base import (
    PYTHON_PROBLEM_NEEDLES,
    AdapterBase,
    TrainerJob,
    UsageError,
    checkpoint_path,
    python_problems,
    replace_flag,
)

PREFIX = '{"lorasup":1'


def _text(value: object, default: str) -> str:
    """A string field, or ``default`` when the trainer sent something else (a number, a list)."""
    if value is None:
        return default
    return value if isinstance(value, str) else default


def parse_protocol_line(line: str) -> list[Event]:
    """Decode one protocol line; a malformed one (bad JSON, a missing or absurd count, deep
    nesting, numbers beyond any float) yields nothing rather than raising."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError, MemoryError):
        return []  # ValueError covers JSONDecodeError and ints of more than 4300 digits
    if not isinstance(record, dict):
        return []
    kind = record.get("kind")
    if kind == "step":
        step = read_step(record.get("step"))
        if step is None:
            return []
        return [Step(step=step, total=read_count(record.get("total")),
                     loss=read_float(record.get("loss")),
                     avg_loss=read_float(record.get("avg_loss")),
                     lr=read_float(record.get("lr")), epoch=read_count(record.get("epoch")))]
    if kind == "resume":
        step = read_step(record.get("step"))
        return [] if step is None else [Resumed(step=step)]
    if kind == "epoch":
        epoch = read_count(record.get("epoch"))
        return [] if epoch is None else [Epoch(epoch=epoch, total=read_count(record.get("total")))]
    if kind == "checkpoint":
        path = checkpoint_path(record.get("path")) if isinstance(record.get("path"), str) else None
        if path is None:
            return []
        return [Checkpoint(path=path, step=read_step(record.get("step")))]
    if kind == "finished":
        return [Finished(marker=_text(record.get("marker"), "finished")[:200])]
    if kind == "problem":
        return [Problem(problem=_text(record.get("problem"), "trainer")[:100],
                        line=_text(record.get("line"), "")[:500])]
    return []


class NativeAdapter(AdapterBase):
    """A program given after ``--`` that speaks the protocol; lorasup injects ``--steps N``."""

    name = "native"
    stops_by_itself = True
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    steps_flag = "--steps"
    needles = (PREFIX, *PYTHON_PROBLEM_NEEDLES)
    protocol_prefix = PREFIX.encode()

    def resolve_steps(self, steps: int | None, argv: Sequence[str]) -> int:
        if not argv:
            raise UsageError("--trainer native needs the trainer command after '--'")
        if steps is None:
            raise UsageError("--steps is required for --trainer native")
        return steps

    def command(self, job: TrainerJob) -> list[str]:
        return replace_flag(job.argv, self.steps_flag, str(job.steps), style=" ")

    def environment(self) -> dict[str, str]:
        return {}

    def parse(self, line: str) -> Iterable[Event]:
        if line.startswith(PREFIX):
            return parse_protocol_line(line)
        return python_problems(line)
