"""The curves of the run a resumed run continues, so that its report shows the whole history.

When a trainer says it resumes at step K (a ``resumed`` event, e.g. a protocol line), the run
it continues is looked for among its neighbours in the logs folder: the newest earlier run
of the same trainer whose report ends at step K. Its sampled series (and the history it
carried itself) are copied, at most :data:`MAX_POINTS` points, into a ``history`` event of
the new run's events.jsonl: the report stays a pure function of its own run directory, and
the copy is bounded whatever the length of the chain of runs. Only the newest
:data:`MAX_CANDIDATES` reports are read, each at most :data:`MAX_REPORT_BYTES`.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

from lorasup.supervisor.events import History
from lorasup.supervisor.rundir import REPORT_JSON

__all__ = ["MAX_POINTS", "find_history", "merge_history"]

MAX_POINTS = 2048
MAX_CANDIDATES = 20
MAX_REPORT_BYTES = 4 << 20
SERIES = ("loss", "avg_loss", "ema_loss", "lr")


def _number(value: Any) -> bool:
    return value is None or value in ("nan", "inf", "-inf") or (
        isinstance(value, int | float) and not isinstance(value, bool))


def _aligned(block: dict[str, Any]) -> dict[str, list[Any]] | None:
    """The step-aligned lists of a report's series (or history) block, checked."""
    steps = block.get("step")
    if not isinstance(steps, list) or not all(isinstance(s, int) for s in steps):
        return None
    out: dict[str, list[Any]] = {"step": steps}
    for name in SERIES:
        values = block.get(name)
        ok = isinstance(values, list) and len(values) == len(steps) and all(map(_number, values))
        out[name] = values if ok else [None] * len(steps)  # type: ignore[assignment]
    return out


def merge_history(report: dict[str, Any]) -> dict[str, list[Any]] | None:
    """A finished report's own history followed by its series, thinned to MAX_POINTS."""
    series = report.get("series")
    if not isinstance(series, dict):
        return None
    own = _aligned(series)
    if own is None:
        return None
    earlier = _aligned(series["history"]) if isinstance(series.get("history"), dict) else None
    if earlier is not None and earlier["step"] and own["step"]:
        keep = [i for i, s in enumerate(earlier["step"]) if s < own["step"][0]]
        merged = {k: [earlier[k][i] for i in keep] + own[k] for k in own}
    else:
        merged = own
    n = len(merged["step"])
    if n > MAX_POINTS:  # every k-th point, always the last one
        stride = math.ceil(n / MAX_POINTS)
        picks = list(range(n - 1, -1, -stride))[::-1]
        merged = {k: [v[i] for i in picks] for k, v in merged.items()}
    return merged


def _read_report(path: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError, RecursionError):
        with open(path, "rb") as fh:
            data = fh.read(MAX_REPORT_BYTES + 1)
        if len(data) <= MAX_REPORT_BYTES:
            report = json.loads(data)
            return report if isinstance(report, dict) else None
    return None


def find_history(run_dir: Path, trainer: str | None, resumed_from: int) -> History | None:
    """The ``history`` event for a run resumed at ``resumed_from``, or None when no earlier
    run of ``trainer`` in the same logs folder ends there. Blocking: call it in a thread."""
    logs = run_dir.parent
    candidates: list[tuple[float, Path]] = []
    with contextlib.suppress(OSError):
        for entry in logs.iterdir():
            if entry == run_dir or not entry.is_dir():
                continue
            with contextlib.suppress(OSError):
                candidates.append(((entry / REPORT_JSON).stat().st_mtime, entry))
    for _, folder in sorted(candidates, reverse=True)[:MAX_CANDIDATES]:
        report = _read_report(folder / REPORT_JSON)
        if report is None or report.get("trainer") != trainer:
            continue
        if (report.get("steps") or {}).get("last") != resumed_from:
            continue
        merged = merge_history(report)
        if merged is None or not merged["step"]:
            continue
        ema = (report.get("series") or {}).get("ema") or {}
        basis = ema.get("basis") if ema.get("basis") in ("loss", "avg_loss") else None
        last_ema = next((v for v in reversed(merged["ema_loss"])
                         if isinstance(v, int | float)), None)
        return History(run_id=str(report.get("run_id") or folder.name), resumed_from=resumed_from,
                       step=tuple(merged["step"]),
                       **{name: tuple(merged[name]) for name in SERIES},
                       ema_basis=basis, ema_last=last_ema)
    return None
