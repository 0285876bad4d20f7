"""Watchdogs: total time, silence, progress and divergence.

The time limits are cancel-scope deadlines, not timestamps compared in a polling loop:
every chunk of output pushes the silence deadline forward, so a trainer that prints
nothing at all (or only ``\\r`` redraws) is caught as surely as one that prints lines;
every new step pushes the progress deadline forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import anyio


async def total_timeout(seconds: float, on_fire: Callable[[], None]) -> None:
    await anyio.sleep(seconds)
    on_fire()


class SilenceWatchdog:
    """Fires when no output arrived for the silence limit.

    Before the first step the limit is the start-up allowance (loading a big checkpoint is
    silent for minutes); from the first step on it is ``timeout``, so a stall in training
    is still caught quickly. After a self-stopping trainer reached its last step, the
    silence limit gives way to a finish limit: a long final save is silent and must not be
    taken for a hang.
    """

    def __init__(self, timeout: float, startup: float | None = None) -> None:
        self.timeout = timeout
        #: the limit in force now: the start-up allowance until the first step
        self.limit = startup if startup is not None else timeout
        self.training = False
        self.finishing = False
        self._scope = anyio.CancelScope(deadline=anyio.current_time() + self.limit)

    def touch(self) -> None:
        if not self.finishing:
            self._scope.deadline = anyio.current_time() + self.limit

    def first_step(self) -> None:
        """Training began: from now on the no-output timeout is the limit."""
        if not self.training:
            self.training = True
            self.limit = self.timeout
            self.touch()

    def finish_within(self, seconds: float) -> None:
        self.finishing = True
        self._scope.deadline = anyio.current_time() + seconds

    async def run(
        self, on_silence: Callable[[], None], on_finish_timeout: Callable[[], None]
    ) -> None:
        with self._scope:
            await anyio.sleep_forever()
        if self._scope.cancelled_caught:
            (on_finish_timeout if self.finishing else on_silence)()


class ProgressWatchdog:
    """Fires when no *new* step arrived for ``timeout`` seconds, counted from the first step.

    Output that is no new step (warnings, a redraw of the same step) does not reset it: a
    multi-GPU run whose rank 0 keeps printing while another rank waits in a collective
    talks, but does not progress. After the last step it stands down (the final save).
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.done = False
        # No deadline before the first step: the start-up allowance covers that time.
        self._scope = anyio.CancelScope()

    def stepped(self) -> None:
        """A new step was seen."""
        if not self.done:
            self._scope.deadline = anyio.current_time() + self.timeout

    def stand_down(self) -> None:
        self.done = True
        self._scope.deadline = math.inf

    async def run(self, on_fire: Callable[[], None]) -> None:
        with self._scope:
            await anyio.sleep_forever()
        if self._scope.cancelled_caught and not self.done:
            on_fire()


class DivergenceWatch:
    """Counts *steps* with a non-finite loss; diverged once more than ``patience`` had one.

    One bad step shows up many times (two bar frames, the running average, the loss and
    its average in TensorBoard's files); it is still one step.
    """

    def __init__(self, patience: int = 0) -> None:
        self.patience = patience
        self._bad: set[object] = set()

    @property
    def nonfinite(self) -> int:
        return len(self._bad)

    def observe(self, key: object, *values: float | None) -> bool:
        """True when this observation makes the run diverged (once, at the crossing)."""
        for value in values:
            if value is not None and not math.isfinite(value):
                if key in self._bad:
                    return False
                self._bad.add(key)
                return len(self._bad) == self.patience + 1
        return False
