"""The ``lorasup`` command: a thin translation of flags into a Job, then one run.

Exit codes are the outcome table of the README (0 completed, 1 trainer_failed, 2 usage,
3 timeout, 4 stalled, 5 diverged, 6 preempted, 70 internal_error, 130/143 interrupted).

Help is plain text (no rich markup): defaults in ``[default: ...]`` stay visible, and the
option lists are generated from the trainer registry and the config defaults so that
``--help`` cannot drift from the code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from typer.core import TyperCommand

from lorasup.supervisor import signals
from lorasup.supervisor.defaults import (
    DEFAULT_FINISH_TIMEOUT,
    DEFAULT_GRACE,
    DEFAULT_LOGS_DIR,
    DEFAULT_NAN_PATIENCE,
    DEFAULT_NO_OUTPUT_TIMEOUT,
    DEFAULT_SECONDS_PER_STEP_LIMIT,
    DEFAULT_TRAINER,
)
from lorasup.trainers import OPTIONS, REGISTRY

# Nothing in lorasup renders with rich: help is plain text, logs are JSON or structlog's
# plain console lines. But structlog imports rich for its traceback helpers whenever it is
# installed (typer installs it), ~0.1 s at every start of a command; hidden from this
# process (before any command imports structlog), structlog takes its path without rich.
sys.modules.setdefault("rich", None)  # type: ignore[arg-type]

USAGE_EXIT = 2
TRAINER_ARGV = "[-- TRAINER_ARGV...]"


def _for(option: str) -> str:
    """``<trainer>, <trainer>:``: which trainers read a trainer option (the registry's
    ``OPTIONS``)."""
    return ", ".join(sorted(t for t, keys in OPTIONS.items() if option in keys)) + ":"


def _default(value: object) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return f"[default: {text}]"


def _complete_trainer(incomplete: str) -> list[str]:
    return [name for name in sorted(REGISTRY) if name.startswith(incomplete)]


class StartCommand(TyperCommand):
    """``start``'s usage line shows where the trainer's own argv goes."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [*super().collect_usage_pieces(ctx), TRAINER_ARGV]


app = typer.Typer(
    name="lorasup",
    help="Supervise a LoRA training run: exact step stops, watchdogs, clean kills, reports.",
    no_args_is_help=True,
    # Plain help: defaults stay visible, and rich's panels would cost ~150 ms of imports.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"lorasup: error: {message}", err=True)
    return typer.Exit(USAGE_EXIT)


def _show_version(value: bool) -> None:
    if value:
        from lorasup import __version__

        typer.echo(f"lorasup {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", "-V", is_eager=True, callback=_show_version,
        help="Show the version and exit.")] = False,
) -> None:
    """Supervise a LoRA training run: exact step stops, watchdogs, clean kills, reports."""


