"""Finding runs and saying what they did, for people (short lines) and for programs (JSON).

``lorasup status``, ``report``, ``ls`` and the last line of ``lorasup start`` read runs
through here. A run is read as the report builder sees it: a finished run's report.json is
final, anything else (running, or ended without an outcome) is rebuilt from events.jsonl,
so the answer is live and matches what ``lorasup report`` would write.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lorasup.supervisor.plotfacts import format_duration
from lorasup.supervisor.report.read import load
from lorasup.supervisor.rundir import EVENTS_JSONL as EVENTS
from lorasup.supervisor.rundir import REPORT_JSON as REPORT

#: significant digits of floats in JSON answers (a loss of 0.123456789 is 0.123457)
JSON_DIGITS = 6
#: significant digits of a loss in a line for people
HUMAN_DIGITS = 4


class RunNotFound(LookupError):
    """No run by that name; the message is one line for the user."""


def is_run(path: Path) -> bool:
    return (path / EVENTS).is_file()


def find_run(ref: str | os.PathLike[str], logs_dir: Path) -> Path:
    """A run directory from a path or a run id (exact, or a unique prefix) under ``logs_dir``."""
    path = Path(ref)
    if is_run(path):
        return path.absolute()
    name = os.fspath(ref)
    if os.sep not in name:
        by_id = logs_dir / name
        if is_run(by_id):
            return by_id.absolute()
        if logs_dir.is_dir():
            matches = sorted(p for p in logs_dir.iterdir()
                             if p.name.startswith(name) and is_run(p))
            if len(matches) == 1:
                return matches[0].absolute()
            if len(matches) > 1:
                shown = ", ".join(p.name for p in matches[:3])
                more = ", ..." if len(matches) > 3 else ""
                raise RunNotFound(f"{name!r} matches {len(matches)} runs in {logs_dir}: "
                                  f"{shown}{more}")
    if path.is_dir():
        raise RunNotFound(f"no events.jsonl in {path}: not a run directory")
    raise RunNotFound(f"no run {name!r}: neither a run directory nor a run id in {logs_dir}/")


def _read_report(run_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((run_dir / REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_run(run_dir: Path) -> dict[str, Any]:
    """The run's report as it stands: final report.json, or rebuilt from events.jsonl."""
    written = _read_report(run_dir)
    if written is not None and written.get("outcome") is not None:
        return written
    builder = load(run_dir)  # streaming, bounded memory; a lost run is marked lost
    snapshot = builder.snapshot()
    # Model files are found on disk by the run itself; an older events.jsonl may not
    # name them, so keep what the last written report listed.
    artifacts = snapshot.get("artifacts")
    written_artifacts = (written or {}).get("artifacts")
    if (isinstance(artifacts, dict) and not artifacts.get("model_files")
            and isinstance(written_artifacts, dict) and written_artifacts.get("model_files")):
        artifacts["model_files"] = written_artifacts["model_files"]
    return snapshot


# ------------------------------------------------------------------------ reading values


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _epoch_seconds(value: Any) -> float | None:
    """A time as epoch seconds, from a number or an ISO 8601 string."""
    number = _number(value)
    if number is not None:
        return number
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    return None


