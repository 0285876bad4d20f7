"""The report's ``epochs``: per-epoch means of the per-step loss, else the trainer's own."""

from __future__ import annotations

from typing import Any

from lorasup.supervisor.report.folded import Folded
from lorasup.supervisor.report.values import MAX_EPOCHS, merge_stats, spell
from lorasup.supervisor.summary import Sampled


class Epochs:
    """The epoch the trainer is in, and each epoch's announced total (bounded)."""

    def __init__(self) -> None:
        self.current: int | None = None
        self.totals: dict[int, int | None] = {}

    def start(self, epoch: int, total: int | None) -> None:
        self.current = epoch
        if epoch in self.totals or len(self.totals) < MAX_EPOCHS:
            self.totals[epoch] = total

    def one_epoch(self) -> bool:
        """A one-epoch run: steps with no epoch (`epoch 1/1` came late) are in epoch 1."""
        return (set(self.totals) == {1}
                and {v for v in self.totals.values() if v is not None} == {1})

    def table(self, summary: Folded, have_loss: bool, loss_src: str | None,
              epoch_loss: Sampled | None, epoch_tag: str, notes: list[str]
              ) -> list[dict[str, Any]]:
        """Per-epoch means from the per-step loss, else the trainer's own epoch average."""
        per_epoch = dict(summary.epochs)
        unassigned = per_epoch.pop(None, None)
        if unassigned is not None and self.one_epoch():
            entry = per_epoch.get(1)
            if entry is None:
                per_epoch[1] = unassigned
            else:  # merge: counts add up; the loss statistics are re-folded by weight
                merged = entry[1].copy()
                merge_stats(merged, unassigned[1])
                per_epoch[1] = [entry[0] + unassigned[0], merged]
            unassigned = None
        trainer_means: dict[int, float] = {}
        if epoch_loss is not None:
            trainer_means = dict(epoch_loss.items())
        known = sorted({*per_epoch, *self.totals, *trainer_means})[:MAX_EPOCHS]
        src = f"{epoch_tag} ({epoch_loss.source if epoch_loss else None})"
        entries = _entries(per_epoch, known, have_loss, loss_src, trainer_means, src,
                           unassigned, notes)
        # The last epoch is partial when it has fewer steps than the run's fullest epoch
        # (a stop mid-epoch, or --steps not a multiple of the epoch); null: nothing to compare.
        counts = [e["steps"] for e in entries[:-1] if e["steps"]]
        for entry in entries:
            entry["partial"] = False if counts else None
        if entries and counts and entries[-1]["steps"] is not None:
            entries[-1]["partial"] = entries[-1]["steps"] < max(counts)
        return entries


def _entries(per_epoch: dict[Any, list[Any]], known: list[int], have_loss: bool,
             loss_src: str | None, trainer_means: dict[int, float],
             trainer_src: str, unassigned: list[Any] | None, notes: list[str]
             ) -> list[dict[str, Any]]:
    if have_loss:
        if unassigned is not None and unassigned[0] and known:
            notes.append(f"{unassigned[0]} step(s) have no known epoch and are in no "
                         "per-epoch mean")
        return [{"epoch": e, "mean_loss": spell(per_epoch[e][1].mean) if e in per_epoch
                 else None, "steps": per_epoch[e][0] if e in per_epoch else 0,
                 "source": f"per-step loss ({loss_src})"} for e in known]
    if trainer_means:
        return [{"epoch": e, "mean_loss": spell(trainer_means[e]) if e in trainer_means
                 else None, "steps": per_epoch[e][0] if e in per_epoch else None,
                 "source": trainer_src} for e in known]
    if known:
        notes.append("per-epoch mean loss not available: the trainer reported no per-step "
                     "loss and no epoch average")
    return [{"epoch": e, "mean_loss": None,
             "steps": per_epoch[e][0] if e in per_epoch else None, "source": None}
            for e in known]
