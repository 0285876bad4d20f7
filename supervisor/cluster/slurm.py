"""``lorasup sbatch JOB.toml [-- sbatch options]``: a SLURM batch job whose entrypoint is
``lorasup start``, and ``lorasup status --slurm JOBID``: its attempts.

SLURM schedules, requeues and cancels; lorasup supervises one attempt and says by its exit
code what the attempt needs. The generated batch script

- asks for ``--signal=B:USR1@WARN``: WARN seconds before the time limit the batch shell
  gets SIGUSR1 and forwards it, once, to lorasup, which stops the trainer with its final
  save and ends ``preempted`` (exit 6);
- forwards one stop request: a cancel's SIGTERM (``scancel``) reaches lorasup once (under
  proctrack/linuxproc or cgroup it also comes from SLURM itself; lorasup reads the two as
  one request);
- requeues the job itself (``scontrol requeue``) only after ``preempted`` (6), ``stalled``
  (4) or ``timeout`` (3), and at most ``--max-restarts`` times; never after a cancel, a
  completed run or the trainer's own failure. SLURM requeues by itself after a node
  failure, and an operator's ``scontrol requeue`` is SLURM's own: both are honoured;
- names each attempt's run directory ``slurm-<jobid>-<restart>`` under the logs directory,
  and starts each restart with ``--resume-from`` the newest earlier attempt, so the job
  ends at exactly its step count in total.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: lorasup's exit codes after which the script requeues the job (README "Outcomes and exit
#: codes"; tests/test_slurm.py checks them against the engine's table)
REQUEUE_EXITS = {"preempted": 6, "stalled": 4, "timeout": 3}
DEFAULT_WARN_S = 300
DEFAULT_MAX_RESTARTS = 3
#: options the script sets itself; a user's value would break the requeue rules
OWNED_OPTIONS = ("--signal", "--no-requeue", "--open-mode")
SUBMIT_TIMEOUT_S = 60.0
#: squeue/sacct retry an unreachable controller for long: ``status`` answers without them
QUERY_TIMEOUT_S = 10.0
#: SLURM's words for no time limit
UNLIMITED = ("infinite", "unlimited")

_TIME = re.compile(
    r"^(?:(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
    r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$")


class SlurmError(ValueError):
    """A refusal of ``lorasup sbatch``/``status --slurm``: one line for the user (exit 2)."""


def parse_time(text: str) -> int | None:
    """A SLURM time limit in seconds (None: unlimited), in any of sbatch's forms: ``M``,
    ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``; SlurmError otherwise."""
    value = text.strip()
    if value.lower() in UNLIMITED:
        return None
    match = _TIME.match(value) if value.isascii() else None
    if match is None:
        raise SlurmError(f"invalid --time {text!r}: use M, M:S, H:M:S, D-H, D-H:M or D-H:M:S")
    if match["days"] is not None:
        days, hours = int(match["days"]), int(match["dh"])
        minutes, seconds = int(match["dm"] or 0), int(match["ds"] or 0)
        return ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    a, b, c = match["a"], match["b"], match["c"]
    if c is not None:
        return (int(a) * 60 + int(b)) * 60 + int(c)
    if b is not None:
        return int(a) * 60 + int(b)
    return int(a) * 60


def time_limit(options: list[str]) -> int | None:
    """The ``--time``/``-t`` among sbatch options, in seconds; None when not given or
    unlimited (the partition's default applies: it cannot be checked here)."""
    found: str | None = None
    for i, arg in enumerate(options):
        if arg in ("--time", "-t") and i + 1 < len(options):
            found = options[i + 1]
        elif arg.startswith("--time="):
            found = arg.split("=", 1)[1]
        elif arg.startswith("-t") and len(arg) > 2 and not arg.startswith("--"):
            found = arg[2:]
    return parse_time(found) if found is not None else None


@dataclass(frozen=True)
class BatchJob:
    """What the batch script runs; None fields are read from the environment at run time
    (the shipped ``systemd/slurm/lorasup.sbatch``)."""

    job_file: str | None
    logs_dir: str | None
    lorasup: str | None
    warn_s: int = DEFAULT_WARN_S
    max_restarts: int = DEFAULT_MAX_RESTARTS
    directives: tuple[str, ...] = ()


def _value(given: str | None, variable: str, default: str | None) -> str:
    """``NAME=value`` for the script: the given value quoted, else the environment's."""
    if given is not None:
        return f"{variable}={shlex.quote(given)}"
    if default is None:
        return f"{variable}=${{{variable}:?set {variable} to a lorasup job file}}"
    return f"{variable}=${{{variable}:-{default}}}"


def render(job: BatchJob) -> str:
    """The batch script (bash: SLURM runs batch scripts with their interpreter line)."""
    lines = ["#!/bin/bash",
             "# lorasup as the per-job entrypoint of a SLURM job: SLURM schedules, requeues and",
             "# cancels; lorasup supervises one attempt (README \"Clusters\"). Written by",
             "# `lorasup sbatch`; systemd/slurm/lorasup.sbatch is the same script.",
             *(["#", "#   sbatch --export=ALL,JOB=/srv/lora/jobs/mystyle.toml "
                "systemd/slurm/lorasup.sbatch", "#"] if job.job_file is None else []),
             "# A cancel (scancel) is SIGTERM, then SIGKILL after slurm.conf's KillWait (30 s",
             "# by default): keep the job's grace below it so the trainer's save completes.",
             *job.directives,
             "#SBATCH --requeue",
             "#SBATCH --open-mode=append",
             f"#SBATCH --signal=B:USR1@{job.warn_s}",
             "",
             "set -u",
             _value(job.job_file, "JOB", None),
             _value(job.logs_dir, "LOGS", "training_logs"),
             _value(str(job.max_restarts) if job.job_file is not None else None,
                    "MAX_RESTARTS", str(job.max_restarts)),
             ]
    if job.lorasup is not None:
        lines.append(f"LORASUP=({' '.join(shlex.quote(a) for a in shlex.split(job.lorasup))})")
    else:
        lines.append("read -r -a LORASUP <<< \"${LORASUP:-lorasup}\"")
    requeue = "|".join(str(code) for code in sorted(REQUEUE_EXITS.values()))
    lines += [
        'restart=${SLURM_RESTART_COUNT:-0}',
        'run_dir="$LOGS/slurm-${SLURM_JOB_ID}-${restart}"',
        "# Each restart continues the newest earlier attempt (its saved state, its steps).",
        "resume=()",
        'for ((i = restart - 1; i >= 0; i--)); do',
        '    if [ -f "$LOGS/slurm-${SLURM_JOB_ID}-$i/events.jsonl" ]; then',
        '        resume=(--resume-from "$LOGS/slurm-${SLURM_JOB_ID}-$i"); break',
        "    fi",
        "done",
        "",
        "# One stop request reaches lorasup: the first signal is forwarded, later ones are",
        "# not (SLURM's own SIGTERM reaches lorasup too; it reads the two as one request).",
        "# A SIGTERM is a cancel (scancel) or SLURM's own requeue: never requeued by us.",
        "forwarded='' cancelled=''",
        "forward() {",
        '    [ "$1" = USR1 ] || cancelled=1',
        '    if [ -z "$forwarded" ]; then forwarded=$1; kill "-$1" "$child" 2>/dev/null; fi',
        "}",
        "trap 'forward USR1' USR1",
        "trap 'forward TERM' TERM",
        "trap 'forward INT' INT",
        '"${LORASUP[@]}" start --config "$JOB" --run-dir "$run_dir" --log-format json \\',
        '    "${resume[@]}" &',
        "child=$!",
        'while kill -0 "$child" 2>/dev/null; do wait "$child"; done',
        'wait "$child"',
        "code=$?",
        "",
        'case "$code" in',
        f"    {requeue}) ;;  # preempted (6), stalled (4), timeout (3): worth another attempt",
        '    *) exit "$code" ;;',
        "esac",
        'if [ -n "$cancelled" ]; then',
        '    echo "lorasup sbatch: exit $code after a cancel: not requeued" >&2; exit "$code"',
        "fi",
        'if [ "$restart" -ge "$MAX_RESTARTS" ]; then',
        '    echo "lorasup sbatch: exit $code: not requeued, $restart of $MAX_RESTARTS' \
        ' restarts used" >&2',
        '    exit "$code"',
        "fi",
        'echo "lorasup sbatch: exit $code: requeueing (restart $((restart + 1)) of' \
        ' $MAX_RESTARTS)" >&2',
        'scontrol requeue "$SLURM_JOB_ID"',
        'exit "$code"',
    ]
    return "\n".join(lines) + "\n"


def shipped() -> str:
    """``systemd/slurm/lorasup.sbatch``: the same script, its paths from the environment
    (``sbatch --export=ALL,JOB=/srv/lora/jobs/mystyle.toml systemd/slurm/lorasup.sbatch``)."""
    return render(BatchJob(job_file=None, logs_dir=None, lorasup=None, directives=(
        "#SBATCH --job-name=lora", "#SBATCH --gres=gpu:1", "#SBATCH --time=04:00:00",
        "#SBATCH --output=lorasup-%j.log")))


def check_options(options: list[str], warn_s: int) -> None:
    """Refuse sbatch options the script owns, and a warning not shorter than the limit."""
    for arg in options:
        name = arg.split("=", 1)[0]
        if name in OWNED_OPTIONS:
            raise SlurmError(f"{name} is set by lorasup sbatch (the requeue rules rely on it); "
                             "use --warn S for the time warning")
    limit = time_limit(options)
    if limit is not None and warn_s >= limit:
        raise SlurmError(f"--warn {warn_s} is not shorter than the job's time limit "
                         f"({limit} s): the warning would come before the job could start")


def batch_job(job_file: Path, logs_dir: Path, *, warn_s: int, max_restarts: int,
              options: list[str]) -> BatchJob:
    """The script's settings for a job file, checked (SlurmError with one line)."""
    from lorasup.supervisor.config import ConfigError, build_job, load_toml
    from lorasup.trainers import get_adapter
    from lorasup.trainers.base import UsageError

    if warn_s < 1:
        raise SlurmError(f"--warn must be at least 1 second, not {warn_s}")
    if max_restarts < 0:
        raise SlurmError(f"--max-restarts must be 0 or more, not {max_restarts}")
    check_options(options, warn_s)
    try:
        values = load_toml(job_file)
        for key in ("run_dir", "run_id"):
            if key in values:
                raise SlurmError(f"{job_file}: {key} is set by lorasup sbatch for each attempt "
                                 "(slurm-<jobid>-<restart> under the logs directory); remove it")
        job = build_job(values, {})
        get_adapter(job.trainer).resolve_steps(job.steps, list(job.trainer_argv))
    except (ConfigError, UsageError) as exc:
        raise SlurmError(str(exc)) from None
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", job_file.stem)[:64] or "lora"
    logs = logs_dir.absolute()
    return BatchJob(
        job_file=str(job_file.absolute()), logs_dir=str(logs),
        lorasup=shlex.join([sys.executable, "-m", "lorasup"]),
        warn_s=warn_s, max_restarts=max_restarts,
        directives=(f"#SBATCH --job-name={name}",
                    f"#SBATCH --output={logs}/slurm-%j.out"))


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise SlurmError(f"{name} not found on PATH: is this a SLURM login node?")
    return found


def submit(script: str, options: list[str], logs_dir: Path) -> str:
    """``sbatch --parsable OPTIONS`` with the script on stdin; the job id."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run([_tool("sbatch"), "--parsable", *options], input=script,
                              capture_output=True, text=True, timeout=SUBMIT_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmError(f"sbatch failed: {exc}") from None
    if done.returncode != 0:
        message = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise SlurmError(f"sbatch refused the job: {message[:300]}")
    return done.stdout.strip().split(";", 1)[0]


# -- status --------------------------------------------------------------------------------

def _json_of(argv: list[str]) -> dict[str, Any] | None:
    """A SLURM client's JSON answer, None when it is missing, fails or says nothing (sacct
    without accounting)."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S,
                              check=False)
        data = json.loads(done.stdout) if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _state(value: Any) -> str | None:
    if isinstance(value, list):  # newer SLURM: a list of flags
        value = value[0] if value else None
    if isinstance(value, dict):  # sacct: {"current": ..., "reason": ...}
        value = value.get("current")
        value = value[0] if isinstance(value, list) and value else value
    return value if isinstance(value, str) else None


