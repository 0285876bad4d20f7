"""``GET /jobs/<id>/series``: a job's whole loss history in at most ``points`` buckets.

Built from the attempts' ``events.jsonl`` (the report's source of truth) into
:class:`Buckets`: at most :data:`BASE_BUCKETS` buckets of ``width`` consecutive steps,
doubling the width (merging neighbours) when a step lands past the end, so memory never
grows with the run. Each bucket keeps its step range, count, mean, finite min and max, and
the count of NaN/inf losses, so a spike or a NaN is never averaged away; lr (last value)
and seconds per step (mean between step records) where the run has them. A
:class:`Curves` per job is kept (a few, LRU) and fed only the bytes appended since the last
request, so a page reload of a long run costs only its tail.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorasup.supervisor.serve.buckets import BASE_BUCKETS, Bucket, Buckets
from lorasup.supervisor.serve.steprows import (
    ROW_EPOCH,
    ROW_LOSS,
    ROW_STEP,
    STEP_LINE,
    STEP_ROWS,
    STEP_TOTAL,
    Rows,
)

MAX_POINTS = BASE_BUCKETS
#: markers kept per job (the first ones of each kind, then only counted)
MAX_MARKERS = 200
#: jobs whose folded history is kept between requests
CACHED_JOBS = 16
#: epochs whose mean is kept per job (later epochs are counted, not kept)
MAX_EPOCHS = 10_000
READ_BLOCK = 4 * 1024 * 1024
#: where a record that is not a step names its kind (markers, starts, outcomes)
OTHER_KIND = re.compile(rb'"kind":\s*"(?!step")')
#: outcomes that mean the run stopped making progress (the page's stall panel)
STALL_OUTCOMES = ("stalled", "hung", "no_progress")
MARKER_KINDS = {"checkpoint": "checkpoint", "resumed": "resume", "signal": "signal",
                "outcome": "outcome", "started": "resume", "problem": "problem",
                "stacks": "stacks"}


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if value in ("nan", "inf", "-inf"):
        return float(value)
    return None


@dataclass
class Curves:
    """The folded history of one job: positions read per attempt, buckets, markers."""

    buckets: Buckets = field(default_factory=Buckets)
    offsets: dict[int, int] = field(default_factory=dict)
    markers: list[dict[str, Any]] = field(default_factory=list)
    dropped_markers: int = 0
    last_step: int | None = None
    wall0: float | None = None
    stall: dict[str, Any] | None = None
    stacks: dict[str, Any] | None = None
    outcome: dict[str, Any] | None = None
    steps_total: int | None = None
    #: epoch -> [sum of finite losses, their count, last step]
    epochs: dict[int, list[float]] = field(default_factory=dict)
    epochs_dropped: int = 0
    _prev: tuple[float, int] | None = None
    _start: float | None = None

    def feed(self, attempt: int, path: Path) -> None:
        """Fold what was appended to ``path`` since the last call (whole lines only)."""
        offset = self.offsets.get(attempt, 0)
        try:
            with path.open("rb") as fh:
                fh.seek(offset)
                while True:
                    data = fh.read(READ_BLOCK)
                    end = data.rfind(b"\n")
                    if end < 0:
                        break
                    self._block(attempt, data[:end + 1])
                    offset += end + 1
                    fh.seek(offset)
                    if len(data) < READ_BLOCK:
                        break
        except OSError:
            pass
        self.offsets[attempt] = offset

    def _block(self, attempt: int, block: bytes) -> None:
        """Whole lines: runs of step records in bulk, every other line on its own."""
        lines = block.count(b"\n")
        if block.count(b'"kind":"step"') == lines:  # no OTHER_KIND scan: if a line is not
            # a step after all (one naming "step" twice), _steps goes line by line
            return self._steps(attempt, block, lines)
        at = 0
        for other in OTHER_KIND.finditer(block):
            start = block.rfind(b"\n", 0, other.start()) + 1
            if start < at:  # a second "kind" inside a line already handled
                continue
            end = block.find(b"\n", other.end()) + 1 or len(block)
            if start > at:
                self._steps(attempt, block[at:start])
            self._line(attempt, block[start:end].rstrip(b"\n"))
            at = end
        if at < len(block):
            self._steps(attempt, block[at:])

    def _steps(self, attempt: int, segment: bytes, lines: int | None = None) -> None:
        """A run of step records (one a line): parsed by one regex pass and folded a bucket
        at a time (a million steps in about a second); anything unusual (a line of another
        shape, a step without a loss, steps out of order) goes line by line. Only steps and
        losses are read for every row; a bucket's time, lr and pace come from its last rows,
        parsed when the bucket is made, and so does a NaN marker's time."""
        rows = STEP_ROWS.findall(segment)
        n = len(rows)
        b = self.buckets
        if lines is None:
            lines = segment.count(b"\n")
        if not rows or n != lines or self._start is None:
            return self._slowly(attempt, segment)
        steps = list(map(int, map(ROW_STEP, rows)))
        chosen = list(map(ROW_LOSS, rows))
        if b"" in chosen:  # the line path takes loss, else avg_loss, row by row
            chosen = [row[1] or row[2] for row in rows]
            if b"" in chosen:
                return self._slowly(attempt, segment)
        if sorted(steps) != steps or (b.base is not None and steps[0] < b.base):
            return self._slowly(attempt, segment)
        try:
            values = list(map(float, chosen))
        except ValueError:  # "nan", "inf", "-inf" as JSON strings
            values = [float(v.strip(b'"')) for v in chosen]
        line = Rows(segment, steps)
        has_lr = b',"lr":' in segment
        start = self._start
        if b.base is None:
            b.base = steps[0]
        prev = self._prev
        i = 0
        while i < n:
            k = (steps[i] - b.base) // b.width
            if k >= b.capacity:
                b._double()
                continue
            j = bisect.bisect_left(steps, b.base + (k + 1) * b.width, i)
            chunk = Bucket.of(steps[i], steps[j - 1], values[i:j])
            for at in range(i, j) if chunk.nonfinite else ():
                if not math.isfinite(values[at]):
                    self._marker({"kind": "nan", "step": steps[at], "attempt": attempt,
                                  "t": start + float(line.line(at).group(1))})
            end = line.line(j - 1)
            t, last = float(end.group(1)), steps[j - 1]
            if has_lr:
                chunk.lr = line.lr(end, j - 1, i)
            chunk.t = start + t
            if prev is not None and last > prev[1] and t > prev[0]:
                chunk.pace_sum, chunk.pace_n = (t - prev[0]) / (last - prev[1]), 1
            prev = (t, last)
            into = b.slots.get(k)
            if into is None:
                b.slots[k] = chunk
            else:
                into.merge(chunk)
            i = j
        self._prev = prev
        self.last_step = steps[-1]
        epochs = list(map(ROW_EPOCH, rows))
        if any(epochs):
            at = 0
            for epoch, run in itertools.groupby(epochs):  # runs of one epoch, summed at once
                length = sum(1 for _ in run)
                if epoch:
                    part = Bucket.of(0, 0, values[at:at + length])
                    self._epoch(int(epoch), part.total, part.finite, steps[at + length - 1])
                at += length
        last_total = STEP_TOTAL.match(segment, segment.rfind(b',"total":') + 1)
        if last_total is not None:
            self.steps_total = int(last_total.group(1))
        return None

    def _slowly(self, attempt: int, segment: bytes) -> None:
        for line in segment.split(b"\n"):
            if line:
                self._line(attempt, line)

    def _marker(self, record: dict[str, Any]) -> None:
        if len(self.markers) >= MAX_MARKERS:
            self.dropped_markers += 1
            return
        self.markers.append(record)

    def _line(self, attempt: int, line: bytes) -> None:
        fast = STEP_LINE.fullmatch(line)
        if fast is not None:
            t_text, step_text, total, loss_text, avg_text, lr_text, epoch = fast.groups()
            value = loss_text or avg_text
            self._step(attempt, int(step_text), float(t_text),
                       None if value is None else float(value.strip(b'"')),
                       None if lr_text is None else float(lr_text.strip(b'"')),
                       None if total is None else int(total),
                       None if epoch is None else int(epoch))
            return
        if not line.startswith(b"{"):
            return
        try:
            record = json.loads(line)
        except ValueError:
            return
        if not isinstance(record, dict):
            return
        kind = record.get("kind")
        t = _number(record.get("t"))
        wall = None if t is None or self._start is None else self._start + t
        if kind == "step":
            step = record.get("step")
            if not isinstance(step, int) or isinstance(step, bool):
                return
            loss = _number(record.get("loss"))
            if loss is None:
                loss = _number(record.get("avg_loss"))
            total, epoch = record.get("total"), record.get("epoch")
            self._step(attempt, step, t, loss, _number(record.get("lr")),
                       total if isinstance(total, int) and not isinstance(total, bool)
                       else None,
                       epoch if isinstance(epoch, int) and not isinstance(epoch, bool)
                       else None)
            return
        if kind == "started":
            start = _number(record.get("wall_time"))
            self._start = start
            self._prev = None
            if self.wall0 is None:
                self.wall0 = start
            if attempt > 1:
                self._marker({"kind": "resume", "step": self.last_step, "t": start,
                              "attempt": attempt, "label": f"attempt {attempt}"})
            return
        shown = MARKER_KINDS.get(str(kind))
        if shown is None:
            return
        step = record.get("step") if isinstance(record.get("step"), int) else self.last_step
        out: dict[str, Any] = {"kind": shown, "step": step, "t": wall, "attempt": attempt}
        if kind == "checkpoint":
            out["label"] = str(record.get("path", ""))[-80:]
        elif kind == "signal":
            out["label"] = f"{record.get('signal')}: {str(record.get('reason', ''))[:80]}"
        elif kind == "outcome":
            out["label"] = f"{record.get('outcome')}: {str(record.get('reason', ''))[:120]}"
            self.outcome = {"outcome": record.get("outcome"),
                            "reason": str(record.get("reason", ""))[:300]}
            if record.get("outcome") in STALL_OUTCOMES:
                self.stall = self.stall or {"problem": record.get("outcome"), "step": step,
                                            "line": str(record.get("reason", ""))[:300]}
        elif kind == "resumed":
            out["label"] = f"resumed after step {record.get('step')}"
        elif kind == "problem":
            out["label"] = f"{record.get('problem')}: {str(record.get('line', ''))[:120]}"
            if "stall" in str(record.get("problem")) or "hang" in str(record.get("problem")):
                self.stall = {"problem": record.get("problem"), "step": step,
                              "line": str(record.get("line", ""))[:300]}
        elif kind == "stacks":
            out["label"] = f"stacks: {str(record.get('reason', ''))[:80]}"
            self.stacks = {"reason": str(record.get("reason", ""))[:300],
                           "processes": _small(record.get("processes")),
                           "file": record.get("file")}
            self.stall = self.stall or {"problem": "stall", "step": step,
                                        "line": str(record.get("reason", ""))[:300]}
        self._marker(out)

    def _epoch(self, epoch: int, total: float, count: int, step: int) -> None:
        kept = self.epochs.get(epoch)
        if kept is None:
            if len(self.epochs) >= MAX_EPOCHS:
                self.epochs_dropped += 1
                return
            kept = self.epochs[epoch] = [0.0, 0, step]
        kept[0] += total
        kept[1] += count
        kept[2] = max(kept[2], step)

    def _step(self, attempt: int, step: int, t: float | None, loss: float | None,
              lr: float | None, total: int | None, epoch: int | None = None) -> None:
        pace = None
        prev = self._prev
        if t is not None:
            if prev is not None and step > prev[1] and t > prev[0]:
                pace = (t - prev[0]) / (step - prev[1])
            if prev is None or t > prev[0]:
                self._prev = (t, step)
        wall = None if t is None or self._start is None else self._start + t
        self.buckets.add(step, loss, lr, wall, pace)
        self.last_step = step
        if total is not None:
            self.steps_total = total
        if loss is not None and not math.isfinite(loss):
            self._marker({"kind": "nan", "step": step, "t": wall, "attempt": attempt})
        if epoch is not None:
            finite = loss is not None and math.isfinite(loss)
            self._epoch(epoch, loss if finite else 0.0, 1 if finite else 0, step)

    def as_json(self, points: int) -> dict[str, Any]:
        rows = self.buckets.rows(points)
        out: dict[str, Any] = {
            "points": len(rows), "bucket_steps": self.buckets.width,
            "first": [r["first"] for r in rows], "last": [r["last"] for r in rows],
            "count": [r["count"] for r in rows],
            "mean": [r.get("mean") for r in rows], "min": [r.get("min") for r in rows],
            "max": [r.get("max") for r in rows],
            "nonfinite": [r["nonfinite"] for r in rows],
            "markers": self.markers, "markers_dropped": self.dropped_markers,
            "last_step": self.last_step,
        }
        if any(r.get("lr") is not None for r in rows):
            out["lr"] = [r.get("lr") for r in rows]
        if any(r.get("t") is not None for r in rows):
            out["t"] = [r.get("t") for r in rows]
        if any(r.get("s_per_step") is not None for r in rows):
            out["s_per_step"] = [r.get("s_per_step") for r in rows]
        shown = sorted((e, kept) for e, kept in self.epochs.items() if kept[1])
        if shown:  # per-epoch mean of the finite losses, at each epoch's last step
            out["epochs"] = {"epoch": [e for e, _ in shown],
                             "mean": [k[0] / k[1] for _, k in shown],
                             "count": [int(k[1]) for _, k in shown],
                             "last": [int(k[2]) for _, k in shown],
                             "dropped": self.epochs_dropped}
        if self._start is not None:
            out["attempt_start"] = self._start  # the live tail's t is relative to it
        for name in ("steps_total", "stall", "stacks", "outcome", "wall0"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


def _small(processes: Any) -> list[dict[str, Any]]:
    """The stacks record's processes, cut to what a page shows."""
    if not isinstance(processes, list):
        return []
    out = []
    for proc in processes[:16]:
        if isinstance(proc, dict):
            item: dict[str, Any] = {}
            for k, v in list(proc.items())[:12]:
                if isinstance(v, list | dict) and len(json.dumps(v, default=str)) <= 8000:
                    item[str(k)] = v  # the threads with their frames, as recorded
                else:
                    item[str(k)] = v if isinstance(v, int | float) else str(v)[:2000]
            out.append(item)
    return out


class CurveCache:
    """A few jobs' :class:`Curves`, fed incrementally (called from a worker thread)."""

    def __init__(self, size: int = CACHED_JOBS) -> None:
        self.size = size
        self.jobs: OrderedDict[tuple[int, tuple[str, ...]], Curves] = OrderedDict()
        self.lock = threading.Lock()

    def series(self, job_id: int, dirs: list[Path], points: int) -> dict[str, Any]:
        key = (job_id, tuple(str(d) for d in dirs[:1]))
        with self.lock:
            curves = self.jobs.pop(key, None) or Curves()
            self.jobs[key] = curves
            while len(self.jobs) > self.size:
                self.jobs.popitem(last=False)
            for attempt, run_dir in enumerate(dirs, start=1):
                curves.feed(attempt, run_dir / "events.jsonl")
            return curves.as_json(points)


def tail_lines(path: Path, lines: int = 200, limit: int = 256 * 1024) -> str:
    """The last ``lines`` lines of a file (at most ``limit`` bytes read), as text."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            data = fh.read(limit)
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])
