"""A loss history in at most :data:`BASE_BUCKETS` buckets of ``width`` consecutive steps:
the width doubles (neighbours merge) when a step lands past the end, so memory never grows
with the run. Each bucket keeps its step range, count, mean, finite min and max and the count
of NaN/inf losses (a spike or a NaN is never averaged away), lr (last value) and seconds per
step (mean between step records)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: buckets kept per job (a request asks for at most this many points)
BASE_BUCKETS = 4096


def finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


@dataclass(slots=True)
class Bucket:
    first: int
    last: int
    count: int = 0
    total: float = 0.0
    finite: int = 0
    low: float = math.inf
    high: float = -math.inf
    nonfinite: int = 0
    lr: float | None = None
    t: float | None = None
    pace_sum: float = 0.0
    pace_n: int = 0

    def add(self, step: int, loss: float | None, lr: float | None, t: float | None,
            pace: float | None) -> None:
        self.first, self.last = min(self.first, step), max(self.last, step)
        if loss is not None:
            self.count += 1
            if math.isfinite(loss):
                self.finite += 1
                self.total += loss
                self.low, self.high = min(self.low, loss), max(self.high, loss)
            else:
                self.nonfinite += 1
        if lr is not None and math.isfinite(lr):
            self.lr = lr
        if t is not None:
            self.t = t if self.t is None else max(self.t, t)
        if pace is not None:
            self.pace_sum += pace
            self.pace_n += 1

    def merge(self, other: Bucket) -> None:
        self.first, self.last = min(self.first, other.first), max(self.last, other.last)
        self.count += other.count
        self.finite += other.finite
        self.total += other.total
        self.low, self.high = min(self.low, other.low), max(self.high, other.high)
        self.nonfinite += other.nonfinite
        if other.lr is not None:
            self.lr = other.lr
        if other.t is not None:
            self.t = other.t if self.t is None else max(self.t, other.t)
        self.pace_sum += other.pace_sum
        self.pace_n += other.pace_n

    @classmethod
    def of(cls, first: int, last: int, losses: list[float]) -> Bucket:
        """A bucket of consecutive losses at once (the series' bulk path): their count,
        sum, finite min and max, and how many are NaN/inf."""
        out = cls(first, last, count=len(losses))
        out.total = sum(losses)
        if not math.isfinite(out.total):  # a NaN/inf (or an overflow): the finite ones
            losses = finite(losses)
            out.total = sum(losses)
            out.nonfinite = out.count - len(losses)
        out.finite = len(losses)
        if losses:
            out.low, out.high = min(losses), max(losses)
        return out

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"first": self.first, "last": self.last, "count": self.count,
                               "nonfinite": self.nonfinite}
        if self.finite:
            out.update(mean=self.total / self.finite, min=self.low, max=self.high)
        if self.lr is not None:
            out["lr"] = self.lr
        if self.t is not None:
            out["t"] = round(self.t, 3)
        if self.pace_n:
            out["s_per_step"] = self.pace_sum / self.pace_n
        return out


class Buckets:
    """Steps ``base + k*width ... base + (k+1)*width - 1`` fall into bucket ``k``."""

    def __init__(self, capacity: int = BASE_BUCKETS) -> None:
        self.capacity = capacity
        self.width = 1
        self.base: int | None = None
        self.slots: dict[int, Bucket] = {}

    def add(self, step: int, loss: float | None, lr: float | None, t: float | None,
            pace: float | None) -> None:
        if self.base is None:
            self.base = step
        if step < self.base:  # an earlier step (a resume from before the first seen)
            self._rebase(step)
        index = (step - self.base) // self.width
        while index >= self.capacity:
            self._double()
            index = (step - self.base) // self.width
        bucket = self.slots.get(index)
        if bucket is None:
            bucket = self.slots[index] = Bucket(step, step)
        bucket.add(step, loss, lr, t, pace)

    def _double(self) -> None:
        merged: dict[int, Bucket] = {}
        for index in sorted(self.slots):
            bucket = self.slots[index]
            into = merged.get(index // 2)
            if into is None:
                merged[index // 2] = bucket
            else:
                into.merge(bucket)
        self.slots = merged
        self.width *= 2

    def _rebase(self, step: int) -> None:
        old = sorted(self.slots.values(), key=lambda b: b.first)
        self.base, self.slots, self.width = step, {}, 1
        for bucket in old:
            index = (bucket.first - step) // self.width
            while index >= self.capacity or (bucket.last - step) // self.width >= \
                    self.capacity:
                self._double()
                index = (bucket.first - step) // self.width
            into = self.slots.get(index)
            if into is None:
                self.slots[index] = bucket
            else:
                into.merge(bucket)

    def rows(self, points: int) -> list[dict[str, Any]]:
        """At most ``points`` buckets: neighbours merged by a whole factor."""
        ordered = [self.slots[k] for k in sorted(self.slots)]
        if not ordered:
            return []
        group = max(1, math.ceil(len(ordered) / max(points, 1)))
        out: list[dict[str, Any]] = []
        for i in range(0, len(ordered), group):
            first = ordered[i]
            acc = Bucket(first.first, first.last)
            for bucket in ordered[i:i + group]:
                acc.merge(bucket)
            out.append(acc.as_json())
        return out
