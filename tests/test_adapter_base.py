"""AdapterBase: what the engine asks of a trainer, declared once by its adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorasup.supervisor.events import Exited, Outcome, Problem, SignalSent, Started, Step
from lorasup.supervisor.report import ReportBuilder, rebuild
from lorasup.trainers import REGISTRY, get_adapter, recorded_adapter, scalar_tags
from lorasup.trainers.base import SERIES_KINDS, AdapterBase, TrainerJob, UsageError


def test_every_adapter_subclasses_the_base_and_declares_known_series() -> None:
    for name in REGISTRY:
        adapter = get_adapter(name)
        assert isinstance(adapter, AdapterBase) and adapter.name == name
        assert set(adapter.scalar_tags.values()) <= SERIES_KINDS, name
        assert set(adapter.missing_hints) <= {"loss", "avg_loss", "lr"}, name
    # a name lorasup does not know (a damaged events.jsonl): the base's defaults
    assert type(recorded_adapter("no-such-trainer")) is AdapterBase
    assert type(recorded_adapter(None)) is AdapterBase


def test_the_expected_exit_rule() -> None:
    rule = AdapterBase().expected_exit
    assert rule("traceback", "Traceback (most recent call last):") is None  # wait for its end
    assert rule("exception", "KeyboardInterrupt") is True
    assert rule("exception", "RuntimeError: CUDA error") is False
    assert rule("cuda_out_of_memory", "CUDA out of memory") is False


def test_argv_for_injects_steps_and_resume(tmp_path: Path) -> None:
    job = TrainerJob(steps=10, argv=("train_network.py", "--max_train_steps=99", "--resume=x"),
                     run_dir=str(tmp_path))
    kohya = get_adapter("kohya")
    argv = kohya.argv_for(job, steps=5, resume="out/at-state")
    assert "--max_train_steps=5" in argv and "--max_train_steps=99" not in argv
    assert argv.count("--resume=out/at-state") == 1 and "--resume=x" not in argv
    assert kohya.argv_for(job) == kohya.command(job)  # no resume: the command as it was
    hf = get_adapter("hf").argv_for(
        TrainerJob(steps=3, argv=("train.py", "--resume_from_checkpoint", "old"), run_dir=""),
        resume="out/checkpoint-2")
    at = hf.index("--resume_from_checkpoint")
    assert hf[at + 1] == "out/checkpoint-2" and "old" not in hf and "--max_steps=3" in hf
    builtin = get_adapter("builtin").argv_for(
        TrainerJob(steps=4, argv=("--new",), run_dir=""), resume="lora_output")
    assert "--continue" in builtin and "--new" not in builtin
    with pytest.raises(UsageError, match="cannot resume"):
        get_adapter("command").argv_for(TrainerJob(steps=1, argv=("x",), run_dir=""),
                                        resume="somewhere")


def test_scalar_tags_are_the_adapters() -> None:
    assert scalar_tags("kohya")["loss/average"] == "avg_loss"
    assert scalar_tags("hf")["train/learning_rate"] == "lr"
    # a program run as --trainer command may be any trainer: every known tag counts
    assert scalar_tags("command")["loss/epoch_average"] == "epoch_loss"


def _events(run_dir: Path, trainer: str) -> None:
    timed = [(0.0, Started(run_id="r", trainer=trainer, argv=("x",), pid=1, steps_requested=2,
                           wall_time=1.7e9)),
             (1.0, Step(step=1, avg_loss=1.0)), (2.0, Step(step=2, avg_loss=0.9)),
             (2.5, SignalSent(signal="SIGINT", reason="step_limit", pids=(1,))),
             (2.6, Problem(problem="traceback", line="Traceback (most recent call last):")),
             (2.6, Problem(problem="exception", line="KeyboardInterrupt")),
             (3.0, Exited(returncode=130)),
             (3.0, Outcome(outcome="completed", exit_code=0, reason="stopped at step 2"))]
    (run_dir / "events.jsonl").write_text("".join(e.to_json(t) + "\n" for t, e in timed))


def test_a_report_rebuilt_from_disk_asks_the_recorded_trainers_adapter(tmp_path: Path) -> None:
    _events(tmp_path, "kohya")
    report = rebuild(tmp_path)
    assert "TensorBoard files" in report["series"]["explanation"]["loss"]  # kohya's hint
    assert "loss/epoch_average" in report["series"]["explanation"]["epoch_loss"]
    # the stop's traceback is expected: the adapter's rule, in the report as in the log
    assert all(p.get("expected") for p in report["problems"]) and report["problems"]
    other = tmp_path / "other"
    other.mkdir()
    _events(other, "no-such-trainer")
    generic = rebuild(other)["series"]["explanation"]
    assert generic["loss"] == "no-such-trainer reported no per-step loss (console or TensorBoard)"
    builder = ReportBuilder()
    for line in (other / "events.jsonl").read_text().splitlines():
        builder.add(json.loads(line))
    assert builder.snapshot()["series"]["explanation"] == generic