@app.command(
    cls=StartCommand,
    # Only what follows '--' goes to the trainer: a mistyped lorasup flag is an error.
    context_settings={"allow_extra_args": True},
    help="Start and supervise a trainer. The trainer's own argv goes after '--' (an argv "
         "list, never a shell string). Flags win over the --config job file.",
)
def start(
    ctx: typer.Context,
    trainer: Annotated[str | None, typer.Option(
        metavar="NAME", autocompletion=_complete_trainer,
        help=f"the trainer program: {', '.join(sorted(REGISTRY))} "
             f"{_default(DEFAULT_TRAINER)}")] = None,
    steps: Annotated[int | None, typer.Option(
        metavar="N", help="optimizer steps to run, exactly (else the trainer's own step "
                          "flag, where it takes one)")] = None,
    run_dir: Annotated[Path | None, typer.Option(
        metavar="DIR", help="the run directory, exactly (refused if it holds a run)")] = None,
    logs_dir: Annotated[Path | None, typer.Option(
        metavar="DIR", help=f"the run goes to DIR/<run-id>/ {_default(DEFAULT_LOGS_DIR)}")
    ] = None,
    timeout: Annotated[float | None, typer.Option(
        metavar="S", help=f"total wall time in seconds "
                          f"[default: steps × {DEFAULT_SECONDS_PER_STEP_LIMIT:g}]")] = None,
    no_output_timeout: Annotated[float | None, typer.Option(
        metavar="S", help=f"seconds of silence that count as a hang "
                          f"{_default(DEFAULT_NO_OUTPUT_TIMEOUT)}")] = None,
    startup_timeout: Annotated[float | None, typer.Option(
        metavar="S", help="seconds of silence allowed before the first step "
                          "[default: the no-output timeout]")] = None,
    no_progress_timeout: Annotated[float | None, typer.Option(
        metavar="S", help="seconds without a new step, counted from the first step "
                          "(suggested for multi-GPU) [default: off]")] = None,
    grace: Annotated[float | None, typer.Option(
        metavar="S", help=f"seconds from the first graceful signal to SIGKILL "
                          f"{_default(DEFAULT_GRACE)}")] = None,
    finish_timeout: Annotated[float | None, typer.Option(
        metavar="S", help=f"seconds a self-stopping trainer may take to save after step N "
                          f"{_default(DEFAULT_FINISH_TIMEOUT)}")] = None,
    nan_patience: Annotated[int | None, typer.Option(
        metavar="K", help=f"non-finite losses tolerated before 'diverged' "
                          f"{_default(DEFAULT_NAN_PATIENCE)}")] = None,
    log_format: Annotated[str | None, typer.Option(
        metavar="FORMAT", help="json (one object per line on stdout), console, or auto: "
                               "console on a TTY, else json [default: auto]")] = None,
    config: Annotated[Path | None, typer.Option(
        metavar="FILE", help="TOML job file with the same keys (steps, no_output_timeout, "
                             "command = [...], [options] ...); flags win")] = None,
    new: Annotated[bool, typer.Option(
        "--new", help=f"{_for('mode')} start a new LoRA (the default; an existing one is "
                      "kept as <name>.<time>.bak.safetensors)")] = False,
    continue_: Annotated[bool, typer.Option(
        "--continue", help=f"{_for('mode')} resume from the saved state and run --steps "
                           "more")] = False,
    dataset: Annotated[str | None, typer.Option(
        metavar="DIR", help=f"{_for('dataset')} dataset folder of <repeats>_<name>/ folders "
                            "[default: lora_train_set, else the demo dataset]")] = None,
    output_dir: Annotated[str | None, typer.Option(
        metavar="DIR", help=f"{_for('output_dir')} LoRA output folder "
                            "[default: lora_output]")] = None,
    tensorboard: Annotated[bool, typer.Option(
        "--tensorboard",
        help=f"{_for('tensorboard')} make the script write TensorBoard event files into the "
             "run directory, and read them live")] = False,
    private: Annotated[bool, typer.Option(
        "--private", help="make the run directory 0700: nothing of the run, report, CSV and "
                          "PNG included, is readable by other users")] = False,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="do not show the trainer's own output (shown on stderr when "
                              "it is a terminal); trainer.log has it either way")] = False,
    echo: Annotated[bool, typer.Option(
        "--echo", help="show the trainer's own output on stderr even when it is not a "
                       "terminal")] = False,
    resume_from: Annotated[str | None, typer.Option(
        metavar="RUN", help="continue an earlier attempt of this job (a run directory, or a "
                            "run id under --logs-dir): the trainer resumes its saved state "
                            "and the job ends at its total step count (nothing saved yet: "
                            "a fresh start)")] = None,
    resume_newest: Annotated[bool, typer.Option(
        "--resume-newest", help="continue the newest run under --logs-dir, if it holds one "
                                "(a pod retry: one logs directory per job)")] = False,
) -> None:
    # From here on a stop signal is remembered, never fatal (see supervisor/signals.py).
    signals.hold()
    if new and continue_:
        raise _fail("--new and --continue exclude each other")
    if quiet and echo:
        raise _fail("--quiet and --echo exclude each other")
    from lorasup.supervisor.plotchild import PlotChild

    # The plot child first: its matplotlib import (at idle priority) overlaps lorasup's own
    # imports and checks below, not only the training; a refused job kills it.
    plot = PlotChild()
    plot.start()
    import anyio

    from lorasup.supervisor import logs
    from lorasup.supervisor.config import ConfigError, build_job, load_toml
    from lorasup.supervisor.prepare import plan_run
    from lorasup.supervisor.run import Supervisor
    from lorasup.trainers.base import UsageError

    try:
        file_values: dict[str, Any] = load_toml(config) if config is not None else {}
        job = build_job(file_values, {
            "trainer": trainer, "steps": steps, "run_dir": run_dir, "logs_dir": logs_dir,
            "timeout": timeout, "no_output_timeout": no_output_timeout, "grace": grace,
            "startup_timeout": startup_timeout, "no_progress_timeout": no_progress_timeout,
            "finish_timeout": finish_timeout, "nan_patience": nan_patience,
            "log_format": log_format, "private": private or None,
            "trainer_argv": tuple(ctx.args) if ctx.args else None,
        }, {
            "mode": "new" if new else ("continue" if continue_ else None),
            "dataset": dataset, "output_dir": output_dir, "tensorboard": tensorboard or None,
        })
        chosen = logs.configure(job.log_format)  # type: ignore[arg-type]
        on_terminal = sys.stderr.isatty()
        # The trainer's own output on a terminal (its bar is then the progress: lorasup's
        # live line is off); --quiet hides it, --echo shows it anywhere.
        echoed = echo or (on_terminal and not quiet)
        previous = _previous_run(resume_from, job, newest=resume_newest) \
            if resume_from is not None or resume_newest else None
        plan, adapter = plan_run(job, progress_tty=(chosen == "console" and on_terminal
                                                    and not echoed),
                                 resume_from=previous)
    except (ConfigError, UsageError) as exc:
        plot.discard()
        raise _fail(str(exc)) from None
    except BaseException:
        plot.discard()
        raise

    shown = None
    if echoed:
        from lorasup.supervisor.console import TerminalEcho, stderr_fd

        fd = stderr_fd()
        if fd is not None:
            shown = TerminalEcho(fd, terminal=on_terminal, hide_prefix=adapter.protocol_prefix)
            if on_terminal:
                logs.set_interject(shown.interject)

    async def _main() -> Any:
        return await Supervisor(plan, adapter, plot=plot, echo=shown).run()

    try:
        result = anyio.run(_main)
    finally:
        logs.set_interject(None)
    if on_terminal:
        from lorasup.supervisor.show import RunSummary, end_line

        data = result.report if isinstance(result.report, dict) else {}
        summary = RunSummary.of(plan.run_dir, {**data, "outcome": result.outcome})
        typer.echo(end_line(summary), err=True)
    global _run_ended
    _run_ended = True
    raise typer.Exit(result.exit_code)


