"""Pure decisions of the daemon: which job starts on which slot, and whether a failed
attempt is tried again. No processes, no I/O: unit-tested on plain values.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

#: outcomes a new attempt can cure (a hang, a time limit, a restart of the daemon)
RETRYABLE = frozenset({"stalled", "timeout", "interrupted"})
#: never retried: the same job would fail the same way
NEVER = frozenset({"usage", "diverged", "completed"})
#: lines of a trainer's problems that show a transient cause (NCCL/collective timeouts)
TRANSIENT_LINE = re.compile(
    r"NCCL.*(?:timeout|timed out)|collective operation timeout|Watchdog caught collective"
    r"|ECC error|uncorrectable", re.IGNORECASE)


@dataclass(frozen=True)
class Slot:
    """Where one job runs: a GPU (``devices`` = its index) or a CPU slot (no devices)."""

    name: str
    devices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Waiting:
    """A queued job as the scheduler sees it."""

    id: int
    priority: int
    gpus: int
    not_before: float = 0.0


def order(jobs: Iterable[Waiting]) -> list[Waiting]:
    """Higher priority first; first come, first served within one priority."""
    return sorted(jobs, key=lambda j: (-j.priority, j.id))


def slots_needed(job: Waiting, gpu_mode: bool) -> int:
    return max(job.gpus, 1) if gpu_mode else 1


def assign(queued: Iterable[Waiting], free: Sequence[Slot], now: float, *,
           gpu_mode: bool) -> list[tuple[int, tuple[Slot, ...]]]:
    """Jobs to start now and their slots.

    In order; a job backing off (``not_before`` in the future) lets the next one pass, but
    a job that needs more slots than are free holds the line (no starvation of a job that
    asks for several GPUs). A job never gets a slot another job holds: only ``free`` slots
    are handed out.
    """
    left = list(free)
    starts: list[tuple[int, tuple[Slot, ...]]] = []
    for job in order(queued):
        if job.not_before > now:
            continue
        need = slots_needed(job, gpu_mode)
        if need > len(left):
            break
        taken, left = tuple(left[:need]), left[need:]
        starts.append((job.id, taken))
    return starts


def reasons(queued: Iterable[Waiting], free: Sequence[Slot], now: float, *,
            gpu_mode: bool) -> dict[int, str]:
    """Why each queued job that ``assign`` does not start waits, in ``ps``'s words: the
    first that does not fit has ``no free GPU`` (or how many it needs), the ones behind it
    ``after job <id>``. A job backing off is left out (its time is told on listing)."""
    left = len(free)
    kind = "GPU" if gpu_mode else "slot"
    holder: int | None = None
    out: dict[int, str] = {}
    for job in order(queued):
        if job.not_before > now:
            continue
        need = slots_needed(job, gpu_mode)
        if holder is not None:
            out[job.id] = f"after job {holder}"
        elif need > left:
            holder = job.id
            out[job.id] = f"no free {kind}" if need == 1 else (
                f"needs {need} {kind}s, {left} free")
        else:
            left -= need
    return out


def transient(outcome: str | None, returncode: int | None, signalled: bool,
              problem_lines: Sequence[str]) -> bool:
    """A trainer failure another attempt may cure: killed by the kernel (host OOM killer:
    SIGKILL that lorasup did not send) or a collective/NCCL timeout."""
    if outcome != "trainer_failed":
        return False
    if returncode in (-9, 137) and not signalled:
        return True
    return any(TRANSIENT_LINE.search(line) for line in problem_lines)


def should_retry(outcome: str | None, *, transient_failure: bool, retries_used: int,
                 retries: int) -> bool:
    """Retry only where a new attempt can help, and only as often as the job allows."""
    if retries_used >= retries or outcome in NEVER:
        return False
    return outcome in RETRYABLE or (outcome == "trainer_failed" and transient_failure)


def backoff(attempt: int, base: float, cap: float = 600.0) -> float:
    """Seconds to wait before retry number ``attempt`` (1, 2, ...): doubling, capped."""
    return min(base * 2 ** max(attempt - 1, 0), cap)


@dataclass(frozen=True)
class AttemptEnd:
    """What becomes of a job when one of its attempts ends."""

    state: str
    outcome: str | None
    reason: str | None
    retries_used: int
    not_before: float = 0.0

    def fields(self) -> dict[str, Any]:
        return {"state": self.state, "outcome": self.outcome, "reason": self.reason,
                "retries_used": self.retries_used, "not_before": self.not_before}


def after_attempt(outcome: str | None, reason: str | None, *, stop_request: str | None,
                  returncode: int | None, transient_failure: bool, retries_used: int,
                  retries: int, backoff_base: float, now: float) -> AttemptEnd:
    """The job's next state: ``outcome`` is the run's (None: its supervisor ended without
    writing one), ``stop_request`` what the daemon asked for (cancel, daemon_stop)."""
    if stop_request == "cancel":
        return AttemptEnd("cancelled", "cancelled", "cancelled by request", retries_used)
    if outcome == "completed":
        return AttemptEnd("completed", "completed", reason, retries_used)
    if stop_request == "daemon_stop" and outcome in (None, "interrupted"):
        # The daemon's own stop is not the job's failure: no retry is used up.
        return AttemptEnd("queued", None, "re-queued: the daemon was stopped", retries_used)
    if outcome is None:
        why = (f"the run's supervisor ended without an outcome (exit {returncode})"
               if returncode is not None else "the run's supervisor is gone (no outcome)")
        if should_retry("interrupted", transient_failure=False, retries_used=retries_used,
                        retries=retries):
            return AttemptEnd("queued", None, f"retry: {why}", retries_used + 1,
                              now + backoff(retries_used + 1, backoff_base))
        return AttemptEnd("lost", "interrupted", why, retries_used)
    if should_retry(outcome, transient_failure=transient_failure, retries_used=retries_used,
                    retries=retries):
        return AttemptEnd("queued", None, f"retry after {outcome}", retries_used + 1,
                          now + backoff(retries_used + 1, backoff_base))
    return AttemptEnd("failed", outcome, reason, retries_used)
