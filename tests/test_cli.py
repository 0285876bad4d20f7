"""The command line as a newcomer meets it: help, version, finding runs, terminal output.

Help and the run finders are tested as a mapping (typer's CliRunner) and a few times as
the real console script, on a terminal (pty) and in a pipe.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from lorasup.supervisor.cli import app
from lorasup.supervisor.show import RunSummary, load_run, round_floats, status_text
from lorasup.trainers import REGISTRY
from tests.support import child_env, lorasup_argv, run_on_a_terminal

runner = CliRunner()


def _help(*args: str) -> str:
    result = runner.invoke(app, [*args], prog_name="lorasup", terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output


def _start_options() -> list[str]:
    command = typer.main.get_command(app)
    start = command.commands["start"]  # type: ignore[attr-defined]
    return [opt for param in start.params for opt in param.opts if opt.startswith("--")]


# --- help -------------------------------------------------------------------------------


def test_start_help_names_every_trainer_and_every_option() -> None:
    text = _help("start", "--help")
    for name in REGISTRY:
        assert re.search(rf"\b{name}\b", text), name
    options = _start_options()
    assert len(options) >= 16  # the list is read from the command, not written here
    for option in options:
        assert option in text, option


def test_start_help_shows_defaults_usage_and_no_bool_metavars() -> None:
    text = _help("start", "-h")
    assert text.startswith("Usage: lorasup start [OPTIONS] [-- TRAINER_ARGV...]")
    flat = " ".join(text.split())
    for default in ("[default: builtin]", "[default: training_logs]", "[default: steps × 30]",
                    "[default: 300]", "[default: 30]", "[default: 900]", "[default: 0]",
                    "[default: auto]", "[default: lora_output]"):
        assert default in flat, default
    assert "<bool>" not in text
    assert re.search(r"--tensorboard\s+diffusers, hf:", text)
    assert re.search(r"--new\s+builtin:", text)


def test_every_command_has_short_help_and_the_app_has_version_and_completion() -> None:
    text = _help("-h")
    for command in ("start", "report", "status", "ls"):
        assert re.search(rf"^\s+{command}\s+\S", text, re.M), command
    assert "--version" in text and "--install-completion" in text
    for command in ("report", "status", "ls"):
        assert "--logs-dir DIR" in _help(command, "-h")


def test_version_and_help_as_real_processes() -> None:
    proc = subprocess.run(lorasup_argv("--version"), capture_output=True, text=True,
                          timeout=60, env=child_env())
    assert proc.returncode == 0 and proc.stdout.strip() == f"lorasup {version('lorasup')}"
    proc = subprocess.run(lorasup_argv("start", "--help"), capture_output=True, text=True,
                          timeout=60, env=child_env())
    assert proc.returncode == 0, proc.stderr
    assert all(name in proc.stdout for name in REGISTRY)
    assert all(option in proc.stdout for option in _start_options())


def test_a_mistyped_flag_is_one_line_and_exit_2() -> None:
    proc = subprocess.run(lorasup_argv("start", "--step", "3"), capture_output=True, text=True,
                          timeout=60, env=child_env())
    assert proc.returncode == 2
    assert proc.stderr.startswith("lorasup: error: ") and proc.stderr.count("\n") == 1


# --- finding runs -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real builtin runs (3 and 4 steps) in training_logs/ of a fresh folder."""
    cwd = tmp_path_factory.mktemp("runs")
    for steps in ("3", "4"):
        proc = subprocess.run(lorasup_argv("start", "--steps", steps, "--log-format", "json"),
                              capture_output=True, text=True, timeout=60, env=child_env(),
                              cwd=cwd)
        assert proc.returncode == 0, proc.stderr
        assert "lorasup: completed" not in proc.stderr  # the end line is for terminals only
    return cwd / "training_logs"


def _runs(logs: Path) -> list[str]:
    """Run ids in the order they started (the started record's wall time)."""
    def started(name: str) -> float:
        with (logs / name / "events.jsonl").open() as handle:
            return json.loads(handle.readline())["wall_time"]
    return sorted((p.name for p in logs.iterdir()), key=started)


def _floats(value: object) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [f for v in value.values() for f in _floats(v)]
    if isinstance(value, list):
        return [f for v in value for f in _floats(v)]
    return []


def test_status_takes_an_id_a_prefix_or_a_path(logs: Path) -> None:
    first = sorted(p.name for p in logs.iterdir())[0]
    for ref in (first, str(logs / first)):
        result = runner.invoke(app, ["status", ref, "--logs-dir", str(logs)])
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)  # not a terminal: JSON
        assert data["run_id"] == first and data["outcome"] == "completed"
        assert data["steps"]["last"] in (3, 4)
        assert all(len(f"{abs(f):.15g}".replace(".", "").strip("0")) <= 6
                   for f in _floats(data))
    other = sorted(p.name for p in logs.iterdir())[1]
    common = next(i for i, (a, b) in enumerate(zip(first, other, strict=False)) if a != b)
    prefix = first[: common + 1]  # unique by construction
    unique = runner.invoke(app, ["status", prefix, "--logs-dir", str(logs)])
    assert unique.exit_code == 0 and json.loads(unique.stdout)["run_id"] == first


