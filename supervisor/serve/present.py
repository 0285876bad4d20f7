"""What ``ps``, ``show`` and ``logs`` print for a person at a terminal: a table, a summary,
readable log lines. ``--json`` (or a pipe) gets the API's documents unchanged.

Pure functions of the documents the API (or the offline reader) returns: no I/O.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

#: the longest value of one field shown in a readable log line
FIELD_WIDTH = 80
#: fields of a log record the line shows in its own columns, not as key=value
_OWN = ("timestamp", "level", "event", "t", "kind", "logger")


#: control characters (C0, DEL, C1) as escapes: a log line or a reason never moves the
#: cursor, clears the screen or splits a line on the reader's terminal
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0))}


def printable(text: str) -> str:
    """``text`` with its control characters escaped (``\\x1b``), on one line."""
    return text.translate(_CONTROL)


def duration(seconds: Any) -> str:
    """``45s``, ``3m05s``, ``2h04m``; ``-`` for a time that is not known."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) \
            or not math.isfinite(seconds) or seconds < 0:
        return "-"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _step(job: dict[str, Any]) -> str:
    step, total = job.get("step"), job.get("steps")
    if step is None and total is None:
        return "-"
    return f"{'-' if step is None else step}/{'-' if total is None else total}"


def _loss(value: Any) -> str:
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:.4g}"
    return value if isinstance(value, str) else "-"  # "nan"/"inf" as events.jsonl spells


def _why(job: dict[str, Any]) -> str:
    """For a queued job why it waits; for a finished one its outcome (and reason)."""
    if job.get("state") == "queued":
        return f"waits: {job['waiting']}" if job.get("waiting") else "next"
    outcome = job.get("outcome")
    if job.get("state") in ("running",) or not outcome:
        return ""
    reason = job.get("reason")
    if reason and outcome != "completed":
        return f"{outcome}: {reason}"
    return str(outcome)


def ps_table(jobs: list[dict[str, Any]]) -> list[str]:
    """The rows of ``ps``: one per job, aligned columns."""
    rows = [("ID", "NAME", "STATE", "PRI", "SLOT", "TRY", "STEP", "LOSS", "ELAPSED", "ETA",
             "PID", "WHY")]
    for job in jobs:
        retries = job.get("retries") or 0
        attempt = job.get("attempt") or 0
        tries = "-" if not attempt else (f"{attempt}/{retries + 1}" if retries else
                                         str(attempt))
        slot = f"gpu {job['devices']}" if job.get("devices") else (job.get("slot") or "-")
        rows.append((str(job["id"]), str(job.get("name"))[:24], str(job["state"]),
                     str(job.get("priority", 0)), slot, tries, _step(job),
                     _loss(job.get("loss")), duration(job.get("elapsed_s")),
                     duration(job.get("eta_s")), str(job.get("pid") or "-"),
                     _why(job)[:100]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [printable("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                      .rstrip()) for row in rows]


def show_summary(job: dict[str, Any], report: dict[str, Any] | None) -> list[str]:
    """``show`` for a person: the job, its state and outcome, each attempt with its run
    directory, the progress and where the report is."""
    lines = [f"job {job['id']}  {job.get('name')}  {job['state']}"]
    outcome = job.get("outcome")
    if outcome:
        lines.append(f"outcome    {outcome}" + (f" — {job['reason']}" if job.get("reason")
                                                else ""))
    elif job.get("reason"):
        lines.append(f"reason     {job['reason']}")
    if job.get("state") == "queued" and job.get("waiting"):
        lines.append(f"waiting    {job['waiting']}")
    lines.append(f"trainer    {job.get('trainer')}  priority {job.get('priority')}  "
                 f"gpus {job.get('gpus')}  retries {job.get('retries_used', 0)}/"
                 f"{job.get('retries', 0)}")
    progress = f"step       {_step(job)}  last loss {_loss(job.get('loss'))}"
    if job.get("elapsed_s") is not None:
        progress += f"  elapsed {duration(job.get('elapsed_s'))}"
    if job.get("eta_s") is not None:
        progress += f"  eta {duration(job.get('eta_s'))}"
    lines.append(progress)
    lines.append(f"cwd        {job.get('cwd')}")
    attempts = job.get("attempts") or []
    if attempts:
        lines.append("attempts")
    for a in attempts:
        end = a.get("outcome") or ("running" if a.get("ended") is None else "no outcome")
        took = duration((a["ended"] - a["started"]) if a.get("ended") is not None
                        and a.get("started") is not None else None)
        detail = a.get("end_reason") or a.get("why") or ""
        lines.append(f"  {a.get('n')}  {end:<14} {took:>7}  {a.get('run_dir')}")
        if detail:
            lines.append(f"     {detail[:200]}")
    if job.get("run_dir"):
        there = "" if report is not None else " (not written yet)"
        lines.append(f"report     {job['run_dir']}/report.json{there}")
    return [printable(line) for line in lines]


def _clock(record: dict[str, Any]) -> str:
    stamp = record.get("timestamp")
    if isinstance(stamp, str) and "T" in stamp:
        return stamp.split("T", 1)[1][:12].rstrip("Z")
    wall = record.get("wall_time")
    if isinstance(wall, int | float) and not isinstance(wall, bool):
        return time.strftime("%H:%M:%S", time.localtime(wall))
    t = record.get("t")
    if isinstance(t, int | float) and not isinstance(t, bool):
        return f"+{t:.3f}s"
    return "-"


def _value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    text = " ".join(text.split())
    return text if len(text) <= FIELD_WIDTH else text[:FIELD_WIDTH - 3] + "..."


def log_line(raw: bytes) -> str:
    """One JSON log or event record as ``time level event key=value ...``; a line that is
    not a JSON object is shown as it is."""
    text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):
        return printable(text)
    if not isinstance(record, dict):
        return printable(text)
    level = str(record.get("level") or ("event" if "kind" in record else "-"))
    name = str(record.get("event") or record.get("kind") or "-")
    fields = " ".join(f"{k}={_value(v)}" for k, v in record.items() if k not in _OWN)
    return printable(f"{_clock(record)}  {level:<7} {name:<22} {fields}".rstrip())


class LineFormatter:
    """Bytes of a streamed JSON-lines file in, readable lines out; a partial line waits
    for its end (bounded: a line longer than ``limit`` goes out as it is)."""

    def __init__(self, limit: int = 1 << 20) -> None:
        self.limit = limit
        self._rest = b""

    def feed(self, chunk: bytes) -> list[str]:
        data = self._rest + chunk
        *lines, self._rest = data.split(b"\n")
        out = [log_line(line) for line in lines if line.strip()]
        if len(self._rest) > self.limit:
            out.append(printable(self._rest.decode("utf-8", errors="replace")))
            self._rest = b""
        return out

    def close(self) -> list[str]:
        rest, self._rest = self._rest, b""
        return [log_line(rest)] if rest.strip() else []
