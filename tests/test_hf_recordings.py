"""The real transformers Trainer recordings replayed as real child processes through lorasup.

The ``hf_*`` recordings are copies of ../shared/recordings/hf (transformers 5.24, peft, tqdm
4.70; its README describes them). ``synthetic_tqdm_eval.jsonl`` is NOT a transformers run:
real tqdm 4.70.1 driven the way the Trainer's ProgressCallback drives it, with an
evaluation bar (its generator is in its meta line), because no recording has one.
"""

from __future__ import annotations

import base64
import json
import math
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasup.supervisor.events import Checkpoint, Problem, Scalar, Step
from lorasup.supervisor.streams import LineSplitter
from lorasup.trainers import get_adapter, hflog
from lorasup.trainers.base import TrainerJob, UsageError
from lorasup.trainers.hf import HfAdapter, match_bar
from lorasup.trainers.hflog import parse_log_dict
from tests.support import HERE, REPLAY, run_lorasup

RECORDINGS = HERE / "data" / "hf"
#: train_lora.py's own max_steps when the recorded argv passes none
SCRIPT_DEFAULT_STEPS = 20
#: the synthetic run's training bar counts to 9 (its generator takes positional arguments)
SYNTHETIC_STEPS = 9

# The loss of each step in hf_normal, as its 20 stdout dicts show it (read by eye).
NORMAL_LOSS = [6.224, 6.097, 5.862, 5.724, 5.488, 5.296, 5.145, 5.088, 4.972, 4.906,
               4.903, 4.873, 4.864, 4.843, 4.82, 4.818, 4.832, 4.785, 4.797, 4.787]
# The linear schedule from 1e-3, as the dicts print it.
NORMAL_LR = [0.001, 0.00095, 0.0009, 0.00085, 0.0008, 0.00075, 0.0007, 0.00065, 0.0006,
             0.00055, 0.0005, 0.00045, 0.0004, 0.00035, 0.0003, 0.00025, 0.0002, 0.00015,
             0.0001, 5e-05]


def recorded_steps(name: str) -> int:
    if name.startswith("synthetic"):
        return SYNTHETIC_STEPS
    with (RECORDINGS / f"{name}.jsonl").open(encoding="utf-8") as fh:
        argv = json.loads(fh.readline())["argv"]
    if "--max_steps" in argv:
        return int(argv[argv.index("--max_steps") + 1])
    return SCRIPT_DEFAULT_STEPS


def replay(tmp_path: Path, name: str, *lorasup_args: str, speed: str = "30"):
    steps = recorded_steps(name)
    return run_lorasup(tmp_path / "run", "--trainer", "hf", "--grace", "2", *lorasup_args,
                       "--", sys.executable, str(REPLAY), str(RECORDINGS / f"{name}.jsonl"),
                       "--speed", speed, f"--max_steps={steps}")


