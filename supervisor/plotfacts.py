"""What the loss-curves figure says, as plain data (no matplotlib, so it is cheap to
test): the headline of numbers people look for first, and the steps every panel shares
as x (a resumed attempt's own ``k+1..N``, not an offset axis from 0)."""

from __future__ import annotations

import math
from typing import Any


def step_range(report: dict[str, Any]) -> tuple[float, float] | None:
    """The x-range every step panel shares: the steps of this run (``steps.first`` to
    ``steps.last``, a resumed attempt's ``k+1..N``), with at most as many steps before them
    of the run it continues, as a lead-in; None when no step was recorded."""
    steps = report.get("steps") or {}
    series = report.get("series") or {}
    xs = [x for x in series.get("step") or () if isinstance(x, (int, float))]
    first = steps.get("first") if isinstance(steps.get("first"), int) else min(xs, default=None)
    last = steps.get("last") if isinstance(steps.get("last"), int) else max(xs, default=None)
    if first is None or last is None:
        return None
    low = first
    history = series.get("history") if isinstance(series.get("history"), dict) else None
    earlier = [x for x in (history or {}).get("step") or () if isinstance(x, (int, float))]
    if earlier:
        low = max(min(earlier), first - (last - first + 1))
    pad = max(0.5, (last - low) * 0.02)
    return low - pad, last + pad


def epoch_ends(series: dict[str, Any]) -> dict[int, int]:
    """epoch -> the last step of it in this run's series (its ``epoch`` aligned with its
    ``step``); empty when the steps carry no epoch."""
    ends: dict[int, int] = {}
    for step, epoch in zip(series.get("step") or (), series.get("epoch") or (), strict=False):
        if isinstance(epoch, int) and isinstance(step, int):
            ends[epoch] = max(step, ends.get(epoch, step))
    return ends


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def format_duration(seconds: float | None) -> str:
    """``12.3 s``, ``4 min 05 s``, ``2 h 07 min``; ``-`` when unknown (the PNG's headline
    and ``lorasup status`` say durations the same way)."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def headline(report: dict[str, Any]) -> str:
    """The numbers people look for first: outcome, steps k/N, final and min loss, duration,
    seconds per step. A number the run does not have is left out, never made up."""
    status = report.get("outcome") or report.get("status") or "running"
    parts = [str(status)]
    steps = report.get("steps") or {}
    last = steps.get("last")
    if isinstance(last, int):
        requested = steps.get("requested")
        target = ((steps.get("resumed_from") or 0) + requested
                  if isinstance(requested, int) else None)
        shown = f"step {last}/{target}" if target else f"step {last}"
        # "from k": where a resumed attempt started; a fresh run whose bar first showed a
        # later step (tqdm's mininterval) did not start there
        resumed = steps.get("resumed_from")
        start = resumed + 1 if isinstance(resumed, int) and resumed > 0 else None
        parts.append(shown + (f" (from {start})" if start is not None else ""))
    loss = report.get("loss") or {}
    name = "avg loss" if loss.get("basis") == "avg_loss" else "loss"
    final, low = _number(loss.get("final")), _number(loss.get("min"))
    if final is not None:
        parts.append(f"final {name} {final:.4g}")
    if low is not None:
        where = f" at step {loss['min_step']}" if loss.get("min_step") is not None else ""
        parts.append(f"min {low:.4g}{where}")
    timing = report.get("timing") or {}
    duration, per_step = _number(timing.get("duration_s")), _number(timing.get("median_s_per_step"))
    if duration is not None:
        parts.append(format_duration(duration))
    if per_step is not None:
        parts.append(f"{per_step:.3g} s/step")
    return " · ".join(parts)
