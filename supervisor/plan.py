"""A run's plan: everything resolved before the trainer is spawned, and what follows
from it alone (the run id, the trainer's environment, the guard's report command, the
``started`` record)."""

from __future__ import annotations

import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorasup.supervisor.events import Started
from lorasup.supervisor.liveness import boot_id, process_start_time
from lorasup.supervisor.redact import redact_argv
from lorasup.trainers.base import Adapter

#: systemd's plumbing meant for lorasup, never for the trainer
SERVICE_ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                       "LISTEN_PID", "LISTEN_FDNAMES")


def new_run_id(trainer: str) -> str:
    """Sortable by time; 32 random bits (and an O_EXCL claim) keep two starts apart."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{trainer}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class RunPlan:
    """Everything resolved before spawning: validated, nothing started yet."""

    run_id: str
    run_dir: Path
    trainer: str
    argv: list[str]
    steps: int
    timeout: float
    no_output_timeout: float
    grace: float
    finish_timeout: float
    nan_patience: int
    cwd: Path
    output_dirs: tuple[Path, ...] = ()
    progress_tty: bool = False
    #: a folder where the trainer writes TensorBoard event files, followed live
    tensorboard_dir: Path | None = None
    #: the silence limit before the first step; None = no_output_timeout
    startup_timeout: float | None = None
    #: time without a new step (from the first step) that counts as stalled; None = off
    no_progress_timeout: float | None = None


@dataclass(frozen=True)
class RunResult:
    outcome: str
    exit_code: int
    run_dir: Path
    report: dict[str, Any] | None


def environment(adapter: Adapter) -> dict[str, str]:
    """lorasup's environment without its service plumbing, unbuffered, plus the
    adapter's additions."""
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_ENVIRONMENT}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(adapter.environment())
    return env


def report_command(run_dir: Path) -> list[str]:
    """What the guard runs after it killed the tree because lorasup died: the report
    of this run (outcome ``lost``), so that it exists without anyone asking."""
    return [sys.executable, "-m", "lorasup", "report", str(run_dir.absolute())]


def started_event(plan: RunPlan, pid: int, wall0: float) -> Started:
    """The ``started`` record: the command (secrets masked) and who supervises it."""
    return Started(run_id=plan.run_id, trainer=plan.trainer,
                   argv=tuple(redact_argv(plan.argv)), pid=pid,
                   steps_requested=plan.steps, wall_time=wall0,
                   supervisor_pid=os.getpid(), supervisor_start=process_start_time(),
                   boot_id=boot_id())
