"""Real tqdm, rich and Keras output (tests/data/bars, see its README) replayed as a real
child of ``lorasup start --trainer command``: the steps and losses the libraries drew are
the ones recorded, a bar that skips over N ends ``completed`` at the jump, and a run with
nothing read says why.

The values below are read off the recordings (``python tests/data/bars/programs/show.py FILE``); the
loops that made them print 1/k as the loss of step k (tqdm's postfix: 3 significant
digits; the others: 4 decimals).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lorasup.trainers import get_adapter
from tests.support import HERE, REPLAY, run_lorasup

RECORDINGS = HERE / "data" / "bars"


def _tqdm(k: int) -> float:
    return float(f"{1 / k:.3g}")


def _fixed(k: int) -> float:
    return round(1 / k, 4)


# name: (--steps, replay speed, {step: loss} the run records)
CASES = {
    "tqdm_loop": (30, 4, {k: _tqdm(k) for k in range(1, 31)}),
    "tqdm_nodesc": (12, 4, {k: _tqdm(k) for k in range(1, 13)}),
    "tqdm_nested": (24, 4, {k: _fixed(k) for k in range(1, 25)}),
    "tqdm_miniters": (30, 2, {k: _fixed(k) for k in (4, 8, 12, 16, 20, 24, 28, 30)}),
    "rich_tty_compatible": (20, 4, {k: _fixed(k) for k in range(1, 21)}),
    # rich into a plain pipe: nothing until the last frame, printed at exit
    "rich_pipe": (20, 4, {20: 0.05}),
    # two tasks, the steps task reset each epoch right after its 6th step: 6/6 and 12/12
    # are never drawn, the next epoch counts on from 6 and 12
    "rich_two_tasks": (18, 4, {k: _fixed(k) for k in range(1, 19) if k not in (6, 12)}),
    # Keras 3 redraws every 0.05 s at most: batches 1, 4, 10 of each 10-batch epoch
    "keras_fit": (20, 20, {1: 2.2235, 4: 2.4328, 10: 1.8248, 11: 0.7555, 20: 1.4271}),
    "dict_lines": (20, 2, {k: round(2 / k, 5) for k in range(1, 21)}),
}


def replay(tmp_path: Path, name: str, steps: int, speed: float):
    return run_lorasup(tmp_path / "run", "--trainer", "command", "--steps", str(steps),
                       "--grace", "5", "--", sys.executable, str(REPLAY),
                       str(RECORDINGS / f"{name}.jsonl"), "--speed", str(speed))


def recorded(finished) -> dict[int, float | None]:
    """step → the loss of the last step event admitted for it (as the report takes it)."""
    out: dict[int, float | None] = {}
    for event in finished.events():
        if event["kind"] == "step":
            out[event["step"]] = event.get("loss")
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_recordings_read_to_the_steps_and_losses_drawn(tmp_path: Path, name: str) -> None:
    steps, speed, want = CASES[name]
    finished = replay(tmp_path, name, steps, speed)
    report = finished.report
    assert report["outcome"] == "completed", (report["reason"], finished.stderr[-2000:])
    assert recorded(finished) == want
    assert report["steps"]["recorded"] == len(want)
    assert max(e["step"] for e in finished.events() if e["kind"] == "step") <= steps


def test_a_bar_that_skips_over_n_stops_at_the_jump_and_says_so(tmp_path: Path) -> None:
    """tqdm with miniters=4 draws 8 then 12: with N = 10 the stop comes at 12, completed."""
    finished = replay(tmp_path, "tqdm_miniters", 10, 2)
    report = finished.report
    assert finished.returncode == 0
    assert report["outcome"] == "completed"
    assert report["reason"] == ("stopped at step 12: the output jumped from 8 to 12, past the "
                                "limit of 10")
    assert recorded(finished) == {4: 0.25, 8: 0.125}  # never a step past N
    assert any("jumped from 8 to 12" in note for note in report["notes"])
    assert report["signals_sent"][0]["reason"] == "step_limit"


def test_a_run_with_nothing_read_says_why_in_one_line(tmp_path: Path) -> None:
    program = ("import sys\n"
               "for i in range(25): print(f'batch {i}: loss 0.5 token=hf_abcdefghijklmnopqrstuv"
               "wxyz0123', flush=True)\n")
    finished = run_lorasup(tmp_path / "run", "--trainer", "command", "--steps", "10", "--",
                           sys.executable, "-c", program)
    report = finished.report
    assert report["outcome"] == "trainer_failed"
    reason = report["reason"]
    assert "\n" not in reason
    assert reason.startswith("trainer exited 0 after 0 of 10 steps: no step read in 25 line(s) "
                             "of output (0 matched); the first: 'batch 0: loss 0.5 token=")
    assert "hf_abcdefghijklmnopqrstuvwxyz0123" not in reason  # redacted
    assert "'batch 2: " in reason and "'batch 3: " not in reason
    assert "[parse]" in reason and "README.md#any-program---trainer-command" in reason


def test_rich_is_told_to_draw_live_under_the_command_adapter_only(tmp_path: Path) -> None:
    program = "import os; print('TTY_COMPATIBLE=' + os.environ.get('TTY_COMPATIBLE', '-'))"
    finished = run_lorasup(tmp_path / "run", "--trainer", "command", "--steps", "1", "--",
                           sys.executable, "-c", program)
    assert "TTY_COMPATIBLE=1" in (tmp_path / "run" / "trainer.log").read_text()
    assert finished.report["outcome"] == "trainer_failed"
    for name in ("kohya", "diffusers", "hf", "native", "builtin"):
        # their rich log layout (kohya's records) must not change
        assert "TTY_COMPATIBLE" not in get_adapter(name).environment()


def test_a_run_stopped_by_its_time_limit_with_nothing_read_says_why(tmp_path: Path) -> None:
    program = ("import time\n"
               "for i in range(1000):\n"
               "    print(f'epoch=1 batch={i} L=0.5', flush=True)\n"
               "    time.sleep(0.05)\n")
    finished = run_lorasup(tmp_path / "run", "--trainer", "command", "--steps", "10",
                           "--timeout", "1.5", "--grace", "5", "--",
                           sys.executable, "-c", program)
    report = finished.report
    assert report["outcome"] == "timeout"
    assert report["reason"].startswith("total time limit of 1.5s passed: no step read in ")
    assert "the first: 'epoch=1 batch=0 L=0.5', 'epoch=1 batch=1 L=0.5'" in report["reason"]
