"""What the report says about itself: running-average scope, partial epochs, missing
series, expected tracebacks, argparse rejections."""

from __future__ import annotations

from lorasup.supervisor.events import (
    Epoch,
    Event,
    Outcome,
    Problem,
    Scalar,
    SignalSent,
    Started,
    Step,
)
from lorasup.trainers.base import python_problems
from tests.test_report import build


def started(trainer: str = "kohya", steps: int = 10,
            argv: tuple[str, ...] = ("python", "train.py")) -> Started:
    return Started(run_id="run-1", trainer=trainer, argv=argv, pid=42, steps_requested=steps,
                   wall_time=1.7e9)


def epochs_run(losses: list[float], per_epoch: int, *, restart: bool) -> list[tuple[float, Event]]:
    """Per-step loss and a running average that restarts each epoch or goes on."""
    timed: list[tuple[float, Event]] = [(0.0, started(steps=len(losses)))]
    seen: list[float] = []
    for i, loss in enumerate(losses):
        epoch = i // per_epoch + 1
        if i % per_epoch == 0:
            timed.append((1.0 + i, Epoch(epoch=epoch, total=3)))
            if restart:
                seen = []
        seen.append(loss)
        timed.append((1.0 + i, Step(step=i + 1, loss=loss, avg_loss=round(sum(seen) / len(seen), 3),
                                    epoch=epoch)))
    return timed


LOSSES = [1.0, 0.8, 0.9, 0.7, 0.75, 0.6, 0.65, 0.5]


def test_running_average_that_restarts_each_epoch_is_said_to() -> None:
    resets = build(epochs_run(LOSSES, 3, restart=True))["series"]["avg_loss_resets"]
    assert resets["each_epoch"] is True and resets["boundaries_checked"] == 2


def test_running_average_that_goes_on_is_not_called_per_epoch() -> None:
    resets = build(epochs_run(LOSSES, 3, restart=False))["series"]["avg_loss_resets"]
    assert resets["each_epoch"] is False and resets["boundaries_checked"] == 2


def test_one_epoch_cannot_tell() -> None:
    resets = build(epochs_run(LOSSES[:3], 3, restart=True))["series"]["avg_loss_resets"]
    assert resets["each_epoch"] is None and "no epoch boundary" in resets["explanation"]


def test_last_epoch_cut_short_is_partial() -> None:
    epochs = build(epochs_run(LOSSES, 3, restart=True))["epochs"]
    assert [(e["epoch"], e["steps"], e["partial"]) for e in epochs] == [
        (1, 3, False), (2, 3, False), (3, 2, True)]
    full = build(epochs_run(LOSSES[:6], 3, restart=True))["epochs"]
    assert [e["partial"] for e in full] == [False, False]


def test_every_null_series_is_named_with_a_reason() -> None:
    timed = [(0.0, started(argv=("python", "train_network.py", "--logging_dir", "/tb"))),
             (1.0, Step(step=1, avg_loss=1.0)), (2.0, Step(step=2, avg_loss=0.9)),
             (2.0, Scalar(tag="lr/unet", step=1, value=1e-4, source="tensorboard"))]
    series = build(timed)["series"]
    assert series["missing"] == ["loss", "lr", "epoch", "epoch_loss"]
    why = series["explanation"]
    assert "series.lr_by_tag (lr/unet)" in why["lr"]
    assert "none was read from /tb" in why["loss"] and "needs" not in why["loss"]
    for name in series["missing"]:
        assert why[name]
    # every series aligned with step that is all null is in missing
    for name in ("loss", "avg_loss", "lr", "ema_loss", "s_per_step", "epoch"):
        values = series[name]
        assert (name in series["missing"]) == all(v is None for v in values), name


def test_zero_step_kohya_run_with_injected_logging_dir() -> None:
    timed = [(0.0, started(argv=("python", "train_network.py", "--logging_dir=/tb"))),
             (1.0, Outcome(outcome="trainer_failed", exit_code=1, reason="x"))]
    series = build(timed)["series"]
    for name in ("loss", "avg_loss", "lr", "ema_loss", "s_per_step"):
        assert series["explanation"][name] == "no step was recorded", name
    without = build([(0.0, started()), (1.0, Step(step=1, avg_loss=1.0))])["series"]
    assert "needs --logging_dir" in without["explanation"]["loss"]


def test_keyboard_interrupt_after_lorasups_sigint_is_expected() -> None:
    timed = [(0.0, started()),
             (1.0, Problem(problem="traceback", line="Traceback (most recent call last):")),
             (1.1, Problem(problem="exception", line="ValueError: bad")),
             (2.0, SignalSent(signal="SIGINT", reason="steps", pids=(42,))),
             (2.5, Problem(problem="traceback", line="Traceback (most recent call last):")),
             (2.6, Problem(problem="exception", line="KeyboardInterrupt")),
             (3.0, Problem(problem="traceback", line="Traceback (most recent call last):")),
             (3.1, Problem(problem="exception", line="RuntimeError: save failed"))]
    problems = build(timed)["problems"]
    plain = [(p["problem"], p["line"], p["count"]) for p in problems if "expected" not in p]
    expected = [(p["problem"], p["line"]) for p in problems if "expected" in p]
    assert plain == [("traceback", "Traceback (most recent call last):", 2),
                     ("exception", "ValueError: bad", 1),
                     ("exception", "RuntimeError: save failed", 1)]
    assert expected == [("traceback", "Traceback (most recent call last):"),
                        ("exception", "KeyboardInterrupt")]
    assert all("SIGINT" in p["expected"] for p in problems if "expected" in p)


