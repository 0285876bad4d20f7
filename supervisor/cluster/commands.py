"""The cluster commands of the ``lorasup`` CLI (``sbatch``, ``status --slurm``): thin
wrappers over ``slurm.py``; registered by ``cli.py``. Nothing here is imported by
``lorasup --help`` beyond typer."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from lorasup.supervisor.defaults import DEFAULT_LOGS_DIR

USAGE_EXIT = 2


def _fail(message: str) -> typer.Exit:
    typer.echo(f"lorasup: error: {message}", err=True)
    return typer.Exit(USAGE_EXIT)


def sbatch(
    ctx: typer.Context,
    job_file: Annotated[Path, typer.Argument(metavar="JOB.toml", help="the lorasup job file")],
    warn: Annotated[int, typer.Option(
        metavar="S", help="SIGUSR1 this many seconds before the time limit: lorasup stops "
                          "with the final save and the job is requeued [default: 300]")] = 300,
    max_restarts: Annotated[int, typer.Option(
        metavar="N", help="requeues after preempted/stalled/timeout, at most [default: 3]")
    ] = 3,
    logs_dir: Annotated[Path, typer.Option(
        metavar="DIR", help="where the attempts' run directories (slurm-<jobid>-<restart>) "
                            "and the job's output go [default: training_logs]",
        show_default=False)] = DEFAULT_LOGS_DIR,
    print_only: Annotated[bool, typer.Option(
        "--print", help="show the batch script instead of submitting it")] = False,
) -> None:
    """Submit a job file to SLURM with lorasup as its entrypoint (sbatch options after '--')."""
    from lorasup.supervisor.cluster import slurm

    options = list(ctx.args)
    try:
        job = slurm.batch_job(job_file, logs_dir, warn_s=warn, max_restarts=max_restarts,
                              options=options)
        script = slurm.render(job)
        if print_only:
            typer.echo(script, nl=False)
            return
        job_id = slurm.submit(script, options, logs_dir)
    except slurm.SlurmError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"submitted SLURM job {job_id}; attempts: {job.logs_dir}/slurm-{job_id}-<restart>"
               f"; lorasup status --slurm {job_id} --logs-dir {job.logs_dir}")


def slurm_status(job_id: str, logs_dir: Path, as_json: bool) -> None:
    """``lorasup status --slurm JOBID``: the job's state and its attempts."""
    from lorasup.supervisor.cluster import slurm

    try:
        data = slurm.status(job_id, logs_dir)
    except slurm.SlurmError as exc:
        raise _fail(str(exc)) from None
    if as_json or not sys.stdout.isatty():
        typer.echo(json.dumps(data))
    else:
        typer.echo(slurm.status_text(data))


def register(app: typer.Typer) -> None:
    app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False},
                help="Submit a job file to SLURM with lorasup as the job's entrypoint: "
                     "requeue with resume after preempted/stalled/timeout, never after a "
                     "cancel. sbatch's own options go after '--'.",
                short_help="Submit a job file to SLURM (lorasup as the entrypoint).")(sbatch)
