"""The daemon's commands on the ``lorasup`` CLI: serve, submit, ps, cancel, logs, show.

Registered from cli.py with one call, ``register(app)``; everything heavy (uvicorn,
starlette, httpx, prometheus_client) is imported inside the commands, so ``lorasup --help``
stays fast.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

USAGE_EXIT = 2

StateDir = Annotated[Path | None, typer.Option(
    help="state directory [$LORASUP_STATE_DIR, $STATE_DIRECTORY, ~/.local/state/lorasup]")]


def _fail(message: str, code: int = USAGE_EXIT) -> typer.Exit:
    typer.echo(f"lorasup: error: {message}", err=True)
    return typer.Exit(code)


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
        raise _fail(str(exc), exc.code) from None


def _daemon_config(config: Path | None) -> dict[str, Any]:
    """``--config``: daemon-wide settings (``[notify]``, ``retry_backoff``)."""
    import tomllib

    from lorasup.supervisor.serve.jobspec import JobError, check_notify

    if config is None:
        return {}
    try:
        data = tomllib.loads(config.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise _fail(f"cannot read config file {config}: {exc}") from None
    unknown = sorted(set(data) - {"notify", "retry_backoff"})
    if unknown:
        raise _fail(f"{config}: unknown key {unknown[0]!r} (known: notify, retry_backoff)")
    try:
        notify = check_notify(data.get("notify"))
    except JobError as exc:
        raise _fail(f"{config}: {exc}") from None
    backoff = data.get("retry_backoff", 10.0)
    if isinstance(backoff, bool) or not isinstance(backoff, int | float) or not _seconds(backoff):
        raise _fail(f"{config}: retry_backoff must be a number of seconds from 0 to "
                    f"{_max_seconds()} (ten years)")
    return {"notify": notify, "retry_backoff": float(backoff)}


def _max_seconds() -> int:
    from lorasup.supervisor.config import MAX_SECONDS  # pydantic: not at every CLI start

    return MAX_SECONDS


def _seconds(value: float) -> bool:
    """A duration the daemon can do arithmetic with: finite, 0..MAX_SECONDS (config.py)."""
    return math.isfinite(value) and 0 <= value <= _max_seconds()


def serve(
    state_dir: StateDir = None,
    slots: Annotated[int, typer.Option(help="runs at once on a machine without GPUs")] = 1,
    gpus: Annotated[str, typer.Option(help="auto, none or a list like 0,1: one slot per GPU")
                    ] = "auto",
    until_empty: Annotated[bool, typer.Option(
        "--until-empty", help="exit 0 once the queue has been empty, with nothing "
                              "running, for --idle seconds")] = False,
    idle: Annotated[float, typer.Option(
        metavar="S", help="with --until-empty: seconds of an empty queue (from the start or "
                          "the last job's end) before exiting")] = 10.0,
    listen: Annotated[str | None, typer.Option(
        help="also serve the API on HOST:PORT (needs --token-file)")] = None,
    token_file: Annotated[Path | None, typer.Option(
        help="file holding the bearer token for --listen")] = None,
    tls_cert: Annotated[Path | None, typer.Option(
        help="with --listen: serve HTTPS with this certificate (PEM, chain included)")] = None,
    tls_key: Annotated[Path | None, typer.Option(
        help="with --tls-cert: its private key (PEM, unencrypted)")] = None,
    insecure_listen: Annotated[bool, typer.Option(
        "--insecure-listen", help="allow --listen on a non-loopback address in plain HTTP "
                                  "(the token crosses the network readable)")] = False,
    config: Annotated[Path | None, typer.Option(
        help="daemon TOML: a notify table (webhook, secret, format), retry_backoff")] = None,
    retry_backoff: Annotated[float | None, typer.Option(
        help="seconds before the first retry, doubling after [10]")] = None,
    log_format: Annotated[str, typer.Option(help="auto, json or console")] = "auto",
) -> None:
    import anyio

    from lorasup.supervisor import logs
    from lorasup.supervisor.serve import paths
    from lorasup.supervisor.serve.daemon import Daemon, DaemonConfig
    from lorasup.supervisor.serve.errors import ApiError
    from lorasup.supervisor.serve.gpus import GpuSpecError

    if log_format not in ("auto", "json", "console"):
        raise _fail(f"--log-format must be auto, json or console, not {log_format!r}")
    token = tls = None
    if listen is None and (tls_cert or tls_key):
        raise _fail("--tls-cert/--tls-key need --listen (the UNIX socket speaks no TLS)")
    if listen is not None:
        if token_file is None:
            raise _fail("--listen needs --token-file (the API on TCP requires a bearer token)")
        from lorasup.supervisor.serve import listening

        try:
            tls = listening.check_tls(tls_cert, tls_key)
            listening.check_listen(listen, tls, insecure_listen)
        except listening.ListenError as exc:
            raise _fail(str(exc)) from None
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise _fail(f"cannot read --token-file {token_file}: {exc.strerror}") from None
        if len(token) < 16:
            raise _fail(f"the token in {token_file} is too short (16 characters at least)")
    settings = _daemon_config(config)
    if retry_backoff is not None:
        if not _seconds(retry_backoff):
            raise _fail(f"--retry-backoff must be a number of seconds from 0 to "
                        f"{_max_seconds()}")
        settings["retry_backoff"] = retry_backoff
    if not _seconds(idle):
        raise _fail(f"--idle must be a number of seconds from 0 to {_max_seconds()}")
    from lorasup.supervisor.config import SLOTS_RANGE

    if not SLOTS_RANGE[0] <= slots <= SLOTS_RANGE[1]:
        raise _fail(f"--slots must be from {SLOTS_RANGE[0]} to {SLOTS_RANGE[1]}")
    logs.configure(log_format)  # type: ignore[arg-type]
    try:
        daemon = Daemon(DaemonConfig(state_dir=paths.state_dir(state_dir), slots=slots,
                                     gpus=gpus, until_empty=until_empty, idle=idle,
                                     listen=listen, token=token, tls=tls,
                                     **settings))
        code = anyio.run(daemon.run)
    except (ApiError, GpuSpecError) as exc:
        raise _fail(getattr(exc, "message", str(exc))) from None
    except OSError as exc:
        raise _fail(f"cannot use the state directory: {exc}") from None
    raise typer.Exit(code)


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
        raise _fail(str(why), why.code) from None
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
            raise _fail(error.message) from None
        finally:
            jobs.close()
    except Exception as exc:
        from lorasup.supervisor.serve.client import ClientError

        if isinstance(exc, ClientError):
            raise _fail(str(exc), exc.code) from None
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