def scheduler_view(job_id: str) -> dict[str, Any]:
    """State, restarts and exit code of a SLURM job from ``squeue --json``, else ``sacct
    --json``; {} when neither knows it (finished and accounting off)."""
    queue = _json_of(["squeue", "--json", "-j", job_id])
    for job in (queue or {}).get("jobs", []) or []:
        if str(job.get("job_id")) == job_id:
            return {"source": "squeue", "state": _state(job.get("job_state")),
                    "restarts": job.get("restart_cnt"), "reason": job.get("state_reason"),
                    "name": job.get("name")}
    acct = _json_of(["sacct", "--json", "-j", job_id])
    for job in (acct or {}).get("jobs", []) or []:
        if str(job.get("job_id")) == job_id:
            return {"source": "sacct", "state": _state(job.get("state")),
                    "restarts": job.get("restart_cnt"), "name": job.get("name"),
                    "exit_code": job.get("exit_code")}
    return {}


_ATTEMPT = re.compile(r"^slurm-(\d+)-(\d+)$")


def attempts(job_id: str, logs_dir: Path) -> list[dict[str, Any]]:
    """Each attempt's run directory, outcome and steps, in restart order."""
    from lorasup.supervisor.show import RunSummary, load_run

    found: list[tuple[int, Path]] = []
    try:
        for path in logs_dir.iterdir():
            match = _ATTEMPT.match(path.name)
            if match is not None and match[1] == job_id and (path / "events.jsonl").is_file():
                found.append((int(match[2]), path))
    except OSError:
        return []
    out: list[dict[str, Any]] = []
    for restart, path in sorted(found):
        data = load_run(path)
        summary = RunSummary.of(path, data)
        steps = data.get("steps") if isinstance(data.get("steps"), dict) else {}
        out.append({"restart": restart, "run_dir": str(path), "outcome": summary.outcome,
                    "exit_code": data.get("exit_code"), "first_step": steps.get("first"),
                    "last_step": steps.get("last"), "resumed_from": steps.get("resumed_from")})
    return out


