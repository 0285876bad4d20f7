"""Output that skips over N (issue 17, item 2): the first step past N right after one below
it counts as reaching N; the record never holds a step past N; the run is completed and
says where the stop came and why.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lorasup.supervisor.events import Note, Rejected, Step
from lorasup.supervisor.gate import StepGate
from tests.support import run_lorasup


def gate(limit: int = 40) -> tuple[StepGate, list[str], list[int]]:
    stops: list[str] = []
    limits: list[int] = []
    g = StepGate(limit, stop_at_limit=True, on_stop=stops.append,
                 on_limit=lambda: limits.append(1))
    return g, stops, limits


def test_a_jump_over_n_reaches_n_with_a_note() -> None:
    g, stops, limits = gate()
    assert isinstance(g.admit(Step(step=37, loss=0.5)), Step)
    note = g.admit(Step(step=41, loss=0.4))
    assert isinstance(note, Note)
    assert note.message.startswith("stopped at step 41: the output jumped from 37 to 41")
    assert g.reached and g.jumped == (37, 41) and g.last == 37
    assert stops == ["step_limit"] and limits == [1]
    assert g.admit(Step(step=41, loss=0.3)) is None  # a redraw of it: nothing
    assert isinstance(g.admit(Step(step=42)), Rejected)  # later ones: past N as ever
    assert g.rejected == 1


def test_a_first_step_past_n_is_an_overshoot_not_a_jump() -> None:
    """Nothing admitted yet: a bar of something else, or a resume nobody announced."""
    g, stops, _ = gate()
    assert isinstance(g.admit(Step(step=500)), Rejected)
    assert stops == ["overshoot"] and not g.reached and g.jumped is None


def test_after_n_was_reached_a_step_past_it_is_rejected() -> None:
    g, stops, _ = gate(5)
    for k in range(1, 6):
        g.admit(Step(step=k))
    assert isinstance(g.admit(Step(step=9)), Rejected)
    assert g.jumped is None and stops[0] == "step_limit"


def test_a_jump_counts_from_the_resume_point() -> None:
    g, _, _ = gate(10)
    g.resume(100)
    assert g.admit(Step(step=105)) is not None
    note = g.admit(Step(step=112))
    assert isinstance(note, Note) and g.jumped == (105, 112)
    assert "past the limit of 110" in note.message


def test_a_plain_program_skipping_over_n_completes(tmp_path: Path) -> None:
    """Even a program whose own lines skip (``step 8``, ``step 12``) ends completed at N = 10."""
    program = ("import time\n"
               "for k in (2, 4, 6, 8, 12, 14):\n"
               "    print(f'step {k} loss={1 / k:.4f}', flush=True)\n"
               "    time.sleep(0.05)\n"
               "time.sleep(30)\n")
    finished = run_lorasup(tmp_path / "run", "--trainer", "command", "--steps", "10",
                           "--grace", "5", "--", sys.executable, "-c", program)
    report = finished.report
    assert finished.returncode == 0, report["reason"]
    assert report["outcome"] == "completed"
    assert report["reason"] == ("stopped at step 12: the output jumped from 8 to 12, past the "
                                "limit of 10")
    assert report["series"]["step"] == [2, 4, 6, 8]
    assert finished.seconds < 25  # stopped at the jump, not after the program's sleep
