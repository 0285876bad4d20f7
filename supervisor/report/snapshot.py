"""The report as it stands: the builder's parts put together into report.json's object."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorasup.supervisor.report.series import buckets, every_step, first_step
from lorasup.supervisor.report.story import avg_resets, bounds_notes, missing, notes_of
from lorasup.supervisor.report.values import BUCKETS, EMA_ALPHA, SCHEMA, iso, spell
from lorasup.supervisor.summary import Stats

if TYPE_CHECKING:
    from lorasup.supervisor.report.builder import ReportBuilder


def snapshot(b: ReportBuilder) -> dict[str, Any]:
    """The report now: JSON-serialisable, its size bounded; the builder is not changed."""
    window = b.window
    summary, rows = window.snapshot_fold()
    pace_points = summary.close()
    lo, hi = b.range()
    notes = notes_of(b, summary, lo, hi)
    src = {p: ("tensorboard+console" if tb and c else "tensorboard" if tb
               else "console" if c else None) for p, (tb, c) in summary.sources.items()}
    loss_src, avg_src, lr_src = src["loss"], src["avg"], src["lr"]
    stats = summary.stats
    if stats["loss"].count:
        basis, basis_src = "loss", loss_src
    elif stats["avg_loss"].count:
        basis, basis_src = "avg_loss", avg_src
        notes.append("loss statistics and the EMA are computed from the trainer's running "
                     "average (avg_loss): it reported no per-step loss")
    else:
        basis, basis_src = None, None
    tags = sorted(t for t in summary.tag_present) if not rows else sorted(
        set(summary.tag_present) | set(window.tags))
    one_epoch = b.epochs.one_epoch()
    if not window.folded and summary.rows <= BUCKETS:
        series = every_step(rows, basis, tags, pace_points, one_epoch)
    else:
        series = buckets(summary, basis, tags, one_epoch)
    sources: dict[str, str | None] = {"loss": loss_src, "avg_loss": avg_src, "lr": lr_src}
    sources.update({tag: window.tag_sources.get(tag) for tag in tags})
    sources["ema_loss"] = "lorasup" if basis else None
    sources["s_per_step"] = "lorasup" if summary.pace.n else None
    notes.extend(bounds_notes(b, summary, len(b.csv.late_tags)))

    sparse = b.sparse
    epochs = b.epochs.table(summary, basis == "loss", loss_src, sparse.epoch_loss,
                            sparse.epoch_tag, notes)
    steps_per_s = None
    first, last = summary.first_timed, summary.last_timed
    if first and last and last[1] > first[1] and last[0] > first[0]:
        steps_per_s = (last[0] - first[0]) / (last[1] - first[1])
    loss_stats = stats[basis] if basis else Stats()
    last_at = (b.started_at + b.last_t
               if b.started_at is not None and b.last_t is not None else None)
    series["ema"] = {"alpha": EMA_ALPHA, "basis": basis}
    series.update(sparse.as_json())
    series.update({
        "sources": sources,
        "history": dict(b.ledger.history) if b.ledger.history is not None else None,
        "avg_loss_resets": avg_resets(summary, src["avg"] is not None,
                                            src["loss"] is not None),
    })
    series["missing"], series["explanation"] = missing(
        series, sources, tags, basis, b.trainer, b.adapter, b.argv)
    return {
        "schema": SCHEMA,
        "run_id": b.run_id,
        "trainer": b.trainer,
        "command": b.argv,
        "status": ("running" if b.outcome is None
                   else "lost" if b.outcome == "lost" else "finished"),
        "outcome": b.outcome,
        "reason": b.reason,
        "exit_code": b.exit_code,
        "trainer_returncode": b.outcome_returncode if b.outcome_returncode is not None
        else b.exited_returncode,
        "signals_sent": [dict(s) for s in b.problems.signals],
        "steps": {
            "requested": b.steps_requested,
            "resumed_from": b.resumed_from,
            "first": first_step(summary),
            "last": summary.buckets.step[max(summary.buckets.used(), default=0)]
            if summary.rows else None,
            "recorded": summary.rows,
            "rejected_over_max": b.rejected,
        },
        "loss": {
            "basis": basis,
            "source": basis_src,
            "count": loss_stats.count,
            "nonfinite": loss_stats.nonfinite,
            "first": spell(loss_stats.first),
            "final": spell(loss_stats.final),
            "min": loss_stats.min,
            "min_step": loss_stats.min_step,
            "max": loss_stats.max,
            "max_step": loss_stats.max_step,
            "mean": spell(loss_stats.mean),
            "std": spell(loss_stats.std),
        },
        "epochs": epochs,
        "timing": {
            "started_at": b.started_at,
            "started_at_iso": iso(b.started_at),
            "last_event_at": last_at,
            "last_event_at_iso": iso(last_at),
            "duration_s": b.last_t,
            "first_step_s": summary.min_t,
            "median_s_per_step": summary.pace.median(),
            "steps_per_s": steps_per_s,
            **b.phases.as_json(),
        },
        "problems": b.problems.as_list(),
        "stacks": [dict(c) for c in b.ledger.stacks],
        "series": series,
        "artifacts": b.ledger.artifacts(),
        "notes": notes,
    }
