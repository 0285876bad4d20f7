"""``--trainer command``: plain progress lines and the job file's ``[parse]`` regexes.

String tables first (fast), then the usage errors as a user meets them (exit 2, one line
naming the key), then real runs of a small program that prints plain progress lines.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from lorasup.supervisor.events import Step
from lorasup.trainers.base import TrainerJob, UsageError
from lorasup.trainers.command import CommandAdapter
from lorasup.trainers.text_steps import compile_table, plain_step
from tests.support import HELPERS, run_lorasup

PLAIN = str(HELPERS / "plain_steps.py")

# line: (step, total, loss, lr, epoch)
PLAIN_STEPS = {
    "step 3/100": (3, 100, None, None, None),
    "Step 3 of 100, loss: 0.5": (3, 100, 0.5, None, None),
    "steps: 3/100": (3, 100, None, None, None),
    "STEP 4/5": (4, 5, None, None, None),
    "iter 3": (3, None, None, None, None),
    "iter 3 loss=0.5": (3, None, 0.5, None, None),
    "Iteration 3, loss: 0.5 lr=1e-4": (3, None, 0.5, 1e-4, None),
    "iterations: 5/10": (5, 10, None, None, None),
    "Epoch 1, Step 3/100, Loss: 0.25": (3, 100, 0.25, None, 1),
    "Epoch [2/3] Step [3/100] loss=nan": (3, 100, math.nan, None, 2),
    "[Step 3/10]": (3, 10, None, None, None),
    "[rank0] step 7 | loss 1.5 | lr 3e-4": (7, None, 1.5, 3e-4, None),
    "2026-11-27 21:44:00,123 - INFO - __main__ - step 5/10 loss 0.25": (5, 10, 0.25, None, None),
    "INFO:__main__:step 5 loss=0.1": (5, None, 0.1, None, None),
    "11/27/2026 21:12:10 - INFO - __main__ - [RANK 0] Step 6/10, loss=0.5": (6, 10, 0.5, None,
                                                                             None),
    "step 3: train_loss=0.4 val_loss=0.9": (3, None, 0.4, None, None),
    "step 3 acc=0.9": (3, None, None, None, None),
    "  step 9/9 loss=inf": (9, 9, math.inf, None, None),
    "step 2 loss=1e400": (2, None, math.inf, None, None),
}

NOT_STEPS = [
    "Total steps: 1000",            # a count, not progress (plural without a total)
    "  Total optimization steps = 20",
    "steps 100",
    "warmup steps: 100",
    "resuming from step 500",       # the step word does not open the line
    "Saving checkpoint at step 500",
    "https://example.com/step/5",
    "see https://example.com/iter/5 for more",
    "step 2026-11-27",              # a date
    "step 12:30",                   # a time
    "step 1.5",
    "Stepper 5",
    "sTeP 4",                       # odd case: not a form a program prints
    "Step 1: Loading the model",    # a list of stages, not training steps
    "Step 1/3: Building the dataset",
    "step 3/100 took 1.2s",
    "step " + "9" * 5000,           # more digits than int() takes
    "step 99999999999999 loss 1",   # beyond any real step count
    "step -5",
    "epoch 1/3",
    "11/27/2026 21:12:10 - INFO - __main__ - [RANK 0]   Total optimization steps = 10",
    "11/27/2026 21:12:10 - INFO - __main__ - [RANK 0]   Gradient Accumulation steps = 1",
]


@pytest.mark.parametrize("line", sorted(PLAIN_STEPS))
def test_plain_progress_lines_are_steps(line: str) -> None:
    event = plain_step(line)
    assert event is not None
    got = (event.step, event.total, event.loss, event.lr, event.epoch)
    want = PLAIN_STEPS[line]
    assert got[:2] == want[:2] and got[4] == want[4]
    for value, expected in zip(got[2:4], want[2:4], strict=True):
        if expected is not None and math.isnan(expected):
            assert value is not None and math.isnan(value)
        else:
            assert value == expected


@pytest.mark.parametrize("line", NOT_STEPS)
def test_text_that_is_not_progress_is_no_step(line: str) -> None:
    assert plain_step(line) is None
    assert not [e for e in CommandAdapter().parse(line) if isinstance(e, Step)]


def adapter_with(table: dict[str, str]) -> CommandAdapter:
    adapter = CommandAdapter()
    adapter.command(TrainerJob(steps=10, argv=("prog",), run_dir="/tmp/x",
                               parse=tuple(table.items())))
    return adapter


def steps_of(adapter: CommandAdapter, line: str) -> list[Step]:
    return [e for e in adapter.parse(line) if isinstance(e, Step)]


def test_a_step_regex_with_several_groups_reads_them_from_one_match() -> None:
    adapter = adapter_with(
        {"step": r"it=(?P<step>\d+)/(?P<total>\d+) L=(?P<loss>\S+) eta=(?P<lr>\S+)"})
    [event] = steps_of(adapter, "[train] it=3/50 L=0.125 eta=2e-4")
    assert (event.step, event.total, event.loss, event.lr) == (3, 50, 0.125, 2e-4)
    assert adapter.needles == ()  # the user's regex may match any line: none is skipped


def test_value_regexes_apply_to_the_line_that_shows_a_step() -> None:
    adapter = adapter_with({"step": r"it=(?P<step>\d+)", "loss": r"L=(?P<loss>[^ ]+)",
                            "lr": r"eta=(?P<lr>[^ ]+)", "total": r"of (?P<total>\d+)"})
    [event] = steps_of(adapter, "[train] it=3 of 50 L=0.125 eta=2e-4")
    assert (event.step, event.total, event.loss, event.lr) == (3, 50, 0.125, 2e-4)
    # A loss on a line without a step belongs to no step: nothing is guessed.
    assert steps_of(adapter, "L=0.5") == []


def test_a_step_regex_replaces_the_builtin_forms() -> None:
    adapter = adapter_with({"step": r"it=(?P<step>\d+)"})
    assert steps_of(adapter, "step 3/100 loss=0.5") == []
    assert steps_of(adapter, "steps:  50%|#####     | 6/12 [00:01<00:01, avr_loss=0.123]") == []
    # Protocol lines are always read.
    [event] = steps_of(adapter, '{"lorasup":1,"kind":"step","step":4}')
    assert event.step == 4


def test_value_regexes_alone_refine_the_builtin_forms() -> None:
    adapter = adapter_with({"loss": r"smoothed=(?P<loss>\S+)"})
    [event] = steps_of(adapter, "step 3/100 loss=0.5 smoothed=0.45")
    assert (event.step, event.total, event.loss) == (3, 100, 0.45)
    [event] = steps_of(adapter, "step 4/100 loss=0.5")
    assert event.loss == 0.5


def test_numbers_from_user_regexes_go_through_the_tolerant_reader() -> None:
    adapter = adapter_with({"step": r"it=(?P<step>\S+) L=(?P<loss>\S+)"})
    assert steps_of(adapter, "it=" + "9" * 5000 + " L=1") == []
    assert steps_of(adapter, "it=-3 L=1") == []
    [event] = steps_of(adapter, "it=3 L=1e400")
    assert event.loss == math.inf
    [event] = steps_of(adapter, "it=3 L=junk")
    assert event.loss is None


@pytest.mark.parametrize(("table", "message"), [
    ({"step": "it (?P<step>\\d+"}, "[parse] step: not a valid regular expression"),
    ({"step": r"it (\d+)"}, "[parse] step: the regular expression needs a (?P<step>...)"),
    ({"loss": r"loss=(\S+)"}, "[parse] loss: the regular expression needs a (?P<loss>...)"),
    ({"los": r"(?P<los>x)"}, "[parse] has no key 'los' (did you mean 'loss'?)"),
    ({"step": ""}, "[parse] step: give a regular expression"),
])
def test_bad_parse_tables_name_the_key(table: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError) as info:
        compile_table(table)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def write_job(tmp_path: Path, table: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text("[parse]\n" + table + "\n", encoding="utf-8")
    return path


def test_a_bad_regex_is_a_usage_error_before_anything_starts(tmp_path: Path) -> None:
    job = write_job(tmp_path, "step = 'it (?P<step>\\d+'")
    run_dir = tmp_path / "run"
    result = run_lorasup(run_dir, "--trainer", "command", "--steps", "3", "--config", str(job),
                         "--", sys.executable, PLAIN, "5")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("lorasup: error: [parse] step:")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (run_dir / "events.jsonl").exists()


def test_other_trainers_refuse_a_parse_table(tmp_path: Path) -> None:
    job = write_job(tmp_path, "step = 'it (?P<step>\\d+)'")
    result = run_lorasup(tmp_path / "run", "--trainer", "native", "--steps", "3", "--config",
                         str(job), "--", sys.executable, PLAIN, "5")
    assert result.returncode == 2
    assert "[parse] table is read by --trainer command only" in result.stderr


def recorded_steps(result) -> dict[int, dict]:
    return {e["step"]: e for e in result.events() if e["kind"] == "step"}


@pytest.mark.parametrize("form", ["iter", "step"])
def test_plain_lines_stop_a_real_program_at_exactly_n(tmp_path: Path, form: str) -> None:
    result = run_lorasup(tmp_path / "run", "--trainer", "command", "--steps", "4", "--grace",
                         "5", "--", sys.executable, PLAIN, "200", "--form", form)
    assert result.returncode == 0, result.stderr
    report = result.report
    assert report["outcome"] == "completed"
    assert report["steps"]["last"] == 4
    steps = recorded_steps(result)
    assert sorted(steps) == [1, 2, 3, 4]
    assert [steps[k]["loss"] for k in (1, 2, 3, 4)] == [1.0, 0.5, 0.3333, 0.25]
    # Stopped at N (SIGINT at once), not after the program's own 200 steps.
    assert report["trainer_returncode"] == 130


def test_a_parse_table_reads_a_custom_format_end_to_end(tmp_path: Path) -> None:
    job = write_job(tmp_path, "step = 'it=(?P<step>\\d+)'\nloss = 'L=(?P<loss>\\S+)'\n"
                              "lr = 'eta=(?P<lr>\\S+)'")
    result = run_lorasup(tmp_path / "run", "--trainer", "command", "--steps", "3", "--config",
                         str(job), "--grace", "5", "--", sys.executable, PLAIN, "200",
                         "--form", "custom")
    assert result.returncode == 0, result.stderr
    assert result.report["steps"]["last"] == 3
    steps = recorded_steps(result)
    assert sorted(steps) == [1, 2, 3]
    assert [(steps[k]["loss"], steps[k]["lr"]) for k in (1, 2, 3)] == [
        (1.0, 1e-4), (0.5, 1e-4), (0.3333, 1e-4)]