def chunks(name: str):
    with (RECORDINGS / f"{name}.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            if record["kind"] == "chunk":
                yield record["fd"], base64.b64decode(record["b64"])


def parse_streams(name: str, order: str, steps: int) -> list:
    """A recording's events, each stream through its own splitter, the fds read in ``order``."""
    adapter = HfAdapter(steps)
    recorded = list(chunks(name))
    if order == "stderr_first":
        recorded.sort(key=lambda c: c[0] != 2)
    elif order == "stdout_first":
        recorded.sort(key=lambda c: c[0] != 1)
    splitters = {1: LineSplitter(), 2: LineSplitter()}
    events: list = []
    for fd, data in recorded:
        for line in splitters[fd].feed(data, adapter.needles):
            if line:
                events.extend(adapter.parse(line))
    for splitter in splitters.values():
        events.extend(e for line in splitter.close() if line for e in adapter.parse(line))
    return events


def losses(events) -> dict[int, float]:
    return {e.step: e.loss for e in events if isinstance(e, Step) and e.loss is not None}


# -- the recordings through lorasup ------------------------------------------------------


def test_normal_run_completes_with_per_step_loss_and_lr(tmp_path: Path) -> None:
    result = replay(tmp_path, "hf_normal")
    report = result.report
    assert (report["outcome"], result.returncode) == ("completed", 0), result.stderr[-1500:]
    assert report["steps"]["last"] == 20
    assert "--max_steps=20" in report["command"]
    series = report["series"]
    assert series["step"] == list(range(1, 21))
    assert series["loss"] == NORMAL_LOSS
    assert series["lr"] == NORMAL_LR
    assert series["epoch"] == [1] * 20  # 'epoch': '0.03125' .. '0.625'
    # The train_runtime summary is not a completion marker (the script saves after it).
    assert "finished" not in [e["kind"] for e in result.events()]


def test_loginfo_run_reports_the_checkpoints(tmp_path: Path) -> None:
    result = replay(tmp_path, "hf_normal_loginfo")
    report = result.report
    assert report["outcome"] == "completed", result.stderr[-1500:]
    assert report["series"]["step"] == list(range(1, 21))
    loss = report["series"]["loss"]
    assert (loss[0], loss[9], loss[19]) == (6.224, 4.939, 4.798)
    checkpoints = [(e["path"], e.get("step")) for e in result.events() if e["kind"] == "checkpoint"]
    assert checkpoints == [("../out/hf_normal_loginfo/checkpoint-10", 10),
                           ("../out/hf_normal_loginfo/checkpoint-20", 20)]


BUFFERED_LOSS = [6.224, 6.105, 5.869, 5.727, 5.496, 5.312, 5.164, 5.109, 4.985, 4.917,
                 4.911, 4.88, 4.867, 4.846, 4.826, 4.819, 4.838, 4.789, 4.797, 4.788]


def test_buffered_stdout_never_puts_a_loss_on_the_wrong_step(tmp_path: Path) -> None:
    # All 20 dicts arrive in one chunk at exit, after the bar reached 20: "the last bar
    # frame seen" would give step 20 the first dict's 6.224. Paired by order within each
    # stream, every step gets its own loss, recorded late for the steps already counted.
    report = replay(tmp_path, "hf_normal_buffered", speed="80").report
    assert report["outcome"] == "completed"
    assert report["series"]["step"] == list(range(1, 21))
    assert report["series"]["loss"] == BUFFERED_LOSS


def test_sigterm_recording_is_a_failed_run(tmp_path: Path) -> None:
    report = replay(tmp_path, "hf_sigterm").report
    assert report["outcome"] == "trainer_failed"
    assert report["exit_code"] == 1
    assert report["trainer_returncode"] == -15
    assert report["steps"]["last"] == 11
    loss = report["series"]["loss"]
    assert len(loss) == 11 and (loss[0], loss[10]) == (6.224, 4.918)


def test_nan_loss_is_divergence(tmp_path: Path) -> None:
    # With logging_nan_inf_filter=False step 2 logs 'loss': 'nan' (lr 1e30, sgd, no clip);
    # the default --nan-patience 0 makes that one step divergence: stopped at once.
    result = replay(tmp_path, "hf_nan_nofilter")
    report = result.report
    assert (report["outcome"], result.returncode) == ("diverged", 5)
    assert report["steps"]["last"] in (2, 3)
    assert report["series"]["loss"][:2] == [6.224, "nan"]
    assert [s["reason"] for s in report["signals_sent"]][:1] == ["diverged"]


def test_nan_within_patience_completes(tmp_path: Path) -> None:
    report = replay(tmp_path, "hf_nan_nofilter", "--nan-patience", "20").report
    assert report["outcome"] == "completed"
    assert report["series"]["loss"] == [6.224] + ["nan"] * 9
    assert report["series"]["lr"][:2] == [1e30, 9e29]


def test_accelerate_launch_run_completes(tmp_path: Path) -> None:
    report = replay(tmp_path, "hf_accelerate", speed="40").report
    assert report["outcome"] == "completed"
    assert report["series"]["step"] == list(range(1, 21))
    loss = report["series"]["loss"]
    assert (loss[0], loss[1], loss[9]) == (6.224, 6.106, 4.92)


def test_accelerate_sigint_recording_is_a_failed_run(tmp_path: Path) -> None:
    report = replay(tmp_path, "hf_accelerate_sigint").report
    assert report["outcome"] == "trainer_failed"
    assert report["trainer_returncode"] == -2
    assert report["steps"]["last"] == 10
    assert report["series"]["loss"][9] == 4.91
    # someone else's SIGINT: its traceback and KeyboardInterrupt are the trainer's problem
    assert report["signals_sent"] == []
    assert {p["problem"] for p in report["problems"]} == {"traceback", "exception"}
    assert {p["line"] for p in report["problems"] if p["problem"] == "exception"} == {
        "KeyboardInterrupt"}
    assert not [p for p in report["problems"] if "expected" in p]


def test_evaluation_bar_does_not_shift_the_losses(tmp_path: Path) -> None:
    # Loss and eval_loss equal the step in this synthetic run (logged at 1, 2, 4, 6, 8;
    # evaluated at 3, 6, 9). Its evaluation bar is as wide as the training bar, so only
    # the count of clears tells its closing from a log write.
    result = replay(tmp_path, "synthetic_tqdm_eval", speed="1")
    report = result.report
    assert report["outcome"] == "completed", result.stderr[-1500:]
    series = report["series"]
    by_step = dict(zip(series["step"], series["loss"], strict=True))
    assert {s: v for s, v in by_step.items() if v is not None} == {
        1: 1.0, 2: 2.0, 4: 4.0, 6: 6.0, 8: 8.0}
    assert series["val_loss"]["eval_loss"]["step"] == [3, 6, 9]
    assert series["val_loss"]["eval_loss"]["value"] == [3.0, 6.0, 9.0]


# -- the parser ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hf_normal", "hf_normal_loginfo", "hf_normal_buffered",
                                  "hf_accelerate", "synthetic_tqdm_eval"])
