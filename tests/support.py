"""Test helpers: run lorasup as a real process, read its report, check no process survived."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HELPERS = HERE / "helpers"
FAKE_KOHYA = HELPERS / "fake_kohya.py"
REPLAY = HELPERS / "replay.py"
KOHYA_RECORDINGS = HERE / "data" / "kohya"


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    run_dir: Path

    @property
    def report(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "report.json").read_text(encoding="utf-8"))

    def events(self) -> list[dict[str, Any]]:
        lines = (self.run_dir / "events.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line]


def events(run_dir: Path) -> list[dict[str, Any]]:
    """The records of a run's events.jsonl."""
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def steps_of(run_dir: Path) -> list[int]:
    """The steps a run recorded, in file order."""
    return [e["step"] for e in events(run_dir) if e["kind"] == "step"]


def outcome_of(run_dir: Path) -> dict[str, Any]:
    """A run's outcome record (StopIteration when it has none)."""
    return next(e for e in events(run_dir) if e["kind"] == "outcome")


def lorasup_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "lorasup", *args]


def child_env() -> dict[str, str]:
    """The test's environment with this checkout first on the import path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_lorasup(run_dir: Path, *args: str, timeout: float = 60) -> Finished:
    """Run ``lorasup start --run-dir RUN_DIR ARGS...`` to its end."""
    argv = lorasup_argv("start", "--run-dir", str(run_dir), "--log-format", "json", *args)
    began = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          cwd=run_dir.parent, env=child_env())
    return Finished(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - began, run_dir)


def kohya_args(*trainer_args: str, steps: int = 5, grace: float = 0.5,
               silence: float = 10.0) -> list[str]:
    return ["--trainer", "kohya", "--steps", str(steps), "--grace", str(grace),
            "--no-output-timeout", str(silence), "--",
            sys.executable, str(FAKE_KOHYA), *trainer_args]


def gone(pid: int) -> bool:
    """True when the pid runs no more (a zombie nobody reaps counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(condition, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Wait for a condition with a deadline (for state another process changes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()



def run_on_a_terminal(argv: list[str], cwd: Path | None = None,
                      timeout: float = 60) -> tuple[int, str]:
    """Run ``argv`` with stdout and stderr on a pseudo-terminal; (returncode, all output)."""
    import pty

    main, replica = pty.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=replica, stderr=replica,
                            env=child_env(), cwd=cwd)
    os.close(replica)
    output = b""
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not data:
            break
        output += data
    os.close(main)
    return proc.wait(timeout=timeout), output.decode(errors="replace")


class Terminal:
    """A command on a pseudo-terminal that is its controlling terminal (helpers/on_tty.py):
    read what it draws, type at it (``b"\\x03"`` is Ctrl-C to its whole process group)."""

    def __init__(self, argv: list[str], cwd: Path | None = None) -> None:
        import pty

        self.main, replica = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, str(HELPERS / "on_tty.py"), *argv],
                                     stdin=replica, stdout=replica, stderr=replica,
                                     env=child_env(), cwd=cwd)
        os.close(replica)
        self.output = b""
        self._open = True

    def _read(self, deadline: float) -> bool:
        """One read (until ``deadline``); False once every writer closed the terminal."""
        import select

        left = deadline - time.monotonic()
        if not self._open or left <= 0:
            return False
        ready, _, _ = select.select([self.main], [], [], left)
        if not ready:
            return True
        try:
            data = os.read(self.main, 65536)
        except OSError:  # EIO: every writer closed the terminal
            data = b""
        if not data:
            self._open = False
            return False
        self.output += data
        return True

    def wait_for(self, needle: bytes, timeout: float = 30.0) -> bool:
        """Read until ``needle`` was drawn (or the deadline, or the end)."""
        deadline = time.monotonic() + timeout
        while needle not in self.output:
            if not self._read(deadline):
                return needle in self.output
        return True

    def type(self, data: bytes) -> None:
        os.write(self.main, data)

    def finish(self, timeout: float = 60.0) -> tuple[int, str]:
        """Read to the end; (returncode, all output)."""
        deadline = time.monotonic() + timeout
        while self._read(deadline):
            pass
        try:
            code = self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            os.close(self.main)
        return code, self.output.decode(errors="replace")
