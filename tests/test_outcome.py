"""The outcome rules as a table (supervisor/outcome.py): no process, every row of the
README's "Outcomes and exit codes" with the facts that lead to it."""

from __future__ import annotations

import re
import signal
from dataclasses import replace
from pathlib import Path

import pytest

from lorasup.supervisor.outcome import EXIT_CODES, RunFacts, decide, stop_expected
from lorasup.trainers.base import AdapterBase

#: a run of 10 steps that got all of them
DONE = RunFacts(returncode=0, last_step=10, final_step=10, steps=10, timeout=60.0,
                no_output_timeout=30.0, finish_timeout=20.0)
#: the same run, stopped at step 4
SHORT = replace(DONE, last_step=4)

CASES = [
    # (name, facts, outcome, exit code, reason pattern)
    ("finished by itself", DONE, "completed", 0, r"^trainer finished all steps$"),
    ("stopped at N", replace(DONE, returncode=-2, stop_reason="step_limit"),
     "completed", 0, r"^stopped at step 10$"),
    ("overshoot after N", replace(DONE, returncode=-2, stop_reason="overshoot"),
     "completed", 0, r"^stopped at step 10$"),
    ("jumped over N", replace(SHORT, returncode=-2, stop_reason="step_limit", jumped=(9, 12)),
     "completed", 0, r"^stopped at step 12: the output jumped from 9 to 12, past the limit"),
    ("past the limit short of it", replace(SHORT, returncode=-2, stop_reason="overshoot"),
     "trainer_failed", 1, r"went past the step limit without reaching it"),
    ("exit 1", replace(SHORT, returncode=1), "trainer_failed", 1, r"^trainer exited with 1$"),
    ("exit 1 at N", replace(DONE, returncode=1), "trainer_failed", 1, r"exited with 1"),
    ("exit 0 short", replace(SHORT, nothing_read="ignored: steps were read"),
     "trainer_failed", 1, r"^trainer exited 0 after 4 of 10 steps$"),
    ("exit 0, nothing read", replace(DONE, last_step=0, nothing_read="no step read in 3"),
     "trainer_failed", 1, r"^trainer exited 0 after 0 of 10 steps: no step read in 3$"),
    ("resumed, exit 0 short",
     replace(DONE, last_step=6, offset=4, final_step=14, steps=10),
     "trainer_failed", 1, r"after 2 of 10 steps"),
    ("resumed, all done", replace(DONE, last_step=14, offset=4, final_step=14),
     "completed", 0, r"finished all steps"),
    ("never started", RunFacts(returncode=None, started=False, spawn_error="could not start"),
     "usage", 2, r"^could not start$"),
    ("never started, no word", RunFacts(returncode=None, started=False),
     "usage", 2, r"^trainer not started$"),
    ("timeout", replace(SHORT, returncode=-2, stop_reason="timeout"),
     "timeout", 3, r"^total time limit of 60s passed$"),
    ("timeout, nothing read",
     replace(DONE, last_step=0, returncode=-2, stop_reason="timeout", nothing_read="no step"),
     "timeout", 3, r"^total time limit of 60s passed: no step$"),
    ("finish timeout", replace(DONE, returncode=-15, stop_reason="finish_timeout"),
     "timeout", 3, r"did not finish within 20s after the last step"),
    ("finish timeout, saved", replace(DONE, returncode=-15, stop_reason="finish_timeout",
                                      finished_marker=True),
     "completed", 0, r"all steps done and saved"),
    ("silent", replace(SHORT, returncode=-9, stop_reason="stalled"),
     "stalled", 4, r"^no output for 30s$"),
    ("silent before the first step", replace(SHORT, returncode=-9, stop_reason="stalled",
                                             silence_reason="no output for 5s before"),
     "stalled", 4, r"^no output for 5s before$"),
    ("no progress", replace(SHORT, returncode=-9, stop_reason="no_progress",
                            no_progress_timeout=12.5),
     "stalled", 4, r"^no new step for 12.5s \(last new step: 4\)$"),
    ("diverged", replace(SHORT, returncode=-2, stop_reason="diverged", nonfinite=3),
     "diverged", 5, r"^non-finite loss at 3 step\(s\)$"),
    ("SIGINT", replace(SHORT, returncode=-2, stop_reason="interrupted",
                       interrupt_signal=signal.SIGINT),
     "interrupted", 130, r"^lorasup received SIGINT$"),
    ("SIGTERM", replace(SHORT, returncode=-15, stop_reason="interrupted",
                        interrupt_signal=signal.SIGTERM),
     "interrupted", 143, r"^lorasup received SIGTERM$"),
    ("SIGHUP", replace(DONE, returncode=0, stop_reason="interrupted",
                       interrupt_signal=signal.SIGHUP),
     "interrupted", 129, r"SIGHUP"),
    ("signalled before the start", RunFacts(returncode=None, started=False,
                                            stop_reason="interrupted",
                                            interrupt_signal=signal.SIGTERM),
     "interrupted", 143, r"^lorasup received SIGTERM before the start$"),
    ("lorasup crashed, trainer stopped",
     replace(SHORT, returncode=-2, internal_error="RuntimeError: x", crash_stopped=True),
     "internal_error", 70, r"^lorasup failed \(RuntimeError: x\); the trainer was stopped$"),
    ("lorasup crashed, no exit status",
     replace(SHORT, returncode=None, internal_error="RuntimeError: x"),
     "internal_error", 70, r"lorasup failed"),
    ("guard frozen, trainer ended by itself",
     replace(DONE, returncode=None, guard_fault="the guard was stopped"),
     "internal_error", 70, r"^the guard was stopped; the trainer's exit status is unknown$"),
    ("preempted (SIGUSR1)", replace(SHORT, returncode=-2, stop_reason="preempted",
                                    interrupt_signal=signal.SIGUSR1),
     "preempted", 6, r"SIGUSR1 .*final save: requeue to continue"),
    ("preempted before the start", replace(SHORT, returncode=None, started=False,
                                           stop_reason="preempted"),
     "preempted", 6, r"SIGUSR1"),
    ("preempted after the last step saved", replace(DONE, stop_reason="preempted"),
     "completed", 0, r"^trainer finished all steps$"),
    ("guard frozen, stop requested",
     replace(DONE, returncode=None, guard_fault="frozen", stop_reason="step_limit"),
     "completed", 0, r"stopped at step 10"),
]


