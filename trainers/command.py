"""Any training program lorasup knows nothing about: run its argv untouched, stop it at N.

Nothing is injected, so the program is assumed not to stop by itself at the requested
step: lorasup sends the graceful stop the moment step N is parsed. Steps are read from
lorasup protocol lines (trainers/native.py) and from ``steps:``/``Steps:`` tqdm bars, the
form kohya's and diffusers' scripts use.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Sequence

from lorasup.supervisor.events import Event, Step
from lorasup.trainers import diffusers, kohya
from lorasup.trainers.base import (
    PYTHON_PROBLEM_NEEDLES,
    TrainerJob,
    UsageError,
    parse_bar_line,
    python_problems,
)
from lorasup.trainers.native import PREFIX, parse_protocol_line


class CommandAdapter:
    name = "command"
    stops_by_itself = False
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    needles = (PREFIX, "steps:", "Steps:", *PYTHON_PROBLEM_NEEDLES)

    def resolve_steps(self, steps: int | None, argv: Sequence[str]) -> int:
        if not argv:
            raise UsageError("--trainer command needs the program to run after '--'")
        if steps is None:
            raise UsageError("--steps is required for --trainer command")
        return steps

    def command(self, job: TrainerJob) -> list[str]:
        return list(job.argv)

    def environment(self) -> dict[str, str]:
        return {}

    def parse(self, line: str) -> Iterable[Event]:
        if line.startswith(PREFIX):
            return parse_protocol_line(line)
        return parse_bar_line(line, _any_bar, python_problems)


def _any_bar(line: str) -> tuple[Step, str] | None:
    return kohya.parse_bar(line) or diffusers.parse_bar(line)
