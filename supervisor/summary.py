"""Running statistics and min/max buckets: what the report keeps of a run, O(1) in its length.

The report of a run of ten million steps must cost what the report of a short one costs.
So the per-step values are folded, in step order and in blocks, into:

- :class:`Stats`: count, non-finite count, first/final, min/max with their steps, mean and
  standard deviation (Welford/Chan, scaled by a power of two so that no finite input can
  overflow it);
- :class:`Buckets`: a fixed number of buckets per series (min, max and last value per
  bucket), the bucket width doubling whenever the run outgrows them.

Full resolution is in ``events.jsonl`` and ``losses.csv`` only.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

#: buckets per series: the points of the plot and of report.json's series
BUCKETS = 2048
#: a value this large switches Stats to scaled arithmetic (squares could overflow)
_SAFE_EXPONENT = 300
_INF = math.inf


def finite_values(values: Sequence[float | None]) -> tuple[list[float], int, int]:
    """(finite values, reported count, non-finite count) of a column; cheap when clean."""
    present = list(values) if None not in values else [v for v in values if v is not None]
    if not present:
        return present, 0, 0
    total = sum(present)
    if total - total == 0.0:  # a finite sum: no NaN, no inf among them
        return present, len(present), 0
    finite = [v for v in present if v - v == 0.0]
    return finite, len(present), len(present) - len(finite)


class Stats:
    """Count, first/final, min/max (with steps), mean and sample std of one series.

    Mean and M2 are kept as ``mu * 2**e`` and ``q * 4**e``: ``e`` stays 0 for ordinary
    numbers (plain Welford, blocks merged by Chan's formula) and grows only when a value
    near the float limit arrives, so two finite losses of 1e308 never overflow.
    """

    __slots__ = ("count", "e", "final", "final_step", "first", "first_step", "max",
                 "max_step", "min", "min_step", "mu", "n", "nonfinite", "q")

    def __init__(self) -> None:
        self.count = 0  # reported values, non-finite included
        self.nonfinite = 0
        self.first: float | None = None
        self.first_step: int | None = None
        self.final: float | None = None
        self.final_step: int | None = None
        self.min: float | None = None
        self.min_step: int | None = None
        self.max: float | None = None
        self.max_step: int | None = None
        self.n = 0  # finite values
        self.e = 0
        self.mu = 0.0
        self.q = 0.0

    def copy(self) -> Stats:
        other = Stats.__new__(Stats)
        for name in Stats.__slots__:
            setattr(other, name, getattr(self, name))
        return other

    def add_column(self, steps: Sequence[int], values: Sequence[float | None]) -> None:
        """Fold a block of (step, value) in step order; None = not reported."""
        if values.count(None) == len(values):
            return
        if None in values:
            pairs = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None]
            steps = [s for s, _ in pairs]
            values = [v for _, v in pairs]
        if self.first_step is None or steps[0] < self.first_step:
            self.first, self.first_step = values[0], steps[0]
        if self.final_step is None or steps[-1] >= self.final_step:
            self.final, self.final_step = values[-1], steps[-1]
        self.count += len(values)
        finite, _, bad = finite_values(values)
        if bad:
            self.nonfinite += bad
            steps = [s for s, v in zip(steps, values, strict=True) if v - v == 0.0]
            values = finite
        if not values:
            return
        low, high = min(values), max(values)
        if self.min is None or low < self.min:
            self.min, self.min_step = low, steps[values.index(low)]
        if self.max is None or high > self.max:
            self.max, self.max_step = high, steps[values.index(high)]
        big = max(high, -low)
        if self.e == 0 and (big == 0.0 or math.frexp(big)[1] <= _SAFE_EXPONENT):
            nb = len(values)
            mean_b = math.fsum(values) / nb
            m2_b = math.fsum([(x - mean_b) * (x - mean_b) for x in values])
            na = self.n
            n = na + nb
            delta = mean_b - self.mu
            self.mu += delta * nb / n
            self.q += m2_b + delta * delta * na / n * nb
            self.n = n
        else:
            for x in values:
                self._add_scaled(x)

    def _add_scaled(self, x: float) -> None:
        exponent = math.frexp(x)[1]
        if exponent > self.e and exponent > _SAFE_EXPONENT:
            ratio = math.ldexp(1.0, self.e - exponent)
            self.mu *= ratio
            self.q *= ratio * ratio
            self.e = exponent
        xs = math.ldexp(x, -self.e)
        self.n += 1
        d = xs - self.mu
        self.mu += d / self.n
        self.q += d * (xs - self.mu)

    @property
    def mean(self) -> float | None:
        if not self.n:
            return None
        try:
            return math.ldexp(self.mu, self.e)
        except OverflowError:
            return _INF if self.mu > 0 else -_INF

    @property
    def std(self) -> float | None:
        """Sample standard deviation (n - 1); inf only if it exceeds the float range."""
        if self.n < 2:
            return None
        try:
            return math.ldexp(math.sqrt(max(self.q, 0.0) / (self.n - 1)), self.e)
        except OverflowError:
            return _INF


class Buckets:
    """A fixed number of step buckets with min/max/last per series; widths double as needed.

    Bucket ``k`` holds steps ``base + k*w .. base + (k+1)*w - 1`` (``w = 2**shift``). A
    bucket's ``step``/``t``/``epoch`` are those of the last step that fell into it.
    """

    def __init__(self, count: int = BUCKETS) -> None:
        self.count = count
        self.base: int | None = None
        self.shift = 0
        self.step: list[int | None] = [None] * count
        self.t: list[float | None] = [None] * count
        self.epoch: list[int | None] = [None] * count
        #: name -> [min list, max list, last list]
        self.series: dict[str, list[list[float | None]]] = {}

    def copy(self) -> Buckets:
        other = Buckets.__new__(Buckets)
        other.count, other.base, other.shift = self.count, self.base, self.shift
        other.step, other.t, other.epoch = list(self.step), list(self.t), list(self.epoch)
        other.series = {name: [list(x) for x in lists] for name, lists in self.series.items()}
        return other

    @property
    def width(self) -> int:
        return 1 << self.shift

    def _fit(self, step: int) -> None:
        if self.base is None:
            self.base = step
        while (step - self.base) >> self.shift >= self.count:
            self._double()

    def _double(self) -> None:
        half = self.count // 2
        pad = [None] * (self.count - half)

        def merge_last(values: list[Any]) -> list[Any]:
            out = [values[2 * i + 1] if values[2 * i + 1] is not None else values[2 * i]
                   for i in range(half)]
            return out + pad

        def merge(values: list[Any], pick: Any) -> list[Any]:
            out = []
            for i in range(half):
                a, b = values[2 * i], values[2 * i + 1]
                out.append(b if a is None else a if b is None else pick(a, b))
            return out + pad

        # the last step of a merged bucket decides its step/t/epoch
        pairs = [2 * i + 1 if self.step[2 * i + 1] is not None else 2 * i for i in range(half)]
        self.step = [self.step[i] for i in pairs] + pad
        self.t = [self.t[i] for i in pairs] + pad
        self.epoch = [self.epoch[i] for i in pairs] + pad
        for lists in self.series.values():
            lists[0] = merge(lists[0], min)
            lists[1] = merge(lists[1], max)
            lists[2] = merge_last(lists[2])
        self.shift += 1

    def _lists(self, name: str) -> list[list[float | None]]:
        lists = self.series.get(name)
        if lists is None:
            lists = self.series[name] = [[None] * self.count for _ in range(3)]
        return lists

    def segments(self, steps: Sequence[int]) -> list[tuple[int, int, int]]:
        """(bucket, start, end) row ranges of ``steps`` (sorted); widens buckets to fit."""
        if not steps:
            return []
        self._fit(steps[0])
        self._fit(steps[-1])
        base, shift = self.base or 0, self.shift
        out = []
        i, n = 0, len(steps)
        while i < n:
            k = (steps[i] - base) >> shift
            j = bisect_left(steps, base + ((k + 1) << shift), i)
            out.append((k, i, j))
            i = j
        return out

    def add_rows(self, segments: list[tuple[int, int, int]], steps: Sequence[int],
                 t: Sequence[float | None], epoch: Sequence[int | None]) -> None:
        for k, _i, j in segments:
            self.step[k] = steps[j - 1]
            self.t[k] = t[j - 1]
            self.epoch[k] = epoch[j - 1]

    def add_column(self, name: str, segments: list[tuple[int, int, int]],
                   values: Sequence[float | None]) -> None:
        """Fold one column (aligned with the rows ``segments`` was made from)."""
        if values.count(None) == len(values):
            return
        low_l, high_l, last_l = self._lists(name)
        for k, i, j in segments:
            part = values[i:j]
            finite, reported, _ = finite_values(part)
            if not reported:
                continue
            last_l[k] = next(v for v in reversed(part) if v is not None)
            if finite:
                low, high = min(finite), max(finite)
                old = low_l[k]
                low_l[k] = low if old is None or low < old else old
                old = high_l[k]
                high_l[k] = high if old is None or high > old else old

    def add_point(self, name: str, step: int, value: float) -> None:
        self._fit(step)
        k = (step - (self.base or 0)) >> self.shift
        low_l, high_l, last_l = self._lists(name)
        last_l[k] = value
        if value - value == 0.0:
            if low_l[k] is None or value < low_l[k]:  # type: ignore[operator]
                low_l[k] = value
            if high_l[k] is None or value > high_l[k]:  # type: ignore[operator]
                high_l[k] = value

    def used(self) -> list[int]:
        return [k for k, s in enumerate(self.step) if s is not None]


class Sampled:
    """A sparse (step, value) series kept to at most ``limit`` points: the last value per
    step, and once there are more steps than that, the last value per doubling step range."""

    __slots__ = ("limit", "points", "shift", "source")

    def __init__(self, source: str, limit: int = 256) -> None:
        self.points: dict[int, tuple[int, float]] = {}  # bucket -> (step, value)
        self.shift = 0
        self.limit = limit
        self.source = source

    def add(self, step: int, value: float) -> None:
        key = step >> self.shift
        old = self.points.get(key)
        if old is None or step >= old[0]:
            self.points[key] = (step, value)
        if len(self.points) > self.limit:
            self.shift += 1
            merged: dict[int, tuple[int, float]] = {}
            for point in self.points.values():
                key = point[0] >> self.shift
                old = merged.get(key)
                if old is None or point[0] >= old[0]:
                    merged[key] = point
            self.points = merged

    def items(self) -> list[tuple[int, float]]:
        return sorted(self.points.values())
