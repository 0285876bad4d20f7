"""Every real kohya recording replayed as a real child process through lorasup.

Expected values come from the recordings' README table (last step, return code) and
from reading the bars by eye (the per-step avr_loss of normal_unbuffered).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lorasup.trainers.kohya import KohyaAdapter, parse_bar
from tests.support import KOHYA_RECORDINGS, REPLAY, run_lorasup

SPEED = "100"

# name: (steps N from its argv, last step printed, trainer return code, outcome)
EXPECTED = {
    "normal": (12, 12, 0, "completed"),
    "normal_unbuffered": (12, 12, 0, "completed"),
    "accelerate_normal": (12, 12, 0, "completed"),
    "save_every": (12, 12, 0, "completed"),
    "save_every_unbuffered": (12, 12, 0, "completed"),
    "cache_latents_unbuffered": (12, 12, 0, "completed"),
    "console_log_simple_unbuffered": (12, 12, 0, "completed"),
    "sigint_ignored": (40, 40, 0, "completed"),
    "sigint": (40, 9, -2, "trainer_failed"),
    "sigint_unbuffered": (40, 14, -2, "trainer_failed"),
    "sigterm": (40, 7, -15, "trainer_failed"),
    "sigterm_unbuffered": (40, 13, -15, "trainer_failed"),
    "sigint_during_load": (12, None, -2, "trainer_failed"),
    "accelerate_sigint": (12, 7, -2, "trainer_failed"),
    "accelerate_sigterm": (12, 6, -15, "trainer_failed"),
    "workers_sigint": (12, 5, -2, "trainer_failed"),
    "bad_dataset_empty": (12, None, 0, "trainer_failed"),
    "bad_dataset_missing": (12, None, 0, "trainer_failed"),
    "bad_model": (12, None, 1, "trainer_failed"),
}

NORMAL_UNBUFFERED_AVR = [1.18, 1.16, 1.16, 1.15, 1.14, 1.1, 1.09, 1.08, 1.07, 1.09, 1.08, 1.08]


def recorded_argv(name: str) -> list[str]:
    with (KOHYA_RECORDINGS / f"{name}.jsonl").open(encoding="utf-8") as fh:
        return json.loads(fh.readline())["argv"]


def test_every_recording_is_covered() -> None:
    assert {p.stem for p in KOHYA_RECORDINGS.glob("*.jsonl")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_replayed_recording(tmp_path: Path, name: str) -> None:
    steps, last, returncode, outcome = EXPECTED[name]
    run_dir = tmp_path / "run"
    # No --steps: lorasup takes N from the recorded --max_train_steps, as a user would pass it.
    argv = [a for a in recorded_argv(name) if a.startswith("--max_train_steps")]
    result = run_lorasup(run_dir, "--trainer", "kohya", "--grace", "2", "--",
                         sys.executable, str(REPLAY), str(KOHYA_RECORDINGS / f"{name}.jsonl"),
                         "--speed", SPEED, *argv)
    report = result.report
    assert report["outcome"] == outcome, result.stderr[-1500:]
    assert report["trainer_returncode"] == returncode
    assert report["steps"]["requested"] == steps
    assert report["steps"]["last"] == last
    assert report["signals_sent"] == []
    series = report["series"]
    if last is not None:
        assert series["step"] == list(range(1, last + 1))
        assert all(v is not None for v in series["avg_loss"])
        assert series["loss"] == [None] * last  # kohya's console never shows it
    if name == "normal_unbuffered":
        assert series["avg_loss"] == NORMAL_UNBUFFERED_AVR
    problems = {p["problem"] for p in report["problems"]}
    if name.startswith("bad_dataset"):
        assert "no_data" in problems
    if name == "bad_model":
        assert "exception" in problems


def test_overshooting_replay_is_stopped_right_after_n(tmp_path: Path) -> None:
    """A real bar stream running past N: SIGINT at once, steps 1..N recorded, N+1 rejected."""
    run_dir = tmp_path / "run"
    result = run_lorasup(run_dir, "--trainer", "kohya", "--steps", "5", "--grace", "3", "--",
                         sys.executable, str(REPLAY), str(KOHYA_RECORDINGS / "sigint.jsonl"),
                         "--speed", "20", "--stop-at-signal")
    report = result.report
    assert report["outcome"] == "completed"
    assert report["exit_code"] == 0
    assert report["series"]["step"] == [1, 2, 3, 4, 5]
    assert report["steps"]["rejected_over_max"] >= 1
    assert report["signals_sent"][0]["signal"] == "SIGINT"


def test_bar_parser_ignores_other_bars() -> None:
    for line in ["read caption: 100%|██████████| 4/4 [00:00<00:00, 14290.64it/s]",
                 "Loading pipeline components...:  50%|█████     | 2/4 [00:00<00:00, 10.42it/s]",
                 "100%|██████████| 4/4 [00:00<00:00, 79137.81it/s]"]:
        assert parse_bar(line) is None
        assert not [e for e in KohyaAdapter().parse(line) if e.kind == "step"]


def test_bar_parser_reads_padded_loss_and_glued_records() -> None:
    bar = "steps:  50%|█████     | 6/12 [00:09<00:09,  1.50s/it, avr_loss=1.1] "
    step, _rest = parse_bar(bar)
    assert (step.step, step.total, step.avg_loss) == (6, 12, 1.1)
    glued = bar + "2026-11-27 21:45:12 INFO     model saved.     train_network.py:1729"
    kinds = [e.kind for e in KohyaAdapter().parse(glued)]
    assert kinds == ["step", "finished"]
    nan = "steps:  50%|█████     | 6/12 [00:09<00:09,  1.50s/it, avr_loss=nan]"
    assert parse_bar(nan)[0].avg_loss != parse_bar(nan)[0].avg_loss  # NaN


def test_max_train_epochs_is_removed_and_steps_injected() -> None:
    from lorasup.trainers.base import TrainerJob

    job = TrainerJob(steps=7, argv=("python", "train_network.py", "--max_train_epochs", "3",
                                    "--max_train_steps=100"), run_dir="")
    assert KohyaAdapter().command(job) == ["python", "train_network.py", "--max_train_steps=7"]


def test_logging_dir_is_injected_unless_the_user_gave_one() -> None:
    from lorasup.trainers.base import TrainerJob

    ours = TrainerJob(steps=3, argv=("python", "t.py"), run_dir="/runs/r1")
    assert KohyaAdapter().command(ours)[-1] == "--logging_dir=/runs/r1/tensorboard"
    theirs = TrainerJob(steps=3, argv=("python", "t.py", "--logging_dir", "logs"), run_dir="/r")
    assert KohyaAdapter().command(theirs).count("logs") == 1
    assert KohyaAdapter().tensorboard_dir(theirs) == "logs"