def status(job_id: str, logs_dir: Path) -> dict[str, Any]:
    """The job as SLURM sees it and as its attempts' reports tell it."""
    if not job_id.isdigit():
        raise SlurmError(f"a SLURM job id is a number, not {job_id!r}")
    runs = attempts(job_id, logs_dir)
    view = scheduler_view(job_id)
    if not runs and not view:
        raise SlurmError(f"no SLURM job {job_id}: squeue/sacct do not know it and "
                         f"{logs_dir}/ holds no slurm-{job_id}-* run")
    last = next((r["last_step"] for r in reversed(runs) if r["last_step"] is not None), None)
    return {"job_id": job_id, "slurm": view, "attempts": runs,
            "outcome": runs[-1]["outcome"] if runs else None, "last_step": last}


def status_text(data: dict[str, Any]) -> str:
    view = data["slurm"]
    head = f"SLURM job {data['job_id']}"
    if view:
        head += f": {view.get('state')} ({view.get('source')}, restarts {view.get('restarts')})"
    else:
        head += ": no longer known to squeue/sacct"
    lines = [head]
    for run in data["attempts"]:
        first, last = run["first_step"], run["last_step"]
        steps = f"steps {first}..{last}" if first is not None else "no step"
        lines.append(f"  attempt {run['restart']}: {run['outcome']} (exit {run['exit_code']}), "
                     f"{steps}  {os.path.basename(run['run_dir'])}")
    return "\n".join(lines)
