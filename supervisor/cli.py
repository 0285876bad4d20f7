"""The ``lorasup`` command: a thin translation of flags into a Job, then one run.

Exit codes are the outcome table of the README (0 completed, 1 trainer_failed, 2 usage,
3 timeout, 4 stalled, 5 diverged, 130/143 interrupted).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

# Imported by the commands that need them (anyio, structlog, pydantic, ...): `lorasup
# --help` must start fast.

USAGE_EXIT = 2

app = typer.Typer(
    name="lorasup",
    help="Supervise a LoRA training run: exact step stops, watchdogs, clean kills, reports.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: rich's help panels cost ~150 ms of imports on every `lorasup --help`.
    rich_markup_mode=None,
)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"lorasup: error: {message}", err=True)
    return typer.Exit(USAGE_EXIT)


@app.command(
    # Only what follows '--' goes to the trainer: a mistyped lorasup flag is an error.
    context_settings={"allow_extra_args": True},
    help="Start and supervise a trainer. The trainer's own argv goes after '--'.",
)
def start(
    ctx: typer.Context,
    trainer: Annotated[
        str | None,
        typer.Option(help="builtin, kohya, diffusers, native or command [builtin]")] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps to run, exactly")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="the run directory, exactly")] = None,
    logs_dir: Annotated[
        Path | None, typer.Option(help="parent of <run-id>/ [training_logs]")] = None,
    timeout: Annotated[float | None, typer.Option(help="total seconds [steps × 30]")] = None,
    no_output_timeout: Annotated[
        float | None, typer.Option(help="seconds of silence that count as a hang [300]")] = None,
    grace: Annotated[
        float | None, typer.Option(help="seconds from the graceful stop to SIGKILL [30]")] = None,
    finish_timeout: Annotated[
        float | None,
        typer.Option(help="seconds a self-stopping trainer may save after step N [900]")] = None,
    nan_patience: Annotated[
        int | None, typer.Option(help="non-finite losses tolerated before 'diverged' [0]")] = None,
    log_format: Annotated[
        str | None, typer.Option(help="auto, json or console [auto: console on a TTY]")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML job file; flags win")] = None,
    new: Annotated[bool, typer.Option("--new", help="builtin: start fresh")] = False,
    continue_: Annotated[
        bool, typer.Option("--continue", help="builtin: resume and run --steps more")] = False,
    dataset: Annotated[str | None, typer.Option(help="builtin: dataset folder")] = None,
    output_dir: Annotated[str | None, typer.Option(help="builtin: LoRA output folder")] = None,
    tensorboard: Annotated[bool, typer.Option(
        "--tensorboard",
        help="diffusers: make the script write TensorBoard files into the run dir")] = False,
) -> None:
    import anyio

    from lorasup.supervisor import logs
    from lorasup.supervisor.config import ConfigError, build_job, load_toml
    from lorasup.supervisor.prepare import plan_run
    from lorasup.supervisor.run import Supervisor
    from lorasup.trainers.base import UsageError

    if new and continue_:
        raise _fail("--new and --continue exclude each other")
    options = {k: v for k, v in
               {"mode": "new" if new else ("continue" if continue_ else None),
                "dataset": dataset, "output_dir": output_dir,
                "tensorboard": "1" if tensorboard else None}.items() if v is not None}
    try:
        file_values: dict[str, Any] = load_toml(config) if config is not None else {}
        if options:
            file_values["options"] = {**file_values.get("options", {}), **options}
        job = build_job(file_values, {
            "trainer": trainer, "steps": steps, "run_dir": run_dir, "logs_dir": logs_dir,
            "timeout": timeout, "no_output_timeout": no_output_timeout, "grace": grace,
            "finish_timeout": finish_timeout, "nan_patience": nan_patience,
            "log_format": log_format,
            "trainer_argv": tuple(ctx.args) if ctx.args else None,
        })
        chosen = logs.configure(job.log_format)  # type: ignore[arg-type]
        plan, adapter = plan_run(job, progress_tty=chosen == "console" and sys.stderr.isatty())
    except (ConfigError, UsageError) as exc:
        raise _fail(str(exc)) from None

    async def _main() -> Any:
        return await Supervisor(plan, adapter).run()

    result = anyio.run(_main)
    raise typer.Exit(result.exit_code)


@app.command(help="Rebuild report.json, losses.csv and loss_curves.png from events.jsonl.")
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    log_format: Annotated[str, typer.Option(help="auto, json or console")] = "auto",
) -> None:
    from lorasup.supervisor import logs
    from lorasup.supervisor.report import rebuild

    logs.configure(_format(log_format))
    if not (run_dir / "events.jsonl").is_file():
        raise _fail(f"no events.jsonl in {run_dir}")
    rebuilt = rebuild(run_dir)
    typer.echo(json.dumps({"report": str(run_dir / "report.json"),
                           "outcome": rebuilt.get("outcome"),
                           "steps": rebuilt.get("steps")}))


@app.command(help="Show the outcome and progress of a run (live: read from events.jsonl).")
def status(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    from lorasup.supervisor.report import load

    events = run_dir / "events.jsonl"
    if not events.is_file():
        raise _fail(f"no events.jsonl in {run_dir}")
    data = load(run_dir).snapshot()  # streaming, bounded memory
    typer.echo(json.dumps({"run_id": data.get("run_id"), "status": data.get("status"),
                           "outcome": data.get("outcome"), "exit_code": data.get("exit_code"),
                           "steps": data.get("steps"), "loss": data.get("loss")}))


def _format(value: str) -> Literal["auto", "json", "console"]:
    if value not in ("auto", "json", "console"):
        raise _fail(f"--log-format must be auto, json or console, not {value!r}")
    return value  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    """The console script: usage errors become one line on stderr and exit code 2."""
    try:
        # Without standalone mode an Exit raised by a command comes back as its code.
        code = app(args=argv, prog_name="lorasup", standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as exc:  # typer's (vendored click) usage errors
        if type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()  # type: ignore[attr-defined]
            sys.exit(USAGE_EXIT)
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        typer.echo(f"lorasup: error: {message}", err=True)
        sys.exit(USAGE_EXIT)
