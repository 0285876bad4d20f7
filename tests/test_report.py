"""The report as a pure function of events.jsonl: merging, sources, statistics, files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest

from lorasup.supervisor.events import (
    Checkpoint,
    Epoch,
    Event,
    Exited,
    Outcome,
    Problem,
    Resumed,
    Scalar,
    SignalSent,
    Started,
    Step,
)
from lorasup.supervisor.report import (
    CSV_COLUMNS,
    EMA_ALPHA,
    SCHEMA,
    ReportBuilder,
    classify_tag,
    read_into,
    rebuild,
    write_report_json,
)

TOP_LEVEL = {
    "schema", "run_id", "trainer", "command", "status", "outcome", "reason", "exit_code",
    "trainer_returncode", "signals_sent", "steps", "loss", "epochs", "timing", "problems", "stacks",
    "series", "artifacts", "notes",
}


def started(trainer: str = "builtin", steps: int = 4) -> Started:
    return Started(run_id="run-1", trainer=trainer, argv=("python", "train.py"), pid=42,
                   steps_requested=steps, wall_time=1.7e9)


def records(timed: list[tuple[float, Event]]) -> list[dict[str, Any]]:
    """Through the real JSON form, exactly as the sink writes events.jsonl."""
    return [json.loads(event.to_json(t)) for t, event in timed]


def build(timed: list[tuple[float, Event]]) -> dict[str, Any]:
    builder = ReportBuilder()
    for record in records(timed):
        builder.add(record)
    return builder.snapshot()


def write_events(run_dir: Path, timed: list[tuple[float, Event]]) -> Path:
    path = run_dir / "events.jsonl"
    path.write_text("".join(event.to_json(t) + "\n" for t, event in timed), encoding="utf-8")
    return path


def kohya_console_run() -> list[tuple[float, Event]]:
    """What kohya's console gives: the running average only; `epoch 1/1` arrives late."""
    timed: list[tuple[float, Event]] = [(0.0, started("kohya", 4))]
    for step, avg in enumerate([1.18, 1.16, 1.16, 1.15], start=1):
        timed.append((10.0 + step, Step(step=step, total=4)))  # frame with the old avr_loss
        timed.append((10.2 + step, Step(step=step, total=4, avg_loss=avg)))
    timed += [(15.0, Epoch(epoch=1, total=1)), (15.0, Checkpoint(path="out/test_lora.safetensors")),
              (16.0, Exited(returncode=0)),
              (16.0, Outcome(outcome="completed", exit_code=0, reason="4 steps",
                             trainer_returncode=0))]
    return timed


def test_shape_and_running_status() -> None:
    report = build([(0.0, started()), (1.0, Step(step=1, loss=0.5))])
    assert set(report) == TOP_LEVEL
    assert report["schema"] == SCHEMA
    assert report["status"] == "running" and report["outcome"] is None
    assert report["artifacts"]["loss_curves_png"] is None
    json.dumps(report, allow_nan=False)
    done = build([(0.0, started()), (1.0, Outcome(outcome="completed", exit_code=0,
                                                  reason="ok"))])
    assert done["status"] == "finished" and done["outcome"] == "completed"


def test_repeated_step_is_merged_and_keeps_its_first_time() -> None:
    report = build([
        (0.0, started()),
        (1.0, Step(step=1, total=4)),
        (1.5, Step(step=1, total=4, loss=0.9, lr=1e-4)),
        (3.0, Step(step=2, avg_loss=0.8)),
        (3.1, Step(step=2, loss=0.7, avg_loss=0.75)),
        (3.2, Step(step=2)),  # nothing new: keeps the values
    ])
    series = report["series"]
    assert series["step"] == [1, 2]
    assert series["loss"] == [0.9, 0.7]
    assert series["avg_loss"] == [None, 0.75]
    assert series["lr"] == [1e-4, None]
    assert series["t"] == [1.0, 3.0]
    assert series["s_per_step"] == [None, 2.0]
    assert report["steps"]["recorded"] == 2
    assert report["timing"]["first_step_s"] == 1.0


