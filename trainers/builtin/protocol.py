"""Speaking lorasup's line protocol (see trainers/native.py) on stdout.

One JSON object per line, ``{"lorasup":1,"kind":...}``, flushed at once so the supervisor
sees every step the moment it ends, whatever the buffering of the pipe.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any


def number(value: float) -> float | str:
    """Full-precision float, or the protocol's spelling of a non-finite one."""
    value = float(value)
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def emit(kind: str, **fields: Any) -> None:
    """Write one protocol line and flush it.

    If the reader has gone (broken pipe), stdout is pointed at /dev/null: the run still
    finishes and saves rather than dying with the work unsaved, and the flush at exit
    does not raise a second BrokenPipeError.
    """
    line = json.dumps({"lorasup": 1, "kind": kind, **fields}, separators=(",", ":"),
                      allow_nan=False)
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def step(step: int, total: int, loss: float, avg_loss: float, lr: float, epoch: int) -> None:
    emit("step", step=step, total=total, loss=number(loss), avg_loss=number(avg_loss),
         lr=number(lr), epoch=epoch)


def problem(problem: str, line: str) -> None:
    emit("problem", problem=problem, line=line)