def _previous_run(ref: str | None, job: Any, *, newest: bool) -> Path | None:
    """``--resume-from``: a run directory, or a run id under the job's logs directory;
    ``--resume-newest``: the newest run there (by its last record), None when none is."""
    from lorasup.supervisor.config import ConfigError
    from lorasup.supervisor.show import RunNotFound, find_run

    logs_dir = job.logs_dir if job.cwd is None or job.logs_dir.is_absolute() \
        else job.cwd / job.logs_dir
    if newest:
        if ref is not None:
            raise ConfigError("--resume-from and --resume-newest exclude each other")
        try:
            runs = [(p.joinpath("events.jsonl").stat().st_mtime, str(p))
                    for p in logs_dir.iterdir() if p.joinpath("events.jsonl").is_file()]
        except OSError:
            return None
        return Path(max(runs)[1]) if runs else None
    assert ref is not None
    try:
        return find_run(ref, logs_dir)
    except RunNotFound as exc:
        raise ConfigError(f"--resume-from: {exc}") from None


__import__("lorasup.supervisor.runcommands", fromlist=["register"]).register(app)
__import__("lorasup.supervisor.serve.commands", fromlist=["register"]).register(app)
__import__("lorasup.supervisor.cluster.commands", fromlist=["register"]).register(app)


def _format(value: str) -> Literal["auto", "json", "console"]:
    if value not in ("auto", "json", "console"):
        raise _fail(f"--log-format must be auto, json or console, not {value!r}")
    return value  # type: ignore[return-value]


#: set by ``start`` once its run has ended: the process has nothing left to do but exit
_run_ended = False


def main(argv: list[str] | None = None) -> None:
    """The console script: usage errors become one line on stderr and exit code 2."""
    try:
        # Without standalone mode an Exit raised by a command comes back as its code.
        code = app(args=argv, prog_name="lorasup", standalone_mode=False)
        code = code if isinstance(code, int) else 0
        if _run_ended:
            # The run is over and its files are closed: skip the interpreter's teardown.
            from lorasup.supervisor.quickexit import exit_now

            exit_now(code)
        sys.exit(code)
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
