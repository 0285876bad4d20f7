"""A resumed run's report shows the whole history: the earlier run's curves, copied into
its own events.jsonl (bounded), the EMA going on from where it stopped."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lorasup.supervisor.history import MAX_POINTS, merge_history
from lorasup.supervisor.report import EMA_ALPHA, rebuild
from tests.support import run_lorasup

HELPER = Path(__file__).parent / "helpers" / "protocol_steps.py"


def _start(run_dir: Path, state: Path, steps: int, *extra: str):
    result = run_lorasup(run_dir, "--trainer", "native", "--steps", str(steps), "--",
                         sys.executable, str(HELPER), "--state", str(state), *extra)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.usefixtures("real_plot")
def test_continued_run_carries_the_earlier_curves_and_ema(tmp_path: Path) -> None:
    logs, state = tmp_path / "logs", tmp_path / "state"
    logs.mkdir()
    first = _start(logs / "a", state, 5).report
    second = _start(logs / "b", state, 4, "--continue").report
    history = second["series"]["history"]
    assert history["run_id"] == first["run_id"] and history["resumed_from"] == 5
    assert history["step"] == [1, 2, 3, 4, 5]
    assert history["loss"] == pytest.approx([2 / s for s in range(1, 6)])
    assert history["ema_loss"] == first["series"]["ema_loss"]
    assert second["series"]["step"] == [6, 7, 8, 9]
    # the EMA goes on: its first value is not the first loss of this run
    expected = EMA_ALPHA * (2 / 6) + (1 - EMA_ALPHA) * first["series"]["ema_loss"][-1]
    assert second["series"]["ema_loss"][0] == pytest.approx(expected)
    # a third run carries both earlier ones
    third = _start(logs / "c", state, 2, "--continue").report
    assert third["series"]["history"]["step"] == list(range(1, 10))
    # recorded in events.jsonl: the rebuilt report is the same
    kinds = [json.loads(x)["kind"] for x in (logs / "c" / "events.jsonl").read_text().split("\n")
             if x]
    assert kinds.count("history") == 1
    assert rebuild(logs / "c")["series"]["history"] == third["series"]["history"]
    assert (logs / "c" / "loss_curves.png").stat().st_size > 1000


def test_no_earlier_run_means_no_history(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("7")
    (tmp_path / "logs").mkdir()
    report = _start(tmp_path / "logs" / "x", state, 2, "--continue").report
    assert report["series"]["history"] is None
    assert report["series"]["ema_loss"][0] == pytest.approx(2 / 8)


def test_history_is_thinned_to_a_bound() -> None:
    n = 3 * MAX_POINTS
    report = {"series": {"step": list(range(MAX_POINTS + 1, n + 1)),
                         "loss": [1.0] * (n - MAX_POINTS),
                         "history": {"step": list(range(1, MAX_POINTS + 1)),
                                     "loss": ["nan"] * MAX_POINTS}}}
    merged = merge_history(report)
    assert merged is not None and len(merged["step"]) <= MAX_POINTS
    assert merged["step"][-1] == n and merged["step"] == sorted(merged["step"])
    assert merged["loss"][0] == "nan" and merged["ema_loss"] == [None] * len(merged["step"])
