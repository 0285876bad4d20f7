"""lorasup's checks of a builtin run before it starts the trainer.

The trainer's own command line is read by the trainer's own parser, and its inputs are
checked by the same functions the trainer uses (``inputs``), so a run that passes here
does not fail on them in the trainer. Only PIL is imported (no numpy, no training code):
lorasup stays small while it supervises.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from .inputs import (
    DatasetError,
    StateError,
    check_state_file,
    dataset_root,
    output_dir_problem,
    state_path,
    verify_dataset,
)
from .options import DEFAULT_DATASET, build_parser, name_problem


class InputError(ValueError):
    """The builtin run cannot start; the message is one line for the user."""


class _RaisingParser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise InputError(f"builtin trainer: {message}")


def check(trainer_args: Sequence[str], cwd: Path) -> None:
    """Refuse what the trainer would refuse before its first step; InputError if so.

    ``trainer_args`` is the trainer's argv after ``python -m lorasup.trainers.builtin``;
    relative paths are taken from ``cwd``, where the trainer will run.
    """
    args = build_parser(_RaisingParser).parse_args(list(trainer_args))
    bad_name = name_problem(args.name)
    if bad_name:
        raise InputError(f"builtin trainer: {bad_name}")
    output_dir = cwd / args.output_dir
    problem = output_dir_problem(output_dir)
    if problem:
        raise InputError(problem)
    if args.mode == "continue":
        try:
            check_state_file(state_path(output_dir, args.name))
        except StateError as exc:
            raise InputError(f"{exc} (start without --continue for a new LoRA)") from None
    root, _demo = dataset_root(args.dataset, cwd, DEFAULT_DATASET)
    try:
        verify_dataset(root)
    except DatasetError as exc:
        raise InputError(str(exc)) from None


def state_file(trainer_args: Sequence[str], cwd: Path) -> Path:
    """Where the trainer run with ``trainer_args`` keeps its resume state (InputError when
    the args do not parse)."""
    args = build_parser(_RaisingParser).parse_args(list(trainer_args))
    return state_path(cwd / args.output_dir, args.name)


def output_folder(trainer_args: Sequence[str]) -> str:
    """The output folder the args name (relative to the trainer's cwd), or InputError."""
    return str(build_parser(_RaisingParser).parse_args(list(trainer_args)).output_dir)
