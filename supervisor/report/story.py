"""The report's words: why a series is missing, what the running average does, the notes.

What is trainer-specific here (where a trainer writes a series its console leaves out,
which tag holds its epoch mean) is asked of its adapter (``AdapterBase.missing_hint``,
``scalar_tags``); the rest is said of any trainer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lorasup.supervisor.report.folded import Folded
from lorasup.supervisor.report.values import (
    MAX_EPOCHS,
    MAX_LR_TAGS,
    MAX_SPARSE_TAGS,
    SERIES_LABELS,
    WINDOW,
)

if TYPE_CHECKING:
    from lorasup.supervisor.report.builder import ReportBuilder
    from lorasup.trainers.base import AdapterBase


def avg_resets(summary: Folded, have_avg: bool, have_loss: bool) -> dict[str, Any]:
    """Whether the trainer's running average restarts at each epoch, from the data."""
    restarts, carries = summary.avg_restarts, summary.avg_carries
    checked = restarts + carries
    if not have_avg:
        return {"each_epoch": None, "boundaries_checked": 0,
                "explanation": "no running average was reported"}
    if not checked:
        why = ("no epoch boundary was seen" if have_loss else
               "needs the per-step loss at an epoch boundary to tell")
        return {"each_epoch": None, "boundaries_checked": 0, "explanation": why}
    each = restarts == checked
    return {"each_epoch": each, "boundaries_checked": checked,
            "explanation": "at the first step of every new epoch it equals that step's "
                           "loss: a per-epoch average" if each else
                           f"it goes on across {carries} of {checked} epoch boundaries"}


def missing(series: dict[str, Any], sources: dict[str, str | None], tags: list[str],
            basis: str | None, trainer: str | None, adapter: AdapterBase,
            argv: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    """Every series that is null (or null at every step), each with the reason."""
    who = trainer or "the trainer"
    no_steps = not series["step"]
    names: list[str] = []
    why: dict[str, str] = {}
    for name in ("loss", "avg_loss", "lr"):
        if sources[name] is None:
            names.append(name)
            why[name] = why_missing(name, who, adapter, argv, tags, no_steps)
    for tag in tags:
        if all(v is None for v in series["lr_by_tag"].get(tag) or ()):
            names.append(tag)
            why[tag] = "no step was recorded" if no_steps else "no value in the sampled steps"
    if basis is None:
        names.append("ema_loss")
        why["ema_loss"] = ("no step was recorded" if no_steps else
                           "no loss to smooth: neither a per-step loss nor the trainer's "
                           "running average was reported")
    if sources["s_per_step"] is None:
        names.append("s_per_step")
        why["s_per_step"] = ("no step was recorded" if no_steps else
                             "steps came in fewer than two reads of the trainer's output "
                             "after the first (which includes its start-up)")
    if all(e is None for e in series["epoch"]):
        names.append("epoch")
        why["epoch"] = "no step was recorded" if no_steps else f"{who} reported no epoch"
    if series["epoch_loss"] is None:
        names.append("epoch_loss")
        known = [tag for tag, kind in adapter.scalar_tags.items() if kind == "epoch_loss"]
        where = (f"its {known[0]}, written at the end of each epoch" if known
                 else "a per-epoch mean in its TensorBoard files")
        why["epoch_loss"] = (f"{who} reported no per-epoch average ({where}); per-epoch "
                             "means are in `epochs`")
    return names, why


def why_missing(name: str, who: str, adapter: AdapterBase, argv: Sequence[str] | None,
                tags: list[str] | None = None, no_steps: bool = False) -> str:
    if name == "lr" and tags:
        return (f"{who} reports its learning rate per parameter group: see "
                f"series.lr_by_tag ({', '.join(tags[:4])})")
    if no_steps:
        return "no step was recorded"
    hint = adapter.missing_hint(name, argv)
    if hint:
        return hint
    return f"{who} reported no {SERIES_LABELS[name]} (console or TensorBoard)"


def notes_of(b: ReportBuilder, summary: Folded, lo: int, hi: int | None) -> list[str]:
    """The notes of the report: what was left out or could not be read, and why."""
    out = list(b.ledger.notes)
    if summary.outside:
        out.append(f"{summary.outside} step(s) outside the requested range "
                   f"{lo + 1}..{hi if hi is not None else ''} were reported and left out")
    if b.late_values:
        out.append(f"{b.late_values} value(s) arrived for steps more than {WINDOW} "
                   "steps back, already summarised: they are in events.jsonl only")
    return out


def bounds_notes(b: ReportBuilder, summary: Folded, late_csv_tags: int) -> list[str]:
    """Notes on the bounds that kept the report flat, and on unreadable records."""
    out = []
    if b.sparse.dropped_count:
        out.append(f"{b.sparse.dropped_count} scalar tag(s) beyond {MAX_SPARSE_TAGS} "
                   f"per kind ({MAX_LR_TAGS} for lr/*) were not kept")
    if late_csv_tags:
        out.append(f"losses.csv has no column for {late_csv_tags} lr tag(s) "
                   "that appeared after its header was written")
    if b.bad_records:
        out.append(f"{b.bad_records} event record(s) could not be interpreted")
    if b.problems.dropped:
        out.append(f"{b.problems.dropped} further problem line(s) not listed")
    if b.problems.signals_dropped:
        out.append(f"{b.problems.signals_dropped} further signal(s) not listed")
    if b.ledger.checkpoints_dropped:
        out.append(f"{b.ledger.checkpoints_dropped} further checkpoint(s) not listed")
    if summary.epochs_dropped:
        out.append(f"{summary.epochs_dropped} step(s) in epochs beyond the first "
                   f"{MAX_EPOCHS} are in no per-epoch mean")
    if b.ledger.notes_dropped:
        out.append(f"{b.ledger.notes_dropped} further note(s) not kept")
    out.extend(f"the trainer printed its completion marker {m!r}" for m in b.ledger.markers)
    return out