def test_tensorboard_scalar_wins_over_console_loss() -> None:
    report = build([
        (0.0, started()),
        (1.0, Step(step=1, loss=1.13)),
        (1.1, Scalar(tag="train_loss", step=1, value=1.1332951, source="tensorboard")),
        (2.0, Step(step=2, loss=1.16)),
        # a later console update must not undo the full-precision value
        (2.5, Scalar(tag="train_loss", step=2, value=1.1649894, source="tensorboard")),
        (2.6, Step(step=2, loss=1.17)),
        (3.0, Step(step=3, loss=1.12)),
    ])
    assert report["series"]["loss"] == [1.1332951, 1.1649894, 1.12]
    assert report["series"]["sources"]["loss"] == "tensorboard+console"
    assert report["loss"]["source"] == "tensorboard+console"
    only_tb = build([(0.0, started()), (1.0, Step(step=1, loss=1.13)),
                     (1.1, Scalar(tag="loss/current", step=1, value=1.18, source="tensorboard"))])
    assert only_tb["series"]["sources"]["loss"] == "tensorboard"


def test_tags_are_classified() -> None:
    assert classify_tag("loss/current") == "loss"
    assert classify_tag("train/loss") == "loss"
    assert classify_tag("loss/average") == "avg_loss"
    assert classify_tag("loss/epoch_average") == "epoch_loss"
    assert classify_tag("learning_rate") == "lr"
    assert classify_tag("lr/unet") == "lr_tag"
    assert classify_tag("eval/val_loss") == "val_loss"
    assert classify_tag("grad_norm") == "other"


def test_kohya_console_only_run() -> None:
    report = build(kohya_console_run())
    series = report["series"]
    assert series["loss"] == [None] * 4
    assert series["avg_loss"] == [1.18, 1.16, 1.16, 1.15]
    assert series["sources"]["avg_loss"] == "console"
    assert "loss" in series["missing"] and "lr" in series["missing"]
    assert "avg_loss" not in series["missing"]
    assert "TensorBoard" in series["explanation"]["loss"]
    loss = report["loss"]
    assert loss["basis"] == "avg_loss"
    assert loss["first"] == 1.18 and loss["final"] == 1.15
    assert loss["min"] == 1.15 and loss["min_step"] == 4 and loss["max"] == 1.18
    assert series["ema"]["basis"] == "avg_loss"
    # a one-epoch run: the late `epoch 1/1` still places every step in epoch 1
    assert series["epoch"] == [1, 1, 1, 1]
    assert report["epochs"] == [{"epoch": 1, "mean_loss": None, "steps": 4, "source": None,
                                  "partial": None}]
    assert any("per-epoch mean loss not available" in n for n in report["notes"])
    assert report["artifacts"]["checkpoints"] == ["out/test_lora.safetensors"]
    assert report["trainer_returncode"] == 0


def test_kohya_epoch_average_is_used_when_no_per_step_loss() -> None:
    timed = kohya_console_run()
    timed.append((15.5, Scalar(tag="loss/epoch_average", step=1, value=1.083,
                               source="tensorboard")))
    epochs = build(timed)["epochs"]
    assert epochs == [{"epoch": 1, "mean_loss": 1.083, "steps": 4,
                       "source": "loss/epoch_average (tensorboard)", "partial": None}]


def test_kohya_with_tensorboard_fills_loss_and_lr() -> None:
    timed = kohya_console_run()
    for step, value in enumerate([1.18, 1.13, 1.18, 1.10], start=1):
        timed.append((15.1, Scalar(tag="loss/current", step=step, value=value,
                                   source="tensorboard")))
        timed.append((15.1, Scalar(tag="lr/unet", step=step, value=1e-4, source="tensorboard")))
    report = build(timed)
    series = report["series"]
    # no single lr: kept per tag, and said so; no epoch average was written
    assert series["missing"] == ["lr", "epoch_loss"]
    assert "series.lr_by_tag (lr/unet)" in series["explanation"]["lr"]
    assert series["lr"] == [None] * 4
    assert series["lr_by_tag"] == {"lr/unet": [1e-4] * 4}
    assert series["sources"]["lr/unet"] == "tensorboard"
    assert report["loss"]["basis"] == "loss" and report["loss"]["source"] == "tensorboard"
    assert report["epochs"][0]["mean_loss"] == pytest.approx((1.18 + 1.13 + 1.18 + 1.10) / 4)