def test_status_of_an_unknown_run_is_one_line(logs: Path, tmp_path: Path) -> None:
    proc = subprocess.run(lorasup_argv("status", "no-such-run", "--logs-dir", str(logs)),
                          capture_output=True, text=True, timeout=60, env=child_env())
    assert proc.returncode == 2
    assert proc.stderr == (f"lorasup: error: no run 'no-such-run': neither a run directory "
                           f"nor a run id in {logs}/\n")
    result = runner.invoke(app, ["status", "2", "--logs-dir", str(logs)])  # both runs match
    assert result.exit_code == 2 and "matches 2 runs" in result.output
    result = runner.invoke(app, ["status", str(tmp_path)])
    assert result.exit_code == 2 and "not a run directory" in result.output


def test_report_by_id_rebuilds(logs: Path) -> None:
    run = sorted(p.name for p in logs.iterdir())[-1]
    (logs / run / "report.json").unlink()
    result = runner.invoke(app, ["report", run, "--logs-dir", str(logs), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["outcome"] == "completed"
    assert json.loads((logs / run / "report.json").read_text())["steps"]["last"] in (3, 4)


def test_ls_lists_runs_newest_last(logs: Path, tmp_path: Path) -> None:
    order = _runs(logs)
    result = runner.invoke(app, ["ls", "--logs-dir", str(logs)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["RUN", "TRAINER", "OUTCOME", "STEPS", "FINAL", "LOSS", "STARTED"]
    assert [line.split()[0] for line in lines[1:]] == order
    assert lines[1].split()[1:4] == ["builtin", "completed", "3/3"]
    assert lines[2].split()[1:4] == ["builtin", "completed", "4/4"]
    data = json.loads(runner.invoke(app, ["ls", "--logs-dir", str(logs), "--json"]).stdout)
    assert [row["run_id"] for row in data] == order
    assert {row["outcome"] for row in data} == {"completed"}
    assert all(isinstance(row["loss"], float) and row["started_at"].endswith("Z")
               for row in data)
    empty = runner.invoke(app, ["ls", "--logs-dir", str(tmp_path / "none")])
    assert empty.exit_code == 0 and empty.stdout == ""


def test_status_for_people(logs: Path) -> None:
    run = logs / sorted(p.name for p in logs.iterdir())[0]
    summary = RunSummary.of(run, load_run(run))
    text = status_text(summary)
    assert summary.outcome == "completed"
    assert re.search(r"completed: trainer finished all steps", text)
    assert re.search(r"step (3/3|4/4)\s+last loss \d\.\d{1,4}\s+elapsed \d+\.\d s", text)
    assert "lorasup_lora.safetensors" in text or "model files: none listed" in text


def test_status_on_a_terminal_is_a_short_summary(logs: Path) -> None:
    run = sorted(p.name for p in logs.iterdir())[0]
    code, text = run_on_a_terminal(lorasup_argv("status", run), logs.parent)
    assert code == 0
    assert "{" not in text and f"{run}  builtin  completed" in text
    assert re.search(r"step \d/\d", text)


def test_start_on_a_terminal_ends_with_one_summary_line(tmp_path: Path) -> None:
    code, text = run_on_a_terminal(lorasup_argv("start", "--steps", "5"), tmp_path)
    assert code == 0
    last = text.strip().splitlines()[-1]
    assert re.fullmatch(r"lorasup: completed \(trainer finished all steps\); final loss "
                        r"[\d.e-]+; model \S+lorasup_lora\.safetensors; report \S+report\.json",
                        last), last
    # The live progress line is erased before any log line is written over it.
    for frame in text.split("\r\x1b[K"):
        if frame.startswith("step "):
            assert not re.search(r"checkpoint|trainer_exited|outcome", frame.split("\n")[0]), frame


def test_round_floats_keeps_six_significant_digits() -> None:
    assert round_floats({"a": [0.123456789, 1234567.89, 0.0, None, "nan"], "b": 3}) == {
        "a": [0.123457, 1234570.0, 0.0, None, "nan"], "b": 3}


def test_shell_completion_knows_trainers_and_run_ids(logs: Path) -> None:
    def complete(*words: str) -> list[str]:
        env = {**child_env(), "_LORASUP_COMPLETE": "complete_bash",
               "COMP_WORDS": " ".join(["lorasup", *words]), "COMP_CWORD": str(len(words))}
        proc = subprocess.run(lorasup_argv(), capture_output=True, text=True, timeout=60,
                              env=env, cwd=logs.parent)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    assert complete("start", "--trainer", "k") == ["kohya"]
    assert complete("status", "") == sorted(p.name for p in logs.iterdir())


def _imported(*args: str) -> set[str]:
    """The modules a ``python -m lorasup ARGS`` process imported (``-X importtime``)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "lorasup", *args],
                          capture_output=True, text=True, timeout=60, env=child_env())
    return {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


def test_help_imports_nothing_heavy_and_no_command_imports_rich(tmp_path: Path) -> None:
    heavy = {"anyio", "psutil", "structlog", "pydantic", "rich", "matplotlib", "numpy"}
    assert not _imported("--help") & heavy
    # ls imports structlog (through the report); structlog then finds no rich (its attempt
    # is logged as a ``rich`` line of a few microseconds, and nothing of rich is loaded)
    listed = _imported("ls", "--logs-dir", str(tmp_path))
    assert "structlog.dev" in listed
    assert not {name for name in listed if name.startswith("rich.")}
