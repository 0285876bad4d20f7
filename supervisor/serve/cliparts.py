"""What the daemon's commands share (commands.py, servecommand.py): the state directory
option, the one-line failure, the bounds of a duration."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

USAGE_EXIT = 2

StateDir = Annotated[Path | None, typer.Option(
    help="state directory [$LORASUP_STATE_DIR, $STATE_DIRECTORY, ~/.local/state/lorasup]")]


def fail(message: str, code: int = USAGE_EXIT) -> typer.Exit:
    typer.echo(f"lorasup: error: {message}", err=True)
    return typer.Exit(code)


def max_seconds() -> int:
    from lorasup.supervisor.config import MAX_SECONDS  # pydantic: not at every CLI start

    return MAX_SECONDS


def valid_seconds(value: float) -> bool:
    """A duration the daemon can do arithmetic with: finite, 0..MAX_SECONDS (config.py)."""
    return math.isfinite(value) and 0 <= value <= max_seconds()
