"""``POST /jobs/<id>/extend``: "add N steps" to a finished job, as a new job that continues
it from its newest save, by the one resume rule the daemon's retries use
(``jobspec.resumed`` → ``AdapterBase.resume``). Never a silent fresh start: a job with
nothing to continue from is refused, saying why.
"""

from __future__ import annotations

from typing import Any

from lorasup.supervisor.serve import jobspec
from lorasup.supervisor.serve.errors import ApiError
from lorasup.supervisor.serve.store import JobRow


def steps_bounds() -> tuple[int, int]:
    """The bounds of a job's ``steps`` (config.py), which the added steps keep to."""
    from lorasup.supervisor.config import MAX_STEPS

    return 1, MAX_STEPS


def check_steps(value: Any) -> int:
    """The ``steps`` of an extend request, or ApiError(400)."""
    low, high = steps_bounds()
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"invalid steps: a whole number from {low} to {high}")
    return value


def new_target(job: JobRow, steps: int) -> int:
    """The continued job's total step: the old target plus ``steps``; ApiError(409) for a
    job that is not finished well enough to continue (a failure is retried, not extended)."""
    if job.broken:
        raise ApiError(409, f"job {job.id} cannot be read back; it cannot be continued")
    preempted = job.state == "failed" and job.outcome == "preempted"
    if job.state not in ("completed", "cancelled") and not preempted:
        what = job.state if job.state != "failed" else f"failed ({job.outcome})"
        raise ApiError(409, f"job {job.id} is {what}: only a completed, cancelled or "
                            "preempted job can be continued")
    old = job.target_step or job.spec.steps
    high = steps_bounds()[1]
    if old + steps > high:
        raise ApiError(400, f"invalid steps: job {job.id} would run {old + steps} steps in "
                            f"all, more than {high}")
    return old + steps


def continued_values(job: JobRow, steps: int, target: int) -> tuple[dict[str, Any], str]:
    """(the new job's values for ``jobspec.parse``, its name): the old job's file as the
    trainer's adapter continues it to ``target``; ApiError(409) where it cannot. Reads the
    output folders: blocking, call from a thread."""
    from lorasup.trainers import get_adapter
    from lorasup.trainers.base import AdapterBase, UsageError

    trainer = job.spec.trainer
    try:
        adapter = get_adapter(trainer)
    except UsageError as exc:
        raise ApiError(409, f"job {job.id} cannot be continued: {exc}") from None
    if type(adapter).resume is AdapterBase.resume:
        raise ApiError(409, f"job {job.id} cannot be continued: the {trainer} trainer cannot "
                            "resume from a checkpoint")
    if job.saved_step <= 0:
        raise ApiError(409, f"job {job.id} cannot be continued: lorasup recorded no "
                            "checkpoint of it, so there is nothing to continue from")
    found = jobspec.resumed(job.spec.values, trainer, target_step=target,
                            saved_step=job.saved_step, output_dirs=job.spec.output_dirs)
    if found is None:
        raise ApiError(409, f"job {job.id} cannot be continued: its save (step "
                            f"{job.saved_step}) is not in its output folders any more")
    values = dict(found[0])
    values["gpus"] = job.spec.gpus
    values["retries"] = job.spec.retries
    if job.spec.notify:
        values["notify"] = dict(job.spec.notify)
    if job.spec.logs_dir:  # a run_dir of its own is the old job's: the daemon names one
        values["logs_dir"] = job.spec.logs_dir
    suffix = f"+{steps}"
    return values, job.name[:jobspec.MAX_NAME - len(suffix)] + suffix
