"""Watchdogs: total time, silence and divergence.

The time limits are cancel-scope deadlines, not timestamps compared in a polling loop:
every chunk of output pushes the silence deadline forward, so a trainer that prints
nothing at all (or only ``\\r`` redraws) is caught as surely as one that prints lines.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import anyio


async def total_timeout(seconds: float, on_fire: Callable[[], None]) -> None:
    await anyio.sleep(seconds)
    on_fire()


class SilenceWatchdog:
    """Fires when no output arrived for ``timeout`` seconds.

    After a self-stopping trainer reached its last step, the silence limit gives way to
    a finish limit: a long final save is silent and must not be taken for a hang.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.finishing = False
        self._scope = anyio.CancelScope(deadline=anyio.current_time() + timeout)

    def touch(self) -> None:
        if not self.finishing:
            self._scope.deadline = anyio.current_time() + self.timeout

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


class DivergenceWatch:
    """Counts non-finite losses; diverged once more than ``patience`` were seen."""

    def __init__(self, patience: int = 0) -> None:
        self.patience = patience
        self.nonfinite = 0

    def observe(self, *values: float | None) -> bool:
        """True when this observation makes the run diverged."""
        for value in values:
            if value is not None and not math.isfinite(value):
                self.nonfinite += 1
                return self.nonfinite > self.patience
        return False
