"""The report's ``series``: one entry per step for a short run, else per bucket of steps."""

from __future__ import annotations

from typing import Any

from lorasup.supervisor.report.folded import Folded
from lorasup.supervisor.report.values import spell_all


def every_step(rows: dict[str, Any] | None, basis: str | None, tags: list[str],
               pace_points: list[tuple[int, float]], one_epoch: bool) -> dict[str, Any]:
    """Every recorded step (a run of at most ``BUCKETS`` steps)."""
    if rows is None:
        rows = {"step": [], "t": [], "epoch": [], "loss": [], "avg_loss": [], "lr": [],
                "ema:loss": [], "ema:avg_loss": [], "tags": {}}
    steps = rows["step"]
    n = len(steps)
    pace = dict(rows.get("pace", ()))
    pace.update(pace_points)
    epochs = rows["epoch"]
    if one_epoch and None in epochs:
        # a one-epoch run whose `epoch 1/1` line arrived late (buffered stdout)
        epochs = [1 if e is None else e for e in epochs]
    return {
        "sampling": {"method": "every_step", "points": n, "bucket_steps": 1},
        "step": list(steps),
        "t": list(rows["t"]),
        "epoch": list(epochs),
        "loss": spell_all(rows["loss"]),
        "avg_loss": spell_all(rows["avg_loss"]),
        "lr": spell_all(rows["lr"]),
        "lr_by_tag": {tag: spell_all(rows["tags"].get(tag) or [None] * n) for tag in tags},
        "ema_loss": list(rows["ema:" + basis]) if basis else [None] * n,
        "s_per_step": [pace.get(s) for s in steps],
    }


def buckets(summary: Folded, basis: str | None, tags: list[str],
            one_epoch: bool) -> dict[str, Any]:
    """The summary's buckets: each the last value of its steps, with a min/max envelope."""
    b = summary.buckets
    used = b.used()

    def pick(values: list[Any]) -> list[Any]:
        return spell_all([values[k] for k in used])

    def lists(name: str) -> list[list[Any]] | None:
        return b.series.get(name)

    out: dict[str, Any] = {
        "sampling": {"method": "buckets", "points": len(used), "bucket_steps": b.width,
                     "buckets": b.count, "first_bucket_step": b.base,
                     "value": "the last value reported in the bucket",
                     "envelope": "finite min and max in the bucket"},
        "step": [b.step[k] for k in used],
        "t": [b.t[k] for k in used],
        "epoch": [1 if one_epoch and b.epoch[k] is None else b.epoch[k] for k in used],
    }
    none = [None] * len(used)
    envelope: dict[str, Any] = {}
    for name in ("loss", "avg_loss", "lr", "s_per_step"):
        found = lists(name)
        out[name] = pick(found[2]) if found else none
        if found and name != "lr":
            envelope[name] = {"min": pick(found[0]), "max": pick(found[1])}
    found = lists("ema:" + basis) if basis else None
    out["ema_loss"] = pick(found[2]) if found else none
    out["lr_by_tag"] = {}
    for tag in tags:
        found = lists("tag:" + tag)
        out["lr_by_tag"][tag] = pick(found[2]) if found else none
    out["envelope"] = envelope
    return out


def first_step(summary: Folded) -> int | None:
    used = summary.buckets.used()
    if not used:
        return None
    # the first bucket's first step is not kept; the first row folded is its base
    return summary.buckets.base if summary.buckets.shift else summary.buckets.step[used[0]]
