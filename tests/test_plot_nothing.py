"""A run that recorded no step still leaves a PNG, one that says there was nothing to draw."""

from __future__ import annotations

from pathlib import Path

from lorasup.supervisor.plot import nothing_to_draw
from tests.support import run_lorasup


def test_a_run_without_steps_leaves_a_png_that_says_so(run_dir: Path) -> None:
    result = run_lorasup(run_dir, "--trainer", "command", "--steps", "1", "--", "true")
    assert result.returncode == 1, result.stderr[-2000:]
    report = result.report
    assert report["outcome"] == "trainer_failed" and report["steps"]["recorded"] == 0
    png = run_dir / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert nothing_to_draw(report)


def test_one_step_is_something_to_draw() -> None:
    assert nothing_to_draw({"series": {"step": []}, "epochs": []})
    assert not nothing_to_draw({"series": {"step": [1]}})
    assert not nothing_to_draw({"series": {"step": [], "val_loss": {"loss/val": {"step": [3]}}}})
    assert not nothing_to_draw({"series": {"step": []}, "epochs": [{"mean_loss": 0.5}]})
