"""The daemon's commands on the ``lorasup`` CLI: submit, ps, cancel, extend, logs, show
(and ``serve``, from servecommand.py).

Registered from cli.py with one call, ``register(app)``; everything heavy (uvicorn,
starlette, httpx, prometheus_client) is imported inside the commands, so ``lorasup --help``
stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from lorasup.supervisor.serve.cliparts import StateDir, fail


def _client(state_dir: Path | None) -> Any:
    from lorasup.supervisor.serve import paths
    from lorasup.supervisor.serve.client import Client

    return Client(paths.state_dir(state_dir))


def _call(state_dir: Path | None, operation: Any) -> Any:
    from lorasup.supervisor.serve.client import ClientError

    try:
        with _client(state_dir) as client:
            return operation(client)
    except ClientError as exc:
        if len(exc.errors) > 1:  # a job with several mistakes: each on its own line
            typer.echo(f"lorasup: error: {len(exc.errors)} mistakes in the job:", err=True)
            for line in exc.errors:
                typer.echo(f"  {line}", err=True)
            raise typer.Exit(exc.code) from None
        raise fail(str(exc), exc.code) from None


class SubmitCommand(TyperCommand):
    """``submit``: what follows ``--`` is the trainer's command, kept apart before click
    parses the rest (click would hand its first word to JOB_FILE)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if "--" in args:
            cut = args.index("--")
            ctx.meta["trainer_argv"] = args[cut + 1:]
            args = args[:cut]
        return super().parse_args(ctx, args)

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [*super().collect_usage_pieces(ctx), "[-- TRAINER_ARGV...]"]


def _seconds_option(text: str) -> Any:
    return typer.Option(metavar="S", help=f"{text} (as for start)")


def submit(
    ctx: typer.Context,
    job_file: Annotated[Path | None, typer.Argument(
        help="a TOML job file (as for start --config); optional with a command after --")
    ] = None,
    name: Annotated[str | None, typer.Option(help="a name shown by ps")] = None,
    priority: Annotated[int | None, typer.Option(help="higher runs first [0]")] = None,
    trainer: Annotated[str | None, typer.Option(metavar="NAME", help="the trainer program "
                                                "(as for start)")] = None,
    steps: Annotated[int | None, typer.Option(metavar="N", help="optimizer steps to run")
                     ] = None,
    gpus: Annotated[int | None, typer.Option(metavar="K", help="GPUs the job needs [0]")
                    ] = None,
    retries: Annotated[int | None, typer.Option(
        metavar="K", help="new attempts after a stall, timeout or interruption [0]")] = None,
    timeout: Annotated[float | None, _seconds_option(
        "total wall time in seconds")] = None,
    no_output_timeout: Annotated[float | None, _seconds_option(
        "seconds of silence that count as a hang")] = None,
    startup_timeout: Annotated[float | None, _seconds_option(
        "seconds of silence allowed before the first step")] = None,
    no_progress_timeout: Annotated[float | None, _seconds_option(
        "seconds without a new step")] = None,
    grace: Annotated[float | None, _seconds_option(
        "seconds from the graceful signal to SIGKILL")] = None,
    finish_timeout: Annotated[float | None, _seconds_option(
        "seconds to save after step N")] = None,
    nan_patience: Annotated[int | None, typer.Option(
        metavar="K", help="non-finite losses tolerated (as for start)")] = None,
    logs_dir: Annotated[Path | None, typer.Option(
        metavar="DIR", help="where the runs go [the state directory's runs/]")] = None,
    state_dir: StateDir = None,
) -> None:
    """Flags win over the job file; the job runs in the current directory."""
    flags = {"trainer": trainer, "steps": steps, "gpus": gpus, "retries": retries,
             "timeout": timeout, "no_output_timeout": no_output_timeout,
             "startup_timeout": startup_timeout, "no_progress_timeout": no_progress_timeout,
             "grace": grace, "finish_timeout": finish_timeout, "nan_patience": nan_patience,
             "logs_dir": str(logs_dir) if logs_dir is not None else None}
    argv = ctx.meta.get("trainer_argv")
    job = _call(state_dir, lambda c: c.submit(job_file, cwd=Path.cwd(), name=name,
                                              priority=priority, flags=flags, argv=argv))
    typer.echo(job["id"])


#: finished jobs ``ps`` shows by default (the newest; ``--all`` shows every job)
RECENT_FINISHED = 20


def _offline(state_dir: Path | None, why: Any) -> Any:
    """The jobs read from lorasup.db when no daemon answers (one line on stderr says so);
    without a database the "no daemon" error stands."""
    import sqlite3

    from lorasup.supervisor.serve import paths
    from lorasup.supervisor.serve.offline import NoDatabase, OfflineJobs

    state = paths.state_dir(state_dir)
    try:
        jobs = OfflineJobs(state)
    except (NoDatabase, sqlite3.Error, OSError):
        raise fail(str(why), why.code) from None
    typer.echo(f"lorasup: the daemon is not running; jobs as last recorded in "
               f"{state / paths.DB_NAME}", err=True)
    return jobs


def _read(state_dir: Path | None, online: Any, offline: Any) -> Any:
    """``online(client)`` through the daemon; ``offline(jobs)`` from the database and the
    run directories when no daemon is running (a daemon that broke off mid-request is
    still an error: exit 75)."""
    from lorasup.supervisor.serve.client import NoDaemon
    from lorasup.supervisor.serve.errors import ApiError

    try:
        with _client(state_dir) as client:
            return online(client)
    except NoDaemon as exc:
        jobs = _offline(state_dir, exc)
        try:
            return offline(jobs)
        except ApiError as error:
            raise fail(error.message) from None
        finally:
            jobs.close()
    except Exception as exc:
        from lorasup.supervisor.serve.client import ClientError

        if isinstance(exc, ClientError):
            raise fail(str(exc), exc.code) from None
        raise


