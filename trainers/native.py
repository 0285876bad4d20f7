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
    read_number,
)
from lorasup.trainers.base import (
    PYTHON_PROBLEM_NEEDLES,
    TrainerJob,
    UsageError,
    python_problems,
    replace_flag,
)

PREFIX = '{"lorasup":1'


def _int(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def parse_protocol_line(line: str) -> list[Event]:
    """Decode one protocol line; a malformed one yields nothing rather than raising."""
    try:
        record = json.loads(line)
        kind = record.get("kind")
        if kind == "step":
            return [Step(step=int(record["step"]), total=_int(record.get("total")),
                         loss=read_number(record.get("loss")),
                         avg_loss=read_number(record.get("avg_loss")),
                         lr=read_number(record.get("lr")), epoch=_int(record.get("epoch")))]
        if kind == "resume":
            return [Resumed(step=int(record["step"]))]
        if kind == "epoch":
            return [Epoch(epoch=int(record["epoch"]), total=_int(record.get("total")))]
        if kind == "checkpoint":
            return [Checkpoint(path=str(record["path"]), step=_int(record.get("step")))]
        if kind == "finished":
            return [Finished(marker=str(record.get("marker", "finished")))]
        if kind == "problem":
            return [Problem(problem=str(record.get("problem", "trainer")),
                            line=str(record.get("line", ""))[:500])]
    except (ValueError, TypeError, KeyError, AttributeError):
        pass
    return []


class NativeAdapter:
    """A program given after ``--`` that speaks the protocol; lorasup injects ``--steps N``."""

    name = "native"
    stops_by_itself = True
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    steps_flag = "--steps"
    needles = (PREFIX, *PYTHON_PROBLEM_NEEDLES)

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