def round_floats(value: Any, digits: int = JSON_DIGITS) -> Any:
    """The same JSON value with every finite float cut to ``digits`` significant digits."""
    if isinstance(value, float):
        if not math.isfinite(value) or value == 0.0:
            return value
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: round_floats(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [round_floats(v, digits) for v in value]
    return value


@dataclass(frozen=True)
class RunSummary:
    """What a person asks first about a run."""

    run_id: str | None
    run_dir: Path
    trainer: str | None
    status: str | None
    outcome: str | None
    reason: str | None
    exit_code: int | None
    step: int | None
    #: the last step the run asked for (a resumed run's steps continue its numbering)
    final_step: int | None
    loss: float | str | None
    #: "loss", or "avg_loss" when the trainer reported only its running average
    loss_basis: str | None
    started_at: float | None
    elapsed_s: float | None
    model_files: tuple[str, ...]
    report: Path | None

    @property
    def state(self) -> str:
        """The outcome when there is one, else the status (running)."""
        return self.outcome or self.status or "unknown"

    @classmethod
    def of(cls, run_dir: Path, data: dict[str, Any], now: float | None = None) -> RunSummary:
        steps = _dict(data.get("steps"))
        timing = _dict(data.get("timing"))
        loss = _dict(data.get("loss"))
        requested = steps.get("requested")
        resumed = steps.get("resumed_from") or 0
        final_step = resumed + requested if isinstance(requested, int) else None
        started = _epoch_seconds(timing.get("started_at"))
        elapsed = _number(timing.get("duration_s"))
        if data.get("outcome") is None and data.get("status") == "running" and started:
            elapsed = max(0.0, (now if now is not None else time.time()) - started)
        final = loss.get("final")
        files = _dict(data.get("artifacts")).get("model_files") or []
        return cls(
            run_id=data.get("run_id") or run_dir.name, run_dir=run_dir,
            trainer=data.get("trainer"), status=data.get("status"),
            outcome=data.get("outcome"), reason=data.get("reason"),
            exit_code=data.get("exit_code"),
            step=steps.get("last") if isinstance(steps.get("last"), int) else None,
            final_step=final_step,
            loss=final if isinstance(final, int | float | str) else None,
            loss_basis=loss.get("basis"), started_at=started, elapsed_s=elapsed,
            model_files=tuple(str(f) for f in files),
            report=run_dir / REPORT if (run_dir / REPORT).is_file() else None,
        )

    def to_json(self) -> dict[str, Any]:
        return round_floats({
            "run_id": self.run_id, "run_dir": str(self.run_dir), "trainer": self.trainer,
            "status": self.status, "outcome": self.outcome, "reason": self.reason,
            "exit_code": self.exit_code, "step": self.step, "final_step": self.final_step,
            "loss": self.loss, "loss_basis": self.loss_basis,
            "started_at": _iso(self.started_at), "elapsed_s": self.elapsed_s,
            "model_files": list(self.model_files),
            "report": str(self.report) if self.report else None,
        })


# ------------------------------------------------------------------------------ formats


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


def format_loss(value: float | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):  # "nan", "inf" as events.jsonl spells them
        return value
    return f"{value:.{HUMAN_DIGITS}g}"


def format_when(epoch: float | None) -> str:
    """Local time, minutes: when a person started the run."""
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M")


def format_steps(summary: RunSummary) -> str:
    last = "-" if summary.step is None else str(summary.step)
    return last if summary.final_step is None else f"{last}/{summary.final_step}"


def status_text(summary: RunSummary) -> str:
    """A few lines for a person: outcome, step k/N, last loss, elapsed, model files."""
    head = f"{summary.run_id}  {summary.trainer or '?'}  {summary.state}"
    if summary.reason:
        head += f": {summary.reason}"
    loss_name = "running average loss" if summary.loss_basis == "avg_loss" else "loss"
    lines = [head, f"  step {format_steps(summary)}   last {loss_name} "
                   f"{format_loss(summary.loss)}   elapsed {format_duration(summary.elapsed_s)}"]
    if summary.model_files:
        lines.append("  model files: " + ", ".join(summary.model_files))
    elif summary.outcome is not None:
        lines.append("  model files: none listed")
    lines.append(f"  run dir: {summary.run_dir}")
    return "\n".join(lines)


def end_line(summary: RunSummary) -> str:
    """The last line of ``lorasup start`` on a terminal: what happened and where it is."""
    parts = [f"lorasup: {summary.state}"]
    if summary.reason:
        parts[0] += f" ({summary.reason})"
    if summary.loss is not None:
        name = "final running average loss" if summary.loss_basis == "avg_loss" else "final loss"
        parts.append(f"{name} {format_loss(summary.loss)}")
    if summary.model_files:
        more = f" (+{len(summary.model_files) - 1} more)" if len(summary.model_files) > 1 else ""
        parts.append(f"model {summary.model_files[-1]}{more}")
    parts.append(f"report {summary.run_dir / REPORT}")
    return "; ".join(parts)


def list_runs(logs_dir: Path) -> list[RunSummary]:
    """Every run under ``logs_dir``, oldest first (newest last, next to the prompt)."""
    if not logs_dir.is_dir():
        return []
    runs: list[tuple[float, str, RunSummary]] = []
    for path in logs_dir.iterdir():
        if not is_run(path):
            continue
        try:
            summary = RunSummary.of(path.absolute(), load_run(path))
        except OSError:
            continue  # removed or unreadable while we looked: not a run to list
        when = summary.started_at
        if when is None:
            try:
                when = (path / EVENTS).stat().st_mtime
            except OSError:
                continue
        runs.append((when, path.name, summary))
    runs.sort(key=lambda item: (item[0], item[1]))
    return [summary for _, _, summary in runs]


def runs_table(runs: list[RunSummary]) -> str:
    """One row per run, aligned columns."""
    rows = [("RUN", "TRAINER", "OUTCOME", "STEPS", "FINAL LOSS", "STARTED")]
    rows += [(r.run_id or r.run_dir.name, r.trainer or "?", r.state, format_steps(r),
              format_loss(r.loss), format_when(r.started_at)) for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def status_json(summary: RunSummary, data: dict[str, Any]) -> dict[str, Any]:
    """``lorasup status --json``: the summary plus the report's steps and loss blocks."""
    return round_floats({
        "run_id": summary.run_id, "run_dir": str(summary.run_dir), "trainer": summary.trainer,
        "status": summary.status, "outcome": summary.outcome, "reason": summary.reason,
        "exit_code": summary.exit_code, "steps": data.get("steps"), "loss": data.get("loss"),
        "started_at": _iso(summary.started_at), "elapsed_s": summary.elapsed_s,
        "model_files": list(summary.model_files),
        "report": str(summary.report) if summary.report else None,
    })
