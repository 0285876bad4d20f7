"""Full-precision metrics from the trainer's own TensorBoard files, end to end.

Real kohya recordings are replayed as real child processes that also write the event
files the recorded run wrote (raw recorded bytes, at the recorded steps, under the
``--logging_dir`` lorasup injects or the user gave). The report must carry exactly the
values in those files; without them it falls back to the console and says so. A fake
trainer whose console looks healthy while its event file holds a NaN loss must be
stopped as diverged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lorasup.supervisor.tensorboard import EventFileReader
from tests.support import HELPERS, KOHYA_RECORDINGS, REPLAY, run_lorasup

SPEED = "60"
TB_RECORDINGS = Path(__file__).resolve().parent / "data" / "tensorboard" / "kohya"
FAKE_TB_TRAINER = HELPERS / "fake_tb_trainer.py"

# name: (steps N, last step printed, outcome)
CASES = {
    "normal": (12, 12, "completed"),
    "sigterm_unbuffered": (40, 13, "trainer_failed"),
    "save_every": (12, 12, "completed"),
}


def steps_arg(name: str) -> list[str]:
    """The recorded ``--max_train_steps=N`` (no --steps: lorasup takes N from it)."""
    with (KOHYA_RECORDINGS / f"{name}.jsonl").open(encoding="utf-8") as fh:
        argv = json.loads(fh.readline())["argv"]
    return [a for a in argv if a.startswith("--max_train_steps")]


def recorded_file(name: str) -> Path:
    (path,) = (TB_RECORDINGS / name).glob("events.out.tfevents.*")
    return path


def recorded_scalars(name: str) -> dict[str, dict[int, float]]:
    """tag -> {step: value}, straight from the recorded event file."""
    out: dict[str, dict[int, float]] = {}
    for record in EventFileReader(recorded_file(name)).read_new():
        out.setdefault(record.tag, {})[record.step] = record.value
    return out


def replay(tmp_path: Path, name: str, *extra: str, tensorboard: bool = True):
    run_dir = tmp_path / "run"
    tb = ["--tensorboard", str(TB_RECORDINGS / name)] if tensorboard else []
    return run_lorasup(run_dir, "--trainer", "kohya", "--grace", "2", "--",
                       sys.executable, str(REPLAY), str(KOHYA_RECORDINGS / f"{name}.jsonl"),
                       "--speed", SPEED, *tb, *steps_arg(name), *extra)


def check_series_equal_event_files(report: dict, name: str, last: int) -> None:
    expected = recorded_scalars(name)
    series = report["series"]
    steps = list(range(1, last + 1))
    assert series["step"] == steps
    assert series["loss"] == [expected["loss/current"][k] for k in steps]
    assert series["avg_loss"] == [expected["loss/average"][k] for k in steps]
    lr_tags = sorted(tag for tag in expected if tag.startswith("lr/"))
    assert lr_tags == ["lr/group1", "lr/textencoder", "lr/unet"]
    assert series["lr_by_tag"] == {tag: [expected[tag][k] for k in steps] for tag in lr_tags}
    sources = series["sources"]
    assert sources["loss"] == "tensorboard"
    assert sources["avg_loss"] == "tensorboard"
    assert all(sources[tag] == "tensorboard" for tag in lr_tags)
    assert report["loss"]["basis"] == "loss"
    assert report["loss"]["source"] == "tensorboard"
    epoch_average = expected.get("loss/epoch_average")
    # kohya's lr is per group, in lr_by_tag: named as missing with where it is instead
    assert series["missing"] == ["lr"] + (["epoch_loss"] if epoch_average is None else [])
    assert "series.lr_by_tag" in series["explanation"]["lr"]
    if epoch_average is None:  # a killed run writes none
        assert series["epoch_loss"] is None
    else:
        assert series["epoch_loss"] == {"step": sorted(epoch_average),
                                        "value": [epoch_average[e] for e in sorted(epoch_average)],
                                        "source": "tensorboard"}
    assert not [n for n in report["notes"] if "TensorBoard" in n]


@pytest.mark.parametrize("name", sorted(CASES))
def test_report_carries_the_event_files_values(tmp_path: Path, name: str) -> None:
    steps, last, outcome = CASES[name]
    result = replay(tmp_path, name)
    report = result.report
    assert report["outcome"] == outcome, result.stderr[-1500:]
    assert report["steps"]["requested"] == steps
    assert report["steps"]["last"] == last
    check_series_equal_event_files(report, name, last)
    # The replay wrote the recorded file again, byte for byte, where kohya would have.
    (written,) = (result.run_dir / "tensorboard").glob("*/network_train/events.out.tfevents.*")
    assert written.read_bytes() == recorded_file(name).read_bytes()
    # One scalar event per recorded record within steps 1..last, all from the files.
    scalars = [e for e in result.events() if e["kind"] == "scalar"]
    assert {e["source"] for e in scalars} == {"tensorboard"}
    assert len(scalars) == 5 * last + ("loss/epoch_average" in recorded_scalars(name))


def test_without_event_files_the_console_series_is_used_and_said(tmp_path: Path) -> None:
    result = replay(tmp_path, "normal", tensorboard=False)
    report = result.report
    assert report["outcome"] == "completed", result.stderr[-1500:]
    series = report["series"]
    assert series["step"] == list(range(1, 13))
    assert series["loss"] == [None] * 12
    assert all(isinstance(v, float) for v in series["avg_loss"])
    assert series["sources"]["loss"] is None
    assert series["sources"]["avg_loss"] == "console"
    assert series["lr_by_tag"] == {}
    assert series["epoch_loss"] is None
    assert "loss" in series["missing"]
    assert report["loss"]["basis"] == "avg_loss"
    notes = [n for n in report["notes"] if "no TensorBoard event files" in n]
    assert len(notes) == 1, report["notes"]
    assert str(result.run_dir / "tensorboard") in notes[0]
    assert not [e for e in result.events() if e["kind"] == "scalar"]


def test_the_users_own_logging_dir_is_followed(tmp_path: Path) -> None:
    # Relative and in the two-argument spelling: it is resolved against the trainer's cwd.
    result = replay(tmp_path, "normal", "--logging_dir", "userlogs")
    report = result.report
    assert report["outcome"] == "completed", result.stderr[-1500:]
    argv = report["command"]
    assert argv[argv.index("--logging_dir") + 1] == "userlogs"
    assert not [a for a in argv if a.startswith("--logging_dir=")]  # nothing injected
    assert not (result.run_dir / "tensorboard").exists()
    (written,) = (tmp_path / "userlogs").glob("*/network_train/events.out.tfevents.*")
    assert written.read_bytes() == recorded_file("normal").read_bytes()
    check_series_equal_event_files(report, "normal", 12)


def test_nan_in_the_event_file_is_divergence(tmp_path: Path) -> None:
    """The console shows a finite avr_loss; loss/current is NaN at step 3 in the file only."""
    run_dir = tmp_path / "run"
    result = run_lorasup(run_dir, "--trainer", "kohya", "--grace", "2", "--",
                         sys.executable, str(FAKE_TB_TRAINER), "--max_train_steps=50",
                         "--step-seconds", "0.3", "--nan-step", "3")
    report = result.report
    assert report["outcome"] == "diverged", result.stderr[-1500:]
    assert result.returncode == 5
    assert report["exit_code"] == 5
    assert "non-finite" in report["reason"]
    series = report["series"]
    assert series["loss"][2] == "nan"
    assert all(isinstance(v, float) for v in series["loss"][:2] + series["loss"][3:])
    assert series["sources"]["loss"] == "tensorboard"
    assert report["loss"]["nonfinite"] == 1
    assert all(isinstance(v, float) for v in series["avg_loss"])  # the console never saw it
    # Stopped by lorasup long before its 50 steps, within a few event-file polls.
    events = result.events()
    step3 = min(e["t"] for e in events if e["kind"] == "step" and e["step"] == 3)
    nan_seen = min(e["t"] for e in events if e["kind"] == "scalar"
                   and e["tag"] == "loss/current" and e["value"] == "nan")
    first_signal = report["signals_sent"][0]
    assert first_signal["signal"] == "SIGINT"
    assert first_signal["reason"] == "diverged"
    assert step3 <= nan_seen <= first_signal["t"]
    assert first_signal["t"] - step3 < 3.0, (step3, nan_seen, first_signal)
    assert report["steps"]["last"] < 20
