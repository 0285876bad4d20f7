"""A tqdm-like progress bar on stderr, hand-rolled to keep the trainer dependency-light.

Redraws in place with ``\\r`` at most ~10 times a second (and always on the last step), so
a fast run does not flood a log with thousands of redraws.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 24


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


class ProgressBar:
    """``steps  45%|##########          | 90/200 [00:01<00:01, 85.2it/s, loss=0.123, avg=0.2]``"""

    def __init__(self, first_step: int, total: int, *, stream: TextIO | None = None,
                 interval: float = 0.1, enabled: bool = True) -> None:
        self.first_step = first_step  # steps before this one were done by an earlier run
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.enabled = enabled
        self.started = time.monotonic()
        self.last_draw = float("-inf")
        self.drawn = False

    def update(self, step: int, loss: float, avg_loss: float) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if step != self.total and now - self.last_draw < self.interval:
            return
        self.last_draw = now
        elapsed = now - self.started
        done_here = step - self.first_step + 1
        rate = done_here / elapsed if elapsed > 0 else 0.0
        remaining = (self.total - step) / rate if rate > 0 else 0.0
        fraction = step / self.total if self.total else 1.0
        filled = int(WIDTH * fraction)
        bar = "#" * filled + " " * (WIDTH - filled)
        text = (f"\rsteps {fraction:4.0%}|{bar}| {step}/{self.total} "
                f"[{_clock(elapsed)}<{_clock(remaining)}, {rate:.1f}it/s, "
                f"loss={loss:.4g}, avg={avg_loss:.4g}]")
        self._write(text)
        self.drawn = True

    def close(self) -> None:
        """End the bar's line so later stderr messages start on a fresh one."""
        if self.enabled and self.drawn:
            self._write("\n")
            self.drawn = False

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            self.enabled = False  # stderr gone: the protocol lines still carry progress