def test_nonfinite_losses_are_kept_counted_and_left_out_of_statistics() -> None:
    report = build([(0.0, started()), (1.0, Step(step=1, loss=1.0)),
                    (2.0, Step(step=2, loss=math.nan)), (3.0, Step(step=3, loss=3.0)),
                    (4.0, Step(step=4, loss=math.inf))])
    assert report["series"]["loss"] == [1.0, "nan", 3.0, "inf"]
    loss = report["loss"]
    assert loss["nonfinite"] == 2 and loss["count"] == 4
    assert (loss["min"], loss["max"], loss["mean"]) == (1.0, 3.0, 2.0)
    assert loss["std"] == pytest.approx(math.sqrt(2.0))  # sample std of [1, 3]
    assert loss["final"] == "inf"
    assert report["series"]["ema_loss"] == [1.0, None, pytest.approx(1.2), None]
    json.dumps(report, allow_nan=False)


def test_single_value_has_no_std() -> None:
    loss = build([(0.0, started()), (1.0, Step(step=1, loss=0.4))])["loss"]
    assert loss["mean"] == 0.4 and loss["std"] is None
    empty = build([(0.0, started())])["loss"]
    assert empty["basis"] is None and empty["mean"] is None and empty["first"] is None


def test_per_epoch_means() -> None:
    timed: list[tuple[float, Event]] = [(0.0, started(steps=6)), (0.5, Epoch(epoch=1, total=2))]
    losses = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    for step, value in enumerate(losses[:3], start=1):
        timed.append((float(step), Step(step=step, loss=value)))
    timed.append((3.5, Epoch(epoch=2, total=2)))
    for step, value in enumerate(losses[3:], start=4):
        timed.append((float(step), Step(step=step, loss=value, epoch=2)))
    report = build(timed)
    assert report["series"]["epoch"] == [1, 1, 1, 2, 2, 2]
    assert [(e["epoch"], e["mean_loss"], e["steps"]) for e in report["epochs"]] == [
        (1, 2.0, 3), (2, 5.0, 3)]


def test_ema_formula() -> None:
    report = build([(0.0, started()), (1.0, Step(step=1, loss=1.0)), (2.0, Step(step=2, loss=2.0)),
                    (3.0, Step(step=3)), (4.0, Step(step=4, loss=3.0))])
    a = EMA_ALPHA
    second = a * 2.0 + (1 - a) * 1.0
    assert report["series"]["ema_loss"] == [1.0, pytest.approx(second), None,
                                            pytest.approx(a * 3.0 + (1 - a) * second)]
    assert report["series"]["ema"] == {"alpha": a, "basis": "loss"}


def test_resumed_run_counts_from_the_resume_point() -> None:
    timed: list[tuple[float, Event]] = [(0.0, started(steps=100)), (0.1, Resumed(step=100)),
                                        (0.2, Scalar(tag="loss", step=50, value=9.0,
                                                     source="tensorboard"))]
    timed += [(float(s), Step(step=s, loss=1.0 / s)) for s in range(101, 201)]
    report = build(timed)
    steps = report["steps"]
    assert (steps["first"], steps["last"], steps["recorded"]) == (101, 200, 100)
    assert steps["requested"] == 100 and steps["resumed_from"] == 100
    assert any("outside the requested range" in n for n in report["notes"])


def test_odd_input_never_raises() -> None:
    builder = ReportBuilder()
    for record in [None, [], {}, {"kind": "nope"}, {"kind": "step"}, {"kind": "step", "step": "x"},
                   {"kind": "step", "step": True}, {"kind": "scalar", "tag": 3, "step": 1},
                   {"kind": "signal", "pids": "x"}, {"kind": "started", "argv": 5},
                   {"kind": "step", "step": 1, "loss": {"a": 1}, "t": "later"},
                   {"kind": "outcome", "exit_code": "zero"}]:
        builder.add(record)  # type: ignore[arg-type]
    report = builder.snapshot()
    assert report["series"]["step"] == [1] and report["series"]["loss"] == [None]
    json.dumps(report, allow_nan=False)


