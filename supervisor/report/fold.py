"""Events into the report: one handler per record kind of ``events.jsonl``.

Each handler takes the builder, the record (a JSON object, possibly damaged) and its
time, and changes the builder's state in O(1). A malformed field is ignored or counted in
``bad_records``; the builder catches anything a handler raises.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from lorasup.supervisor.events import read_number
from lorasup.supervisor.report.values import (
    BUCKETS_LIMIT,
    MAX_LR_TAGS,
    MAX_STEP,
    merge_source,
    to_int,
    to_step,
    to_time,
)

if TYPE_CHECKING:
    from lorasup.supervisor.report.builder import ReportBuilder

Handler = Callable[["ReportBuilder", dict[str, Any], "float | None"], None]


def classify_tag(tag: str, tags: Mapping[str, str] | None = None) -> str:
    """Which series a scalar tag feeds: loss, avg_loss, epoch_loss, lr, lr_tag, val_loss, other.

    ``tags`` is the trainer's declaration (``AdapterBase.scalar_tags``); None: every known
    trainer's."""
    if tags is None:
        from lorasup.trainers import scalar_tags

        tags = scalar_tags(None)
    kind = tags.get(tag)
    if kind is not None:
        return kind
    if tag.startswith("lr/"):
        return "lr_tag"
    lowered = tag.lower()
    if "val" in lowered and "loss" in lowered:
        return "val_loss"
    return "other"


def started(b: ReportBuilder, r: dict[str, Any], t: float | None) -> None:
    if isinstance(r.get("run_id"), str):
        b.run_id = r["run_id"]
    if isinstance(r.get("trainer"), str):
        b.set_trainer(r["trainer"])
    argv = r.get("argv")
    if isinstance(argv, list):
        b.argv = [str(a) for a in argv[:10_000]]
    b.pid = to_int(r.get("pid"))
    requested = to_step(r.get("steps_requested"))
    if requested is not None:
        b.steps_requested = requested
    b.started_at = to_time(r.get("wall_time"))
    b.phases.started_t = t
    #: who supervises the run (pid, start time, boot id): tells a lost run apart
    b.started_record = {k: r.get(k) for k in ("supervisor_pid", "supervisor_start", "boot_id")}


def resumed(b: ReportBuilder, r: dict[str, Any], t: float | None) -> None:
    step = to_step(r.get("step"))
    if step is not None:
        b.resumed_from = step


def step(b: ReportBuilder, r: dict[str, Any], t: float | None) -> None:
    number = to_step(r.get("step"))
    if number is None:
        b.bad_records += 1
        return
    b.add_step(t, number, read_number(r.get("loss")), read_number(r.get("avg_loss")),
               read_number(r.get("lr")), to_int(r.get("epoch")))


def scalar(b: ReportBuilder, r: dict[str, Any], t: float | None) -> None:
    tag, number, value = r.get("tag"), to_int(r.get("step")), read_number(r.get("value"))
    if not isinstance(tag, str) or number is None or value is None:
        b.bad_records += 1
        return
    tag = tag[:200]
    source = r.get("source") if isinstance(r.get("source"), str) else "console"
    source = source[:40]
    kind = classify_tag(tag, b.scalar_tags)
    if kind not in ("loss", "avg_loss", "lr", "lr_tag"):
        b.sparse.add(kind, tag, number, value, source)
        return
    if not 0 <= number < MAX_STEP:
        b.bad_records += 1
        return
    window = b.window
    if kind == "lr_tag" and tag not in window.tags:
        if len(window.tags) >= MAX_LR_TAGS:
            b.sparse.drop(tag)
            return
        window.add_tag(tag)
    row = window.row(number)
    if row < 0:
        b.late_values += 1
        return
    if kind == "lr_tag":
        window.tags[tag][row] = value
        window.tag_sources[tag] = merge_source(window.tag_sources.get(tag), source) or ""
        return
    prefix = {"loss": "loss", "avg_loss": "avg", "lr": "lr"}[kind]
    window.cols[f"{prefix}_tb" if source == "tensorboard" else f"{prefix}_c"][row] = value


def epoch(b: ReportBuilder, r: dict[str, Any], t: float | None) -> None:
    number = to_int(r.get("epoch"))
    if number is not None:
        b.epochs.start(number, to_int(r.get("total")))


def checkpoint(b: ReportBuilder, r: dict[str, Any], t: float | None) -> None:
    if isinstance(r.get("path"), str):
        b.ledger.checkpoint(r["path"])


def artifacts(b: ReportBuilder, r: dict[str, Any], t: float | None) -> None:
    b.artifacts_recorded = True
    b.ledger.found_files(r)


def history(b: ReportBuilder, r: dict[str, Any], t: float | None) -> None:
    steps = r.get("step")
    if not isinstance(steps, list) or not steps or len(steps) > BUCKETS_LIMIT:
        return
    n = len(steps)
    if not all(to_step(s) is not None for s in steps):
        b.bad_records += 1
        return
    block: dict[str, Any] = {"run_id": str(r.get("run_id", ""))[:200],
                             "resumed_from": to_step(r.get("resumed_from")), "step": steps}
    for name in ("loss", "avg_loss", "ema_loss", "lr"):
        values = r.get(name)
        ok = isinstance(values, list) and len(values) == n
        block[name] = ([v if v is None or (isinstance(v, int | float | str) and not
                        isinstance(v, bool)) else None for v in values] if ok else [None] * n)
    b.ledger.history = block
    basis, last = r.get("ema_basis"), read_number(r.get("ema_last"))
    if basis in ("loss", "avg_loss") and last is not None and math.isfinite(last) \
            and not b.window.folded:
        # the EMA goes on from where the earlier run left it
        b.window.summary.ema[basis] = last


def finished(b: ReportBuilder, r: dict[str, Any], t: float | None) -> None:
    if isinstance(r.get("marker"), str):
        b.ledger.marker(r["marker"])


def problem(b: ReportBuilder, r: dict[str, Any], t: float | None) -> None:
    b.problems.judge(str(r.get("problem", ""))[:200], str(r.get("line", ""))[:1000], t)


def rejected(b: ReportBuilder, r: dict[str, Any], t: float | None) -> None:
    b.rejected += 1


def signal(b: ReportBuilder, r: dict[str, Any], t: float | None) -> None:
    b.problems.on_signal(r, t)


def exited(b: ReportBuilder, r: dict[str, Any], t: float | None) -> None:
    b.exited_returncode = to_int(r.get("returncode"))
    b.phases.exited_t = t


def stacks(b: ReportBuilder, r: dict[str, Any], t: float | None) -> None:
    b.ledger.capture(r, t)


def note(b: ReportBuilder, r: dict[str, Any], t: float | None) -> None:
    if "message" in r:
        b.add_note(str(r["message"]))


def outcome(b: ReportBuilder, r: dict[str, Any], t: float | None) -> None:
    if isinstance(r.get("outcome"), str):
        b.outcome = r["outcome"][:100]
    b.exit_code = to_int(r.get("exit_code"))
    b.reason = str(r["reason"])[:2000] if "reason" in r else None
    b.outcome_returncode = to_int(r.get("trainer_returncode"))


HANDLERS: dict[str, Handler] = {
    "started": started,
    "resumed": resumed,
    "step": step,
    "scalar": scalar,
    "epoch": epoch,
    "checkpoint": checkpoint,
    "finished": finished,
    "problem": problem,
    "rejected": rejected,
    "signal": signal,
    "exited": exited,
    "stacks": stacks,
    "note": note,
    "artifacts": artifacts,
    "history": history,
    "outcome": outcome,
}
