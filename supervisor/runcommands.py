"""The commands that read finished or running runs: ``report``, ``status`` and ``ls``
(registered on the ``lorasup`` app by cli.py with one call, ``register(app)``)."""

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


def _default(value: object) -> str:
    return f"[default: {value}]"


def _format(value: str) -> str:
    if value not in ("auto", "json", "console"):
        raise _fail(f"--log-format must be auto, json or console, not {value!r}")
    return value


def _complete_run(ctx: typer.Context, incomplete: str) -> list[str]:
    """Run ids under --logs-dir (shell completion of RUN)."""
    logs_dir = Path(ctx.params.get("logs_dir") or DEFAULT_LOGS_DIR)
    try:
        names = sorted(p.name for p in logs_dir.iterdir() if (p / "events.jsonl").is_file())
    except OSError:
        return []
    return [name for name in names if name.startswith(incomplete)]


_RUN_HELP = "a run directory, or a run id under --logs-dir"
_LOGS_DIR_HELP = f"where run ids are looked up {_default(DEFAULT_LOGS_DIR)}"
_JSON_HELP = "JSON on stdout (the default when stdout is not a terminal)"
RunArgument = Annotated[str, typer.Argument(metavar="RUN", help=_RUN_HELP,
                                            autocompletion=_complete_run)]
LogsDirOption = Annotated[Path, typer.Option(metavar="DIR", help=_LOGS_DIR_HELP,
                                             show_default=False)]
JsonFlag = Annotated[bool, typer.Option("--json", help=_JSON_HELP)]


def _find(run: str, logs_dir: Path) -> Path:
    from lorasup.supervisor.show import RunNotFound, find_run

    try:
        return find_run(run, logs_dir)
    except RunNotFound as exc:
        raise _fail(str(exc)) from None


def _want_json(flag: bool) -> bool:
    return flag or not sys.stdout.isatty()


def report(
    run: RunArgument,
    logs_dir: LogsDirOption = DEFAULT_LOGS_DIR,
    log_format: Annotated[str, typer.Option(
        metavar="FORMAT", help="auto, json or console (on stderr) [default: auto]",
        show_default=False)] = "auto",
    as_json: JsonFlag = False,
) -> None:
    from lorasup.supervisor import logs
    from lorasup.supervisor.report.read import rebuild
    from lorasup.supervisor.show import RunSummary, round_floats, status_text

    logs.configure(_format(log_format), stream=sys.stderr)
    run_dir = _find(run, logs_dir)
    rebuilt = rebuild(run_dir)
    if _want_json(as_json):
        typer.echo(json.dumps(round_floats({
            "report": str(run_dir / "report.json"), "outcome": rebuilt.get("outcome"),
            "steps": rebuilt.get("steps")})))
    else:
        typer.echo(f"rebuilt {run_dir / 'report.json'}, losses.csv, loss_curves.png")
        typer.echo(status_text(RunSummary.of(run_dir, rebuilt)))


def status(
    run: RunArgument,
    logs_dir: LogsDirOption = DEFAULT_LOGS_DIR,
    as_json: JsonFlag = False,
    slurm: Annotated[bool, typer.Option(
        "--slurm", help="RUN is a SLURM job id (lorasup sbatch): its state and attempts")
    ] = False,
) -> None:
    from lorasup.supervisor.show import RunSummary, load_run, status_json, status_text

    if slurm:
        from lorasup.supervisor.cluster.commands import slurm_status

        return slurm_status(run, logs_dir, as_json)
    run_dir = _find(run, logs_dir)
    data = load_run(run_dir)
    summary = RunSummary.of(run_dir, data)
    if _want_json(as_json):
        typer.echo(json.dumps(status_json(summary, data)))
    else:
        typer.echo(status_text(summary))


def list_runs(
    logs_dir: Annotated[Path, typer.Option(
        metavar="DIR", help=f"the logs directory {_default(DEFAULT_LOGS_DIR)}",
        show_default=False)
                        ] = DEFAULT_LOGS_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="a JSON list on stdout")] = False,
) -> None:
    from lorasup.supervisor.show import list_runs as find_runs
    from lorasup.supervisor.show import runs_table

    runs = find_runs(logs_dir)
    if as_json:
        typer.echo(json.dumps([run.to_json() for run in runs]))
    elif runs:
        typer.echo(runs_table(runs))
    else:
        typer.echo(f"no runs in {logs_dir}/", err=True)


def register(app: typer.Typer) -> None:
    """Add the run commands to the ``lorasup`` app."""
    app.command(help="Rebuild report.json, losses.csv and loss_curves.png from events.jsonl.",
                short_help="Rebuild a run's report, CSV and PNG from events.jsonl.")(report)
    app.command(help="Show the outcome and progress of a run (live while it runs).")(status)
    app.command("ls", help="List the runs in a logs directory, newest last.")(list_runs)