def test_problems_signals_and_rejected() -> None:
    line = "torch.OutOfMemoryError: CUDA out of memory"
    report = build([(0.0, started()), (1.0, Problem(problem="cuda_out_of_memory", line=line)),
                    (1.1, Problem(problem="cuda_out_of_memory", line=line)),
                    (2.0, SignalSent(signal="SIGINT", reason="steps_reached", pids=(42, 43)))])
    assert report["problems"] == [{"problem": "cuda_out_of_memory", "line": line, "count": 2,
                                   "first_t": 1.0}]
    assert report["signals_sent"] == [{"signal": "SIGINT", "reason": "steps_reached", "t": 2.0,
                                       "pids": [42, 43]}]
    builder = ReportBuilder()
    builder.add({"t": 1.0, "kind": "rejected", "step": 5})
    assert builder.snapshot()["steps"]["rejected_over_max"] == 1


def test_cut_off_last_line_and_garbage_are_skipped(tmp_path: Path) -> None:
    timed: list[tuple[float, Event]] = [(0.0, started(steps=20))]
    timed += [(float(s), Step(step=s, loss=1.0 / s)) for s in range(1, 21)]
    path = write_events(tmp_path, timed)
    full = path.read_bytes()
    path.write_bytes(full[: len(full) - 9])  # lorasup killed in the middle of a write
    skipped: list[tuple[int, str]] = []
    builder = ReportBuilder()  # the started record and 19 whole steps are read
    read_into(builder, path, on_skip=lambda n, why: skipped.append((n, why)))
    assert skipped == [(21, "cut off")]
    assert builder.run_id == "run-1" and builder.snapshot()["steps"]["recorded"] == 19
    report = rebuild(tmp_path)
    assert report["series"]["step"] == list(range(1, 20))
    assert any("skipped" in note for note in report["notes"])
    # an undecodable line in the middle is skipped too
    lines = full.splitlines(keepends=True)
    path.write_bytes(b"".join([*lines[:5], b"\xff\xfe{not json\n", *lines[5:]]))
    assert rebuild(tmp_path)["series"]["step"] == list(range(1, 21))


@pytest.mark.usefixtures("real_plot")
def test_rebuild_writes_all_files_atomically(tmp_path: Path) -> None:
    write_events(tmp_path, kohya_console_run())
    report = rebuild(tmp_path, model_files=["lora_output/test_lora.safetensors"])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["events.jsonl", "loss_curves.png", "losses.csv", "report.json"]
    assert json.loads((tmp_path / "report.json").read_text()) == report
    artifacts = report["artifacts"]
    assert artifacts["model_files"] == ["lora_output/test_lora.safetensors"]
    assert artifacts["loss_curves_png"] == "loss_curves.png"
    assert artifacts["losses_csv"] == "losses.csv"
    assert artifacts["trainer_log"] is None  # not in this run dir: not claimed

    png = (tmp_path / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000

    with (tmp_path / "losses.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert rows[1] == ["1", "", "1.18", "1.18", "", "1", "11.0"]
    assert len(rows) == 5

    write_report_json(tmp_path, {**report, "notes": ["again"]})
    assert json.loads((tmp_path / "report.json").read_text())["notes"] == ["again"]
    assert not list(tmp_path.glob("*.tmp"))


def test_steps_out_of_order_and_repeated_are_merged_by_step() -> None:
    from lorasup.supervisor.report import ReportBuilder

    builder = ReportBuilder()
    for t, step, loss in [(1, 1, 1.0), (2, 2, 2.0), (3, 3, 3.0), (4, 2, 2.5), (5, 5, 5.0),
                          (6, 4, 4.0), (7, 3, None)]:
        record = {"t": t, "kind": "step", "step": step}
        if loss is not None:
            record["loss"] = loss
        builder.add(record)
    series = builder.snapshot()["series"]
    assert series["step"] == [1, 2, 3, 4, 5]
    assert series["loss"] == [1.0, 2.5, 3.0, 4.0, 5.0]
