"""From a validated job to a run plan: adapter, step count, argv, run directory.

Every check that can refuse a job happens here, before a process is started, and each
refusal is one line for the user (exit code 2). A run directory that already holds a
run is never written over.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lorasup.supervisor.config import Job
from lorasup.supervisor.plan import RunPlan, new_run_id
from lorasup.supervisor.resume import Record, nothing_left, read_record, write_marker
from lorasup.supervisor.rundir import claim_run_dir
from lorasup.trainers import get_adapter
from lorasup.trainers.base import Adapter, Resume, TrainerJob, UsageError


def _check_program(argv: list[str], cwd: Path) -> None:
    program = argv[0]
    if os.sep in program:
        path = Path(program)
        path = path if path.is_absolute() else cwd / path
        if not path.is_file():
            raise UsageError(f"trainer program not found: {program}")
        if not os.access(path, os.X_OK):
            raise UsageError(f"trainer program is not executable: {program}")
    elif shutil.which(program) is None:
        raise UsageError(f"trainer program not found on PATH: {program}")


def _run_dir_path(job: Job, run_id: str, cwd: Path) -> Path:
    run_dir = job.run_dir if job.run_dir is not None else job.logs_dir / run_id
    return run_dir if run_dir.is_absolute() else cwd / run_dir


def _resumed(job: Job, adapter: Adapter, steps: int, cwd: Path, resume_from: Path
             ) -> tuple[Job, int, Record, int, Resume | None]:
    """The job as an attempt that continues ``resume_from`` (``--resume-from``): its trainer
    args, options and step limit from the adapter's rule; the record, total and resume."""
    record = read_record(resume_from)
    target = record.target_step or steps
    probe = TrainerJob(steps=steps, argv=tuple(job.trainer_argv), run_dir="",
                       options=job.options.as_pairs())
    folders = [str(p if Path(p).is_absolute() else cwd / p) for p in adapter.output_dirs(probe)]
    resume = adapter.resume(probe, target_step=target, saved_step=record.saved_step,
                            output_dirs=folders, cwd=cwd)
    done = nothing_left(record, target, resume)
    if done is not None:
        raise UsageError(done)
    if resume is None:
        # Nothing saved yet (or a trainer that cannot continue): all the steps, fresh.
        return job.model_copy(update={"steps": target}), target, record, target, None
    options = job.options.model_copy(update=dict(resume.options))
    limit = resume.steps if resume.steps is not None else target
    update = {"trainer_argv": resume.argv, "options": options, "steps": limit}
    return job.model_copy(update=update), limit, record, target, resume


def plan_run(job: Job, *, progress_tty: bool = False,
             resume_from: Path | None = None) -> tuple[RunPlan, Adapter]:
    """Resolve the job; raises UsageError (nothing started, nothing written) when it can't run.

    ``resume_from``: an earlier attempt's run directory to continue (see resume.py)."""
    adapter = get_adapter(job.trainer)
    cwd = (job.cwd or Path.cwd()).resolve()
    steps = adapter.resolve_steps(job.steps, list(job.trainer_argv))
    resumed: tuple[Record, int, Resume | None] | None = None
    if resume_from is not None:
        job, steps, record, target, resume = _resumed(job, adapter, steps, cwd, resume_from)
        resumed = (record, target, resume)
    if job.parse and not adapter.accepts_parse_table:
        raise UsageError(f"a [parse] table is read by --trainer command only; --trainer "
                         f"{job.trainer} reads its own output")
    generated = job.run_id is None and job.run_dir is None
    for _attempt in range(8):
        run_id = job.run_id or (
            job.run_dir.name if job.run_dir is not None else new_run_id(job.trainer)
        )
        run_dir = _run_dir_path(job, run_id, cwd)
        if generated and os.path.lexists(run_dir):
            continue  # a generated id is never reused, even one taken a moment ago
        trainer_job = TrainerJob(steps=steps, argv=tuple(job.trainer_argv),
                                 run_dir=str(run_dir),
                                 options=job.options.as_pairs(),
                                 parse=tuple(job.parse.items()))
        argv = adapter.argv_for(trainer_job)
        if not argv:
            raise UsageError("the trainer command is empty")
        _check_program(argv, cwd)
        adapter.preflight(trainer_job, cwd)  # the trainer's inputs; raises UsageError
        # Claimed last: a job refused above leaves nothing behind.
        claim_run_dir(run_dir, private=job.private)
        if resumed is not None:
            try:
                write_marker(run_dir, *resumed)
            except OSError as exc:
                raise UsageError(f"cannot write {run_dir}: {exc.strerror or exc}") from None
        break
    else:
        raise UsageError(f"could not find a free run id under {job.logs_dir}")
    tb_dir = adapter.tensorboard_dir(trainer_job)
    plan = RunPlan(
        run_id=run_id,
        run_dir=run_dir,
        trainer=job.trainer,
        argv=argv,
        steps=steps,
        timeout=job.effective_timeout(steps),
        no_output_timeout=job.no_output_timeout,
        startup_timeout=job.startup_timeout,
        no_progress_timeout=job.no_progress_timeout,
        grace=job.grace,
        finish_timeout=job.finish_timeout,
        nan_patience=job.nan_patience,
        cwd=cwd,
        output_dirs=tuple(Path(p) for p in adapter.output_dirs(trainer_job)),
        progress_tty=progress_tty,
        tensorboard_dir=Path(tb_dir) if tb_dir else None,
    )
    return plan, adapter