def test_pairing_does_not_depend_on_which_stream_is_read_first(name: str) -> None:
    seen = {order: losses(parse_streams(name, order, recorded_steps(name)))
            for order in ("recorded", "stderr_first", "stdout_first")}
    assert seen["recorded"] == seen["stderr_first"] == seen["stdout_first"]
    if name == "hf_normal":
        assert seen["recorded"] == dict(enumerate(NORMAL_LOSS, start=1))


def test_only_the_bare_bar_with_the_training_total_counts() -> None:
    adapter = HfAdapter(20)
    for line in ("Loading weights: 100%|██████████| 57/57 [00:00<00:00, 20722.49it/s]",
                 "Map:  50%|█████     | 256/512 [00:00<00:00, 5593.92 examples/s]",
                 "Generating train split: 512 examples [00:00, 9001.2 examples/s]",
                 "Tokenizing train dataset: 100%|██████████| 20/20 [00:00<00:00, 99.1it/s]"):
        assert list(adapter.parse(line)) == []
    # A bare bar with another total before training: the script ignored --max_steps.
    (problem,) = adapter.parse(" 50%|█████     | 5/10 [00:05<00:05,  1.01s/it]")
    assert isinstance(problem, Problem) and problem.problem == "bar_total_mismatch"
    assert list(adapter.parse(" 60%|██████    | 6/10 [00:06<00:04,  1.01s/it]")) == []
    (step,) = adapter.parse(" 45%|████▌     | 9/20 [00:19<00:14,  1.34s/it]")
    assert (step.step, step.total, step.loss) == (9, 20, None)
    assert list(adapter.parse(" 45%|████▌     | 9/20 [00:19<00:14,  1.34s/it]")) == []
    assert match_bar("100%|██████████| 20/20 [00:39<00:00,  1.96s/it]") == (20, 20, 47)
    assert match_bar(" 45%|████▌     | 9/2") is None  # a frame cut by a read


def test_glued_checkpoint_line_and_problems() -> None:
    adapter = HfAdapter(20)
    events = list(adapter.parse(" 50%|█████     | 10/20 [00:10<00:09,  1.01it/s][transformers] "
                                "Saving model checkpoint to ../out/x/checkpoint-10"))
    assert events == [Step(step=10, total=20),
                      Checkpoint(path="../out/x/checkpoint-10", step=10)]
    oom = adapter.parse("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB")
    assert "cuda_out_of_memory" in {e.problem for e in oom}


def test_log_dicts_pair_with_the_write_marks_in_order() -> None:
    bar = " {:>2}%|█         | {}/10 [00:01<00:09,  1.00s/it]"
    frame = [bar.format(10 * k, k) for k in range(4)]
    clear = " " * len(frame[1])
    dicts = [f"{{'loss': '{k}.5', 'grad_norm': '1', 'learning_rate': '0.001', "
             f"'epoch': '0.{k}'}}" for k in (1, 2)]
    # stdout ahead of stderr: dicts wait for their write marks
    adapter = HfAdapter(10)
    assert list(adapter.parse(dicts[0])) == []
    assert list(adapter.parse(dicts[1])) == []
    adapter.parse(frame[0])
    adapter.parse(frame[1])
    assert list(adapter.parse(clear)) == []
    (redraw,) = adapter.parse(frame[1])  # the redraw of the same step: no new bar step
    assert (redraw.step, redraw.loss, redraw.lr, redraw.epoch) == (1, 1.5, 0.001, 1)
    # a write while step 2 was not drawn yet (tqdm's mininterval): the redraw shows it
    adapter.parse(clear)
    bar_step, paired = adapter.parse(frame[2])
    assert (bar_step.step, bar_step.loss) == (2, None)
    assert (paired.step, paired.loss) == (2, 2.5)
    # stderr ahead: the write mark waits for its dict
    adapter.parse(" " * len(frame[2]))
    assert [e.step for e in adapter.parse(frame[3])] == [3]
    eval_dict = "{'eval_loss': '0.75', 'eval_runtime': '1.2', 'epoch': '0.3'}"
    assert list(adapter.parse(eval_dict)) == [Scalar(tag="eval_loss", step=3, value=0.75)]
    # a clear of another width (another bar's) is no write mark
    adapter.parse(" " * 7)
    assert list(adapter.parse(frame[3])) == []


