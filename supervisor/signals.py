"""lorasup's own stop signals before and after the event loop holds them.

``lorasup start`` holds SIGINT, SIGTERM, SIGHUP and SIGUSR1 from its first line on: a signal that
arrives while the job is still being prepared, or after the run's receiver was closed, is
remembered instead of killing lorasup with a claimed run directory and no outcome. The
run takes what was held when it starts (and stops before spawning anything).
"""

from __future__ import annotations

import signal
from types import FrameType

#: a scheduler's "time is nearly up" (SLURM's ``--signal=B:USR1@T``): stop with the final
#: save, outcome ``preempted``, an exit code that asks for a requeue (issue 19)
PREEMPT_SIGNAL = signal.SIGUSR1
#: the signals that stop a run (SIGQUIT dumps stacks; SIGPIPE is ignored by Python itself)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, PREEMPT_SIGNAL)

_held: list[signal.Signals] = []


def _remember(signum: int, _frame: FrameType | None) -> None:
    _held.append(signal.Signals(signum))


def hold() -> None:
    """Remember stop signals instead of dying of them (main thread only). SIGQUIT, which
    dumps stacks while a trainer runs, is ignored outside that time (its default action
    would kill lorasup)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _remember)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)


def take_held() -> list[signal.Signals]:
    """The signals held so far, oldest first; forgets them."""
    taken = list(_held)
    _held.clear()
    return taken
