"""Scalars that are not per-step series: epoch means, validation losses, other tags.

The trainer's per-epoch mean (logged with step = the epoch number), validation losses and
any other scalar tag: each a :class:`Sampled` series of bounded size, at most
:data:`MAX_SPARSE_TAGS` tags per kind.
"""

from __future__ import annotations

from typing import Any

from lorasup.supervisor.report.values import (
    MAX_SPARSE_TAGS,
    SPARSE_POINTS,
    merge_source,
    spell_all,
)
from lorasup.supervisor.summary import Sampled


def sampled_json(series: Sampled) -> dict[str, Any]:
    items = series.items()
    out = {"step": [s for s, _ in items], "value": spell_all([v for _, v in items]),
           "source": series.source}
    if series.shift:
        out["sampling"] = {"method": "buckets", "bucket_steps": 1 << series.shift,
                           "value": "the value at the bucket's last step"}
    return out


class Sparse:
    """epoch_loss, val_loss and other scalars, and the tags dropped beyond the bounds."""

    def __init__(self) -> None:
        self.epoch_loss: Sampled | None = None
        #: the tag of the trainer's per-epoch mean (its first, if it wrote several)
        self.epoch_tag = ""
        self.val_loss: dict[str, Sampled] = {}
        self.other: dict[str, Sampled] = {}
        self.dropped_tags: set[str] = set()
        self.dropped_count = 0

    def add(self, kind: str, tag: str, step: int, value: float, source: str) -> None:
        """A scalar of ``kind`` "epoch_loss", "val_loss" or "other"."""
        if kind == "epoch_loss":
            if self.epoch_loss is None:
                self.epoch_loss = Sampled(source, SPARSE_POINTS)
                self.epoch_tag = tag
            series = self.epoch_loss
        else:
            bucket = self.val_loss if kind == "val_loss" else self.other
            found = bucket.get(tag)
            if found is None:
                if len(bucket) >= MAX_SPARSE_TAGS:
                    self.drop(tag)
                    return
                found = bucket[tag] = Sampled(source, SPARSE_POINTS)
            series = found
        series.add(step, value)
        if source != series.source:
            series.source = merge_source(series.source, source) or source

    def drop(self, tag: str) -> None:
        if tag not in self.dropped_tags:
            self.dropped_count += 1
            if len(self.dropped_tags) < 1000:
                self.dropped_tags.add(tag)

    def as_json(self) -> dict[str, Any]:
        return {
            "epoch_loss": sampled_json(self.epoch_loss) if self.epoch_loss else None,
            "val_loss": {tag: sampled_json(s) for tag, s in sorted(self.val_loss.items())},
            "other": {tag: sampled_json(s) for tag, s in sorted(self.other.items())},
        }