def test_log_dict_parsing() -> None:
    trl = parse_log_dict("{'loss': '1.234', 'grad_norm': '0.5', 'learning_rate': '2e-05', "
                         "'entropy': '1.1', 'num_tokens': '2.671e+04', "
                         "'mean_token_accuracy': '0.6125', 'epoch': '0.5'}")
    assert trl == {"loss": 1.234, "grad_norm": 0.5, "learning_rate": 2e-05, "entropy": 1.1,
                   "num_tokens": 26710.0, "mean_token_accuracy": 0.6125, "epoch": 0.5}
    nan = parse_log_dict("{'loss': 'nan', 'grad_norm': 'nan', 'learning_rate': '9e+29', "
                         "'epoch': '0.0625'}")
    assert math.isnan(nan["loss"]) and nan["learning_rate"] == 9e29
    # transformers 4 printed numbers, not strings
    assert parse_log_dict("{'loss': 2.5, 'learning_rate': 5e-05, 'epoch': 0.01}") == {
        "loss": 2.5, "learning_rate": 5e-05, "epoch": 0.01}
    for junk in ("{'lr': 0.1, 'epochs': 3}", "{'loss': '1.0', 'epoch': ", "{'epoch'}",
                 "{'epoch': __import__('os')}", "{" + "'epoch': [" * 5000 + "}",
                 "[transformers] {'epoch': 1}"):
        assert parse_log_dict(junk) is None


_NUMBER_TEXT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.from_regex(r"-?[0-9]{1,4}(\.[0-9]{0,4})?([eE][-+]?[0-9]{1,3})?", fullmatch=True),
    st.sampled_from(["007", "00", "0.", ".5", "1_0", "nan", "True", "None", "-0", "1e",
                     "0x10", "1j", "+1"]),
)
_VALUE_TEXT = st.one_of(
    _NUMBER_TEXT,
    _NUMBER_TEXT.map(lambda text: f"'{text}'"),
    st.text(st.characters(blacklist_characters="\x00\n\r"), max_size=8).map(repr),
    st.text(max_size=8),
)
_KEY_TEXT = st.one_of(st.sampled_from(["loss", "epoch", "learning_rate", "grad_norm"]),
                      st.text(st.characters(blacklist_characters="\x00\n\r"), max_size=6))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(_KEY_TEXT, _VALUE_TEXT), min_size=0, max_size=6), st.booleans())
def test_flat_log_dicts_read_as_literal_eval_reads_them(items: list[tuple[str, str]],
                                                         with_epoch: bool) -> None:
    """The fast reader of flat log dicts gives exactly what literal_eval's path gives, for
    whatever it accepts; the rest still goes to literal_eval."""
    if with_epoch:
        items = [*items, ("epoch", "'0.5'")]
    text = "{" + ", ".join(f"{key!r}: {value}" for key, value in items) + "}"
    expected = hflog._literal_log_dict(text)
    got = parse_log_dict(text)
    if expected is None:
        assert got is None
        return
    assert got is not None and got.keys() == expected.keys()
    for key, value in expected.items():
        assert (math.isnan(value) and math.isnan(got[key])) or (
            got[key] == value and math.copysign(1, got[key]) == math.copysign(1, value))


def test_flat_log_dicts_skip_the_syntax_tree() -> None:
    line = "{'loss': '4.84', 'grad_norm': '0.4234', 'learning_rate': '0.0002', 'epoch': '0.53'}"
    assert hflog._FLAT_DICT.fullmatch(line) is not None
    assert parse_log_dict(line) == {"loss": 4.84, "grad_norm": 0.4234,
                                    "learning_rate": 0.0002, "epoch": 0.53}
    assert hflog._FLAT_DICT.fullmatch("{'loss': 007, 'epoch': 1}") is None  # literal_eval's


@pytest.mark.parametrize(("epoch", "expected"), [
    ("0.03125", 1), ("1", 1), ("1.031", 2), ("2.5", 3), ("12.35", 13), ("1.234e+04", 12340)])
