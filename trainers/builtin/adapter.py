"""How lorasup drives its own builtin trainer (``--trainer builtin``, the default).

The trainer speaks the native protocol, so parsing is NativeAdapter's; this adapter
only knows the program's command line (where the step limit goes and how the job's
mode, dataset and output folder map onto its options) and checks its inputs before
lorasup starts it (``preflight``).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from lorasup.trainers.base import TrainerJob, UsageError, drop_flag
from lorasup.trainers.native import NativeAdapter

MODES = {"new": "--new", "continue": "--continue"}


class BuiltinAdapter(NativeAdapter):
    """``python -m lorasup.trainers.builtin``: stops by itself at --steps after its final save."""

    name = "builtin"
    stops_by_itself = True
    # SIGINT first: the trainer finishes its step, saves and exits 130; SIGTERM the same (143)
    stop_signals = (signal.SIGINT, signal.SIGTERM)

    def resolve_steps(self, steps: int | None, argv: Sequence[str]) -> int:
        if steps is None:
            raise UsageError("--steps is required for --trainer builtin")
        if steps < 1:
            raise UsageError(f"--steps must be at least 1, got {steps}")
        return steps

    def command(self, job: TrainerJob) -> list[str]:
        return [sys.executable, "-m", "lorasup.trainers.builtin", *self.trainer_args(job)]

    def trainer_args(self, job: TrainerJob) -> list[str]:
        """The trainer's own argv: the step limit, the job's options, the user's args."""
        mapped: list[str] = []
        mode = job.option("mode")
        if mode is not None:
            if mode not in MODES:
                raise UsageError(f"unknown mode {mode!r} for the builtin trainer "
                                 f"(use {' or '.join(MODES)})")
            other = [flag for flag in MODES.values() if flag != MODES[mode]]
            if any(arg in other for arg in job.argv):
                raise UsageError(f"mode {mode!r} contradicts {other[0]} in the trainer args")
            mapped.append(MODES[mode])
        for option, flag in (("dataset", "--dataset"), ("output_dir", "--output-dir")):
            value = job.option(option)
            if value is not None:
                mapped += [flag, value]
        return ["--steps", str(job.steps), *mapped, *drop_flag(job.argv, "--steps")]

    def resume_argv(self, argv: Sequence[str], resume: str) -> list[str]:
        """``--continue``: the trainer resumes from the state it saved in its output folder
        (``resume`` names that save; the trainer finds it itself)."""
        return [*(a for a in argv if a not in MODES.values()), MODES["continue"]]

    def preflight(self, job: TrainerJob, cwd: Path) -> None:
        """A missing or empty dataset, an unreadable image, an output folder that cannot be
        written, ``--continue`` without a saved state: one line, before anything starts."""
        from .preflight import InputError, check  # PIL only when a builtin run starts

        try:
            check(self.trainer_args(job), cwd)
        except InputError as exc:
            raise UsageError(str(exc)) from None
