"""The real diffusers recordings replayed as real child processes through lorasup."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lorasup.trainers.base import TrainerJob
from lorasup.trainers.diffusers import DiffusersAdapter, parse_bar
from tests.support import HERE, REPLAY, run_lorasup

RECORDINGS = HERE / "data" / "diffusers"

# The per-step loss as the bar's second frame of each step shows it (read by eye).
NORMAL_STEP_LOSS = [1.13, 1.16, 1.12, 1.12, 1.17, 1.14, 1.13, 1.13, 1.1, 1.12]


def replay(tmp_path: Path, name: str, *lorasup_args: str, replay_args: tuple[str, ...] = ()):
    with (RECORDINGS / f"{name}.jsonl").open(encoding="utf-8") as fh:
        argv = json.loads(fh.readline())["argv"]
    steps = [a for a in argv if a.startswith("--max_train_steps")]
    return run_lorasup(tmp_path / "run", "--trainer", "diffusers", "--grace", "2", *lorasup_args,
                       "--", sys.executable, str(REPLAY), str(RECORDINGS / f"{name}.jsonl"),
                       "--speed", "20", *replay_args, *steps)


def test_normal_run_completes_with_per_step_loss_and_lr(tmp_path: Path) -> None:
    result = replay(tmp_path, "diffusers_normal")
    report = result.report
    assert report["outcome"] == "completed", result.stderr[-1500:]
    assert report["series"]["step"] == list(range(1, 11))
    assert report["series"]["loss"] == NORMAL_STEP_LOSS
    assert set(report["series"]["lr"]) == {0.0001}
    assert "loss" not in report["series"]["missing"]
    # Finished marker: the final weights line (not a checkpoint-N one).
    kinds = [e["kind"] for e in result.events()]
    assert kinds.count("finished") == 1
    assert kinds.count("checkpoint") == 3


def test_sigterm_recording_is_a_failed_run(tmp_path: Path) -> None:
    report = replay(tmp_path, "diffusers_sigterm").report
    assert report["outcome"] == "trainer_failed"
    assert report["trainer_returncode"] == -15
    assert report["steps"]["last"] == 5


def test_bar_parser_reads_loss_and_lr_and_ignores_other_bars() -> None:
    step, rest = parse_bar("Steps:  20%|██        | 2/10 [00:01<00:06,  1.23it/s, lr=0.0001, "
                           "step_loss=1.16]11/27/2026 21:12:14 - INFO - x")
    assert (step.step, step.total, step.loss, step.lr) == (2, 10, 1.16, 0.0001)
    assert rest.startswith("11/27")
    assert parse_bar("steps:  20%|██        | 2/10 [00:01<00:06,  1.23it/s]") is None
    first = parse_bar("Steps:  10%|█         | 1/10 [00:01<00:06,  1.23it/s]")[0]
    assert first.loss is None


@pytest.mark.parametrize(("argv", "options", "expected"), [
    (("python", "t.py", "--output_dir=out"), (), "out/logs"),
    (("python", "t.py", "--output_dir=out", "--logging_dir=tb"), (), "out/tb"),
    (("python", "t.py", "--output_dir=out", "--report_to=wandb"), (), None),
    (("python", "t.py", "--output_dir=out", "--report_to=wandb"), (("tensorboard", "1"),),
     "/runs/r/tensorboard"),
])
def test_tensorboard_dir(argv, options, expected) -> None:
    job = TrainerJob(steps=5, argv=argv, run_dir="/runs/r", options=options)
    assert DiffusersAdapter().tensorboard_dir(job) == expected
    command = DiffusersAdapter().command(job)
    assert "--max_train_steps=5" in command
    if options:
        assert "--report_to=tensorboard" in command
        assert "--logging_dir=/runs/r/tensorboard" in command



def test_event_files_give_the_full_precision_loss(tmp_path: Path) -> None:
    from lorasup.supervisor.tensorboard import EventFileReader, find_event_files

    recorded = HERE / "data" / "tensorboard" / "diffusers" / "diffusers_normal"
    expected = {r.step: r.value for path in find_event_files(recorded)
                for r in EventFileReader(path).read_new() if r.tag == "train_loss"}
    assert sorted(expected) == list(range(1, 11))
    # --tensorboard: lorasup points the script's --logging_dir into the run dir, and the
    # replay writes the recorded event files there, step by step as the real run did.
    result = replay(tmp_path, "diffusers_normal", "--tensorboard",
                    replay_args=("--tensorboard", str(recorded)))
    report = result.report
    assert f"--logging_dir={tmp_path / 'run' / 'tensorboard'}" in report["command"]
    assert report["outcome"] == "completed"
    assert report["series"]["loss"] == [expected[s] for s in range(1, 11)]
    assert report["series"]["sources"]["loss"] == "tensorboard"
