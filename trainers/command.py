"""Any training program lorasup knows nothing about: run its argv untouched, stop it at N.

Nothing is injected, so the program is assumed not to stop by itself at the requested
step: lorasup sends the graceful stop the moment step N is parsed. Steps are read from
lorasup protocol lines (trainers/native.py), from ``steps:``/``Steps:`` tqdm bars (the form
kohya's and diffusers' scripts use), from plain progress lines (``step 3/100 loss=0.5``,
``iter 3``; see trainers/text_steps.py), and from the user's own regular expressions: a job
file's ``[parse]`` table, whose ``step`` regex replaces the bars and plain lines (protocol
lines are always read) and whose ``loss``/``lr``/... regexes fill values in the step lines.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable, Sequence

from lorasup.supervisor.events import Event, Resumed, Step
from lorasup.trainers import bars, diffusers, kohya
from lorasup.trainers.base import (
    PYTHON_PROBLEM_NEEDLES,
    AdapterBase,
    TrainerJob,
    UsageError,
    parse_bar_line,
    python_problems,
)
from lorasup.trainers.native import PREFIX, parse_protocol_line
from lorasup.trainers.text_steps import NEEDLES, ParseTable, compile_table, plain_step


class CommandAdapter(AdapterBase):
    name = "command"
    stops_by_itself = False
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    #: this adapter reads a job file's ``[parse]`` table (TrainerJob.parse)
    accepts_parse_table = True
    #: a program may speak lorasup's line protocol: those lines are not echoed
    protocol_prefix = PREFIX.encode()

    def __init__(self) -> None:
        self.needles: tuple[str, ...] = tuple(dict.fromkeys((
            PREFIX, "steps:", "Steps:", *NEEDLES, *bars.NEEDLES, *PYTHON_PROBLEM_NEEDLES)))
        self._table: ParseTable | None = None
        #: which of the bars on screen counts the steps (N known once ``command`` ran)
        self._bars = bars.BarTracker()

    def resolve_steps(self, steps: int | None, argv: Sequence[str]) -> int:
        if not argv:
            raise UsageError("--trainer command needs the program to run after '--'")
        if steps is None:
            raise UsageError("--steps is required for --trainer command")
        return steps

    def command(self, job: TrainerJob) -> list[str]:
        self._bars = bars.BarTracker(job.steps)
        if job.parse:
            self._table = compile_table(dict(job.parse))
            # The user's regexes may match anything: every line must reach parse.
            self.needles = ()
        return list(job.argv)

    def environment(self) -> dict[str, str]:
        # rich (14+) draws its live progress only on a terminal; into a pipe it prints the
        # last frame at exit. TTY_COMPATIBLE=1 makes it draw live (with colours and cursor
        # moves, which the reader strips). Only here: the kohya/diffusers adapters keep
        # rich's plain log layout. A user's own setting wins.
        if "TTY_COMPATIBLE" in os.environ:
            return {}
        return {"TTY_COMPATIBLE": "1"}

    def parse(self, line: str) -> Iterable[Event]:
        if line.startswith(PREFIX):
            events = parse_protocol_line(line)
            for event in events:
                if type(event) is Resumed:
                    self._bars.resume(event.step)
            return events
        return parse_bar_line(line, self._step_line, python_problems)

    def _step_line(self, line: str) -> tuple[Step, str] | None:
        """The step a line shows, and the text glued after a bar frame (scanned for problems)."""
        table = self._table
        if table is None:
            return _builtin_step(line, self._bars)
        if table.step is not None:
            event = table.match_step(line)
            found = (event, "") if event is not None else None
        else:
            found = _builtin_step(line, self._bars)
        if found is None:
            return None
        return table.fill(found[0], line), found[1]


def _builtin_step(line: str, tracker: bars.BarTracker) -> tuple[Step, str] | None:
    """The step of a line in lorasup's own forms: kohya/diffusers bars, any tqdm/rich/Keras
    bar (the one ``tracker`` says counts the training), a dict line, a plain line."""
    bar = kohya.parse_bar(line) or diffusers.parse_bar(line)
    if bar is not None:
        return bar
    frame = bars.read_frame(line)
    if frame is not None:
        # a frame of another bar is no step, whatever words it holds ("Step 1:  40%|...")
        step = tracker.step(frame)
        return (step, frame.rest) if step is not None else None
    event = bars.dict_step(line) or plain_step(line)
    return (event, "") if event is not None else None