def test_traceback_after_sigint_without_its_end_still_counts() -> None:
    timed = [(0.0, started()), (2.0, SignalSent(signal="SIGINT", reason="steps", pids=(42,))),
             (2.5, Problem(problem="traceback", line="Traceback (most recent call last):"))]
    problems = build(timed)["problems"]
    assert [(p["problem"], "expected" in p) for p in problems] == [("traceback", False)]


def test_keyboard_interrupt_without_lorasups_sigint_is_a_problem() -> None:
    timed = [(0.0, started()), (1.0, Problem(problem="exception", line="KeyboardInterrupt"))]
    assert [("expected" in p) for p in build(timed)["problems"]] == [False]


def test_argparse_rejections_are_bad_arguments() -> None:
    for line in ("train_network.py: error: unrecognized arguments: --lerning_rate 1e-4",
                 "train.py: error: argument --max_train_steps: invalid int value: 'x'",
                 "train.py: error: the following arguments are required: --output_dir"):
        assert [e.problem for e in python_problems(line)] == ["bad_arguments"], line
    for line in ("usage: train.py [-h] [--steps STEPS]", "an error: nothing", "step 3 error: 0"):
        assert python_problems(line) == [], line


def test_plot_draws_history_partial_epochs_and_nonfinite(tmp_path) -> None:
    from lorasup.supervisor.plot import render_loss_curves
    from lorasup.supervisor.report import ReportBuilder

    builder = ReportBuilder()
    for _, event in epochs_run([*LOSSES, float("nan")], 3, restart=True):
        builder.add(event.to_dict() | {"t": 1.0})
    builder.add({"t": 1.0, "kind": "history", "run_id": "old", "resumed_from": 0,
                 "step": [1, 2], "loss": [1.2, "nan"], "ema_loss": [1.2, 1.2],
                 "avg_loss": [None, None], "lr": [None, None]})
    report = builder.snapshot()
    assert report["series"]["history"]["run_id"] == "old"
    assert report["epochs"][-1]["partial"] is False  # 3 full epochs of 3
    path = render_loss_curves(report, tmp_path / "loss_curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_our_sigint_traceback_is_no_trainer_problem(tmp_path) -> None:
    import json
    import sys
    from pathlib import Path

    from tests.support import run_lorasup

    helper = Path(__file__).parent / "helpers" / "protocol_steps.py"
    run_dir = tmp_path / "run"
    result = run_lorasup(run_dir, "--trainer", "native", "--steps", "2", "--timeout", "3",
                         "--grace", "10", "--", sys.executable, str(helper), "--state",
                         str(tmp_path / "state"), "--hang")
    report = result.report
    assert [s["signal"] for s in report["signals_sent"]][:1] == ["SIGINT"], result.stderr[-2000:]
    lines = [p["line"] for p in report["problems"]]
    assert "KeyboardInterrupt" in lines, lines
    assert all("SIGINT" in p.get("expected", "") for p in report["problems"]), report["problems"]
    logged = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    assert not [e for e in logged if e["event"] == "trainer_problem"]
    assert [e for e in logged if e["event"] == "trainer_stopping"]


def test_our_sigint_traceback_under_a_rank_prefix_is_no_trainer_problem(tmp_path) -> None:
    """torchrun prefixes a worker's lines with ``[rank0]: ``: its KeyboardInterrupt after
    lorasup's own SIGINT is the stop, not a crash (issue 16.12)."""
    import sys
    from pathlib import Path

    from tests.support import run_lorasup

    helper = Path(__file__).parent / "helpers" / "protocol_steps.py"
    result = run_lorasup(tmp_path / "run", "--trainer", "native", "--steps", "2", "--timeout",
                         "3", "--grace", "10", "--", sys.executable, str(helper), "--state",
                         str(tmp_path / "state"), "--hang", "--ranked")
    problems = result.report["problems"]
    assert ("exception", "KeyboardInterrupt") in [(p["problem"], p["line"]) for p in problems]
    assert all("SIGINT" in p.get("expected", "") for p in problems), problems


def test_sigint_record_after_the_traceback_it_caused() -> None:
    """Two readers, one file: the signal's record can follow the output it caused."""
    timed = [(0.0, started()),
             (1.0, Problem(problem="traceback", line="Traceback (most recent call last):")),
             (3.1, Problem(problem="traceback", line="Traceback (most recent call last):")),
             (3.2, Problem(problem="exception", line="KeyboardInterrupt")),
             (3.0, SignalSent(signal="SIGINT", reason="timeout", pids=(42,)))]
    problems = build(timed)["problems"]
    assert [(p["problem"], p["count"], "expected" in p) for p in problems] == [
        ("traceback", 1, False), ("traceback", 1, True), ("exception", 1, True)]
