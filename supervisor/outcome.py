"""The outcome rules: how a run's end becomes an outcome, an exit code and a reason.

A pure function of :class:`RunFacts` (what the orchestrator knows once the trainer is
gone), so that every rule can be tested as a table, without a process. The README's
"Outcomes and exit codes" is this module's table. The one rule about lines a trainer
prints after lorasup's own SIGINT (the stop, not a problem) is here too, asked of the
adapter (:meth:`AdapterBase.expected_exit`).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import NamedTuple, Protocol

#: outcome → exit code (interrupted depends on the signal: 130 SIGINT, 143 SIGTERM)
EXIT_CODES = {
    "completed": 0,
    "trainer_failed": 1,
    "usage": 2,
    "timeout": 3,
    "stalled": 4,
    "diverged": 5,
    # SIGUSR1, the scheduler's "time is nearly up": saved and stopped, requeue it
    "preempted": 6,
    "internal_error": 70,
}


class Decision(NamedTuple):
    outcome: str
    exit_code: int
    reason: str


@dataclass(frozen=True, slots=True)
class RunFacts:
    """What the outcome depends on, gathered when the trainer is gone."""

    #: the trainer's exit status; None when it never ran or its guard could not tell
    returncode: int | None
    #: the first stop request's reason (``interrupted``, ``timeout``, ``step_limit``...)
    stop_reason: str | None = None
    #: whether a trainer was spawned at all
    started: bool = True
    #: the guard's own fault (frozen, stopped) when it could not tell the exit status
    guard_fault: str | None = None
    #: the signal that interrupted lorasup itself
    interrupt_signal: signal.Signals | None = None
    spawn_error: str | None = None
    #: a fault of lorasup's own, and whether it made lorasup stop a running trainer
    internal_error: str | None = None
    crash_stopped: bool = False
    #: the gate: the last step admitted, the resume offset, the final step N
    last_step: int = 0
    offset: int = 0
    final_step: int = 0
    #: the steps requested of this attempt
    steps: int = 0
    #: (last step, first step seen past N) when the output jumped over N
    jumped: tuple[int, int] | None = None
    #: the trainer printed its completion marker
    finished_marker: bool = False
    #: steps with a non-finite loss
    nonfinite: int = 0
    #: what the silence watchdog saw when it fired
    silence_reason: str | None = None
    #: why no step was read (``no step read in 12 line(s) ...``), said when none was
    nothing_read: str = ""
    timeout: float = 0.0
    no_output_timeout: float = 0.0
    finish_timeout: float = 0.0
    no_progress_timeout: float | None = None


def _nothing_read(facts: RunFacts) -> str:
    """``: no step read in 523 line(s) of output ...`` when no step was read, else ""."""
    if facts.last_step != facts.offset or not facts.nothing_read:
        return ""
    return ": " + facts.nothing_read


def decide(facts: RunFacts) -> Decision:
    """The outcome of a run; the first stop reason decides, then the exit status."""
    returncode, reason = facts.returncode, facts.stop_reason
    if facts.crash_stopped or (facts.internal_error and returncode is None):
        return Decision("internal_error", EXIT_CODES["internal_error"], (
            f"lorasup failed ({facts.internal_error}); the trainer was stopped"))
    if returncode is None and reason == "interrupted" and not facts.started:
        sig = facts.interrupt_signal or signal.SIGINT
        return Decision("interrupted", 128 + int(sig),
                        f"lorasup received {sig.name} before the start")
    if reason == "preempted" and not (
            returncode == 0 and facts.last_step >= facts.final_step):
        # SIGUSR1 (time nearly up) is "preempted" unless the job got done meanwhile
        return Decision("preempted", EXIT_CODES["preempted"], (
            "lorasup received SIGUSR1 (the scheduler's time limit is near); the trainer "
            "was stopped with its final save: requeue to continue"))
    guard_fault = facts.guard_fault if facts.started else None
    if returncode is None and guard_fault is None:
        return Decision("usage", EXIT_CODES["usage"], facts.spawn_error or "trainer not started")
    if returncode is None and reason is None:
        # The trainer ended by itself, and how is unknown: never guessed as completed.
        return Decision("internal_error", EXIT_CODES["internal_error"], (
            f"{guard_fault}; the trainer's exit status is unknown"))
    done = facts.last_step >= facts.final_step or facts.jumped is not None
    if reason == "interrupted":
        sig = facts.interrupt_signal or signal.SIGINT
        return Decision("interrupted", 128 + int(sig), f"lorasup received {sig.name}")
    if reason == "no_progress":
        return Decision("stalled", EXIT_CODES["stalled"], (
            f"no new step for {facts.no_progress_timeout:g}s "
            f"(last new step: {facts.last_step})"))
    if reason in ("timeout", "stalled", "diverged"):
        return Decision(reason, EXIT_CODES[reason], {
            "timeout": f"total time limit of {facts.timeout:g}s passed" + _nothing_read(facts),
            "stalled": facts.silence_reason or f"no output for {facts.no_output_timeout:g}s",
            "diverged": f"non-finite loss at {facts.nonfinite} step(s)",
        }[reason])
    if reason == "finish_timeout":
        if done and facts.finished_marker:
            return Decision("completed", 0,
                            "all steps done and saved; stopped after finish timeout")
        return Decision("timeout", EXIT_CODES["timeout"], (
            f"trainer did not finish within {facts.finish_timeout:g}s after the last step"))
    if reason in ("step_limit", "overshoot"):
        if facts.jumped is not None:
            before, after = facts.jumped
            return Decision("completed", 0, (
                f"stopped at step {after}: the output jumped from {before} to {after}, "
                f"past the limit of {facts.final_step}"))
        if done:
            return Decision("completed", 0, f"stopped at step {facts.final_step}")
        return Decision("trainer_failed", 1,
                        "trainer went past the step limit without reaching it")
    if returncode != 0:
        return Decision("trainer_failed", 1, f"trainer exited with {returncode}")
    if not done:
        return Decision("trainer_failed", 1, (
            f"trainer exited 0 after {facts.last_step - facts.offset} of "
            f"{facts.steps} steps" + _nothing_read(facts)))
    return Decision("completed", 0, "trainer finished all steps")


class ExitRule(Protocol):
    """The adapter's rule (``AdapterBase.expected_exit``)."""

    def expected_exit(self, problem: str, line: str) -> bool | None: ...


def stop_expected(adapter: ExitRule, sigint_sent: bool, problem: str, line: str) -> bool:
    """Whether a problem line is the trainer being stopped by lorasup's own SIGINT (its
    ``KeyboardInterrupt`` traceback), not a problem: only after that SIGINT, and as the
    adapter says; a traceback's first line (the adapter cannot tell yet) counts as the
    stop, its exception line decides in the report."""
    return sigint_sent and adapter.expected_exit(problem, line) is not False
