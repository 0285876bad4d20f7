"""Seconds per step, measured between reads of the trainer's output, and their median.

Steps that arrive in one read share one timestamp, so the pace is the time between two
reads divided by the steps in between (see the report's conventions in ``__init__``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from itertools import compress
from operator import ne


class Pace:
    """Seconds per step between reads (see the module docs), and their median."""

    __slots__ = ("exact", "g_step", "g_t", "hist", "n", "p_step", "p_t")

    EXACT = 2048

    def __init__(self) -> None:
        self.g_t: float | None = None
        self.g_step = 0
        self.p_t: float | None = None
        self.p_step = 0
        self.exact: list[float] = []
        self.hist: dict[int, int] = {}
        self.n = 0

    def copy(self) -> Pace:
        other = Pace.__new__(Pace)
        other.g_t, other.g_step, other.p_t, other.p_step = (self.g_t, self.g_step,
                                                            self.p_t, self.p_step)
        other.exact, other.hist, other.n = list(self.exact), dict(self.hist), self.n
        return other

    def feed(self, steps: Sequence[int], times: Sequence[float | None]) -> list[tuple[int, float]]:
        points: list[tuple[int, float]] = []
        n = len(times)
        if times.count(times[0]) == n:  # the common case: steps of one read
            t = times[0]
            if t is not None:
                if t != self.g_t:
                    self._close(points)
                    self.g_t = t
                self.g_step = steps[-1]
            return points
        changes = list(compress(range(n - 1), map(ne, times, times[1:])))
        if len(changes) * 4 < n and None not in times:
            # a few reads: only the last row of each and the first row matter
            for i in (*changes, n - 1):
                points.extend(self.feed([steps[i]], [times[i]]))
            return points
        for step, t in zip(steps, times, strict=True):
            if t is None:
                continue
            if t == self.g_t:
                self.g_step = step
                continue
            self._close(points)
            self.g_t, self.g_step = t, step
        return points

    def close(self) -> list[tuple[int, float]]:
        points: list[tuple[int, float]] = []
        self._close(points)
        self.g_t = None
        return points

    def _close(self, points: list[tuple[int, float]]) -> None:
        if self.g_t is None:
            return
        if self.p_t is not None and self.g_step > self.p_step and self.g_t >= self.p_t:
            value = (self.g_t - self.p_t) / (self.g_step - self.p_step)
            points.append((self.g_step, value))
            self.n += 1
            if len(self.exact) < self.EXACT:
                self.exact.append(value)
            key = round(math.log2(value) * 70) if value > 0 else -(1 << 20)
            self.hist[key] = self.hist.get(key, 0) + 1
        self.p_t, self.p_step = self.g_t, self.g_step

    def median(self) -> float | None:
        if not self.n:
            return None
        if self.n <= len(self.exact):
            return statistics.median(self.exact)
        half, seen = self.n / 2, 0
        for key in sorted(self.hist):
            seen += self.hist[key]
            if seen >= half:
                return 0.0 if key == -(1 << 20) else 2.0 ** (key / 70)
        return None