def ps(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document")] = False,
    all_jobs: Annotated[bool, typer.Option(
        "--all", help=f"every job, not only the active and the last {RECENT_FINISHED} "
                      "finished")] = False,
    state_dir: StateDir = None,
) -> None:
    from lorasup.supervisor.serve.present import ps_table

    finished = None if all_jobs else RECENT_FINISHED
    jobs = _read(state_dir, lambda c: c.jobs(finished),
                 lambda o: o.list_jobs(None, finished))
    if as_json:
        typer.echo(json.dumps(jobs, indent=1))
        return
    for line in ps_table(jobs):
        typer.echo(line)


def cancel(
    job_id: Annotated[int, typer.Argument(help="the job id")],
    state_dir: StateDir = None,
) -> None:
    job = _call(state_dir, lambda c: c.cancel(job_id))
    action = "cancelled" if job["state"] == "cancelled" else "stopping (SIGTERM to its run)"
    typer.echo(f"job {job_id}: {action}")


def extend(
    job_id: Annotated[int, typer.Argument(help="a completed, cancelled or preempted job")],
    steps: Annotated[int, typer.Option("--steps", help="steps to add")],
    state_dir: StateDir = None,
) -> None:
    job = _call(state_dir, lambda c: c.extend(job_id, steps))
    typer.echo(f"job {job['id']} ({job['name']}) queued: continues job {job_id} to "
               f"{job['steps']} steps")


def _human(as_json: bool) -> bool:
    """Readable output: stdout is a terminal and --json was not asked for."""
    return not as_json and sys.stdout.isatty()


def _files(jobs: Any, job_id: int, name: str) -> Any:
    """The bytes of ``name`` in each attempt's run directory, in order (offline ``logs``)."""
    for run_dir in jobs.run_dirs(job_id):
        try:
            with (run_dir / name).open("rb") as fh:
                while chunk := fh.read(65536):
                    yield chunk
        except OSError:
            continue


def logs_command(
    job_id: Annotated[int, typer.Argument(help="the job id")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep following")] = False,
    events: Annotated[bool, typer.Option("--events", help="events.jsonl, not the log")
                      ] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="the JSON lines as written (the default when not on a terminal)")
    ] = False,
    state_dir: StateDir = None,
) -> None:
    from lorasup.supervisor.serve.present import LineFormatter
    from lorasup.supervisor.serve.runs import LOG_NAME

    params = {"follow": "1" if follow else "0", "events": "1" if events else "0"}
    lines = LineFormatter() if _human(as_json) else None
    out = sys.stdout.buffer

    def write(chunks: Any) -> None:
        for chunk in chunks:
            if lines is None:
                out.write(chunk)
                out.flush()
                continue
            for line in lines.feed(chunk):
                typer.echo(line)
        for line in lines.close() if lines is not None else ():
            typer.echo(line)

    def offline(jobs: Any) -> None:
        if follow:
            typer.echo("lorasup: not following (no daemon runs the job)", err=True)
        write(_files(jobs, job_id, "events.jsonl" if events else LOG_NAME))

    try:
        _read(state_dir, lambda c: write(c.stream(f"/jobs/{job_id}/log", params)), offline)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _report_file(run_dirs: list[Path]) -> dict[str, Any] | None:
    """The newest attempt's report.json that can be read (offline ``show``)."""
    for run_dir in reversed(run_dirs):
        try:
            data = json.loads((run_dir / "report.json").read_bytes())
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(data, dict):
            return data
    return None


def show(
    job_id: Annotated[int, typer.Argument(help="the job id")],
    as_json: Annotated[bool, typer.Option(
        "--json", help="the job and its report as one JSON document (the default when not "
                       "on a terminal)")] = False,
    state_dir: StateDir = None,
) -> None:
    from lorasup.supervisor.serve.present import show_summary

    data = _read(state_dir,
                 lambda c: {"job": c.job(job_id), "report": c.report(job_id)},
                 lambda o: {"job": o.show(job_id), "report": _report_file(o.run_dirs(job_id))})
    if not _human(as_json):
        typer.echo(json.dumps(data, indent=1))
        return
    for line in show_summary(data["job"], data["report"]):
        typer.echo(line)


def register(app: typer.Typer) -> None:
    """Add the daemon's commands to the ``lorasup`` app."""
    from lorasup.supervisor.serve.servecommand import serve

    app.command(help="Run the queue daemon: jobs from `lorasup submit`, one run per slot.")(
        serve)
    app.command(cls=SubmitCommand, context_settings={"allow_extra_args": True},
                help="Queue a job for the daemon: a job file, or flags and the trainer's "
                     "command after --; prints the job id.")(submit)
    app.command(help="List the daemon's jobs (read from its database when it is not "
                     "running).")(ps)
    app.command(help="Cancel a job: queued ones are removed, running ones stopped.")(cancel)
    app.command(help="Add steps to a finished job: a new job continues it from its "
                     "newest save.")(extend)
    app.command(name="logs", help="Print a job's run log (readable lines on a terminal, "
                                  "else JSON lines); -f follows it.")(
        logs_command)
    app.command(help="Show a job and its report.")(show)