def test_epoch_is_the_epoch_the_step_belongs_to(epoch: str, expected: int) -> None:
    adapter = HfAdapter(5)
    frame = " 20%|██        | 1/5 [00:01<00:04,  1.00s/it]"
    adapter.parse(frame)
    adapter.parse(" " * len(frame))
    adapter.parse(frame)
    (step,) = adapter.parse(f"{{'loss': '1', 'epoch': '{epoch}'}}")
    assert step.epoch == expected


def test_parse_never_raises() -> None:
    adapter = HfAdapter(20)
    for line in ("", " ", "\t", "{", "}", "{'epoch': '1'}", "9" * 5000 + "%|x| 1/20 [s/it]",
                 " 5%|x| " + "9" * 5000 + "/20 [00:01, 1.0s/it]", "\ufffd" * 10):
        list(adapter.parse(line))


# -- the command --------------------------------------------------------------------------


def test_registered() -> None:
    assert isinstance(get_adapter("hf"), HfAdapter)


def test_steps_and_the_injected_max_steps() -> None:
    adapter = HfAdapter()
    with pytest.raises(UsageError):
        adapter.resolve_steps(None, [])
    with pytest.raises(UsageError):
        adapter.resolve_steps(None, ["python", "train.py"])
    with pytest.raises(UsageError):
        adapter.resolve_steps(None, ["python", "train.py", "--max_steps", "-1"])
    assert adapter.resolve_steps(None, ["python", "train.py", "--max_steps", "300"]) == 300
    assert adapter.resolve_steps(7, ["python", "train.py", "--max_steps=300"]) == 7
    spaced = adapter.command(TrainerJob(steps=7, argv=("python", "t.py", "--max_steps", "300",
                                                        "--output_dir", "out"), run_dir="/r"))
    assert spaced == ["python", "t.py", "--output_dir", "out", "--max_steps", "7"]
    assert adapter.total == 7
    plain = HfAdapter().command(TrainerJob(steps=5, argv=("python", "t.py"), run_dir="/r"))
    assert plain == ["python", "t.py", "--max_steps=5"]
    assert HfAdapter().environment() == {}
    assert HfAdapter().output_dirs(TrainerJob(5, ("t.py", "--output_dir=o"), "/r")) == ["o"]


@pytest.mark.parametrize(("argv", "expected"), [
    (("python", "t.py"), None),  # transformers 5 reports to nothing by default
    (("python", "t.py", "--report_to", "wandb", "--logging_dir", "tb"), None),
    (("python", "t.py", "--report_to", "tensorboard", "--logging_dir", "tb"), "tb"),
    (("python", "t.py", "--report_to", "wandb", "tensorboard", "--logging_dir=tb"), "tb"),
    (("python", "t.py", "--report_to=all", "--logging_dir", "tb"), "tb"),
    (("python", "t.py", "--report_to", "tensorboard"), None),
])
def test_tensorboard_dir_without_opting_in(argv, expected, monkeypatch) -> None:
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    assert HfAdapter().tensorboard_dir(TrainerJob(5, argv, "/runs/r")) == expected


def test_tensorboard_dir_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "/tb/env")
    job = TrainerJob(5, ("t.py", "--report_to", "tensorboard", "--logging_dir", "tb"), "/r")
    assert HfAdapter().tensorboard_dir(job) == "/tb/env"


@pytest.mark.parametrize(("argv", "report_to"), [
    (("python", "t.py", "--report_to", "wandb", "--seed", "1"), ["tensorboard"]),
    (("python", "t.py", "--report_to", "none"), ["tensorboard"]),
    (("python", "t.py"), ["tensorboard"]),
    (("python", "t.py", "--report_to", "wandb", "tensorboard"), ["wandb", "tensorboard"]),
])
def test_tensorboard_opt_in(argv, report_to) -> None:
    job = TrainerJob(steps=5, argv=argv, run_dir="/runs/r", options=(("tensorboard", "1"),))
    adapter = HfAdapter()
    command = adapter.command(job)
    assert adapter.tensorboard_dir(job) == "/runs/r/tensorboard"
    at = command.index("--report_to")
    assert command[at + 1:at + 1 + len(report_to)] == report_to
    assert command.count("--report_to") == 1
    assert command[command.index("--logging_dir") + 1] == "/runs/r/tensorboard"
    assert "--max_steps=5" in command
    assert ("--seed" in command) == ("--seed" in argv)
    # transformers 5 takes the folder from the environment only
    assert adapter.environment() == {"TENSORBOARD_LOGGING_DIR": "/runs/r/tensorboard"}