@pytest.mark.parametrize(("facts", "outcome", "code", "reason"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_the_outcome_table(facts: RunFacts, outcome: str, code: int, reason: str) -> None:
    decided = decide(facts)
    assert (decided.outcome, decided.exit_code) == (outcome, code)
    assert re.search(reason, decided.reason), decided.reason


def test_the_exit_codes_are_the_readmes() -> None:
    """Every row of the README's table is the code the rules give."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Outcomes and exit codes", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| (\w+) \|.*\| ([\d /]+|—) \|$", section, re.MULTILINE))
    for outcome, code in EXIT_CODES.items():
        assert rows[outcome] == str(code), outcome
    assert rows["interrupted"] == "130 / 143 / 129"
    decided = {outcome for _, _, outcome, _, _ in CASES}  # the table covers every outcome
    assert decided == set(EXIT_CODES) | {"interrupted"}
    assert set(rows) - decided == {"lost"}  # lost is no exit code: no run decides it


class _Python(AdapterBase):
    name = "test"


@pytest.mark.parametrize(("sigint_sent", "problem", "line", "expected"), [
    (True, "exception", "KeyboardInterrupt", True),
    (True, "traceback", "Traceback (most recent call last):", True),  # its end will say
    (True, "exception", "RuntimeError: boom", False),
    (True, "cuda_out_of_memory", "CUDA out of memory", False),
    (False, "exception", "KeyboardInterrupt", False),  # not ours: a problem
    (False, "traceback", "Traceback (most recent call last):", False),
])
def test_a_line_after_our_sigint_is_the_stop_as_the_adapter_says(
        sigint_sent: bool, problem: str, line: str, expected: bool) -> None:
    assert stop_expected(_Python(), sigint_sent, problem, line) is expected


def test_an_adapter_with_its_own_rule_is_asked() -> None:
    class Quiet(AdapterBase):
        name = "quiet"

        def expected_exit(self, problem: str, line: str) -> bool | None:
            return line == "stopping on request"

    assert stop_expected(Quiet(), True, "exception", "stopping on request")
    assert not stop_expected(Quiet(), True, "exception", "KeyboardInterrupt")
