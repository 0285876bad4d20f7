"""Graceful stop: SIGINT/SIGTERM only set a flag; the loop checks it between steps.

A handler that raised (Python's default KeyboardInterrupt) could land in the middle of
an optimizer update or a save; a flag lets the current step finish, the adapters and
state be saved, and the process exit 128 + signal (130 / 143) as shells report it.
"""

from __future__ import annotations

import signal
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopFlag:
    """Remembers the first stop signal received."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


#: the process-wide flag, installed by ``__main__`` before numpy is even imported
STOP = StopFlag()
