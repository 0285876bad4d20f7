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

from lorasup.trainers.base import Resume, TrainerJob, UsageError, drop_flag
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

    def output_dirs(self, job: TrainerJob) -> list[str]:
        """Its ``--output-dir`` (the job's ``output_dir`` option), else the default folder."""
        from .options import DEFAULT_OUTPUT_DIR
        from .preflight import InputError, output_folder

        try:
            return [output_folder(self.trainer_args(job))]
        except (InputError, UsageError):
            return [job.option("output_dir") or DEFAULT_OUTPUT_DIR]

    def resume(self, job: TrainerJob, *, target_step: int, saved_step: int,
               output_dirs: Sequence[str], cwd: Path) -> Resume | None:
        """``mode = "continue"`` with the steps left: the trainer saves its state on every
        graceful stop, and its step numbers go on from the state's step. The state file
        says which step that is (lorasup's record may miss a save its own end cut off).

        None (a fresh start with all the steps) when lorasup recorded no save of this job
        yet: a state file already in the output folder is then another run's, and a first
        attempt stopped before its first save has nothing to continue.
        """
        if saved_step <= 0:
            return None
        from .inputs import StateError, saved_state_step
        from .preflight import InputError, state_file

        argv = tuple(a for a in job.argv if a not in MODES.values())
        try:
            path = state_file(self.trainer_args(job), cwd)
            step = saved_state_step(path)
        except (InputError, StateError, UsageError):
            return None
        return Resume(argv=argv, steps=max(target_step - step, 0),
                      options=(("mode", "continue"),), point=str(path), step=step)

    def preflight(self, job: TrainerJob, cwd: Path) -> None:
        """A missing or empty dataset, an unreadable image, an output folder that cannot be
        written, ``--continue`` without a saved state: one line, before anything starts."""
        from .preflight import InputError, check  # PIL only when a builtin run starts

        try:
            check(self.trainer_args(job), cwd)
        except InputError as exc:
            raise UsageError(str(exc)) from None
