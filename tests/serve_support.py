"""A real ``lorasup serve`` on a temporary state directory, driven through its socket."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.support import HELPERS, child_env, gone, lorasup_argv, wait_for

BAR_TRAINER = HELPERS / "bar_trainer.py"
FINAL = ("completed", "failed", "cancelled", "lost")


def bar_job(steps: int = 3, step_seconds: float = 0.02, *extra: str, **keys: Any
            ) -> dict[str, Any]:
    """A ``--trainer command`` job running the bar trainer (``steps: k/N`` frames)."""
    return {"trainer": "command", "steps": steps, "grace": 2, "no_output_timeout": 30,
            "command": [sys.executable, str(BAR_TRAINER), "--steps", str(steps),
                        "--step-seconds", str(step_seconds), *extra], **keys}


class Daemon:
    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        self.args = args
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "daemon.log"
        self.http: httpx.Client | None = None

    def start(self, *extra: str, umask: int = -1, wait: bool = True) -> Daemon:
        argv = lorasup_argv("serve", "--state-dir", str(self.state), "--log-format", "json",
                            "--gpus", "none", "--retry-backoff", "0.1", *self.args, *extra)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                         env={**child_env(), **self.env}, cwd=self.tmp,
                                         umask=umask)
        self.http = httpx.Client(transport=httpx.HTTPTransport(
            uds=str(self.state / "lorasup.sock")), base_url="http://lorasup", timeout=20,
            headers={"X-Lorasup-CSRF": "1"})  # as the CLI sends (security.py)
        if wait:
            assert wait_for(self._healthy, timeout=20), self.log.read_text()[-3000:]
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None and self.http is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited {self.proc.returncode}: "
                                 f"{self.log.read_text()[-3000:]}")
        # httpx leaves the socket of a refused connect unclosed: probe with our own first
        # (a SIGKILLed daemon leaves its socket file behind).
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.state / "lorasup.sock"))
            except OSError:
                return False
        try:
            return self.http.get("/healthz").json()["pid"] == self.proc.pid
        except (httpx.HTTPError, OSError, ValueError):
            return False

    # -- API ------------------------------------------------------------------------------

    def submit(self, job: dict[str, Any], **payload: Any) -> httpx.Response:
        assert self.http is not None
        return self.http.post("/jobs", json={"job": job, "cwd": str(self.tmp), **payload})

    def submit_ok(self, job: dict[str, Any], **payload: Any) -> int:
        response = self.submit(job, **payload)
        assert response.status_code == 201, response.text
        return int(response.json()["id"])

    def job(self, job_id: int) -> dict[str, Any]:
        assert self.http is not None
        return self.http.get(f"/jobs/{job_id}").json()

    def wait(self, job_id: int, *states: str, timeout: float = 30.0) -> dict[str, Any]:
        states = states or FINAL
        seen: dict[str, Any] = {}

        def reached() -> bool:
            seen.update(self.job(job_id))
            return seen["state"] in states

        assert wait_for(reached, timeout=timeout, interval=0.05), (
            seen, self.log.read_text()[-3000:])
        return seen

    def wait_step(self, job_id: int, step: int, timeout: float = 30.0) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        def reached() -> bool:
            seen.update(self.job(job_id))
            return (seen.get("step") or 0) >= step and seen["state"] == "running"

        assert wait_for(reached, timeout=timeout, interval=0.05), (
            seen, self.log.read_text()[-3000:])
        return seen

    # -- the process ----------------------------------------------------------------------

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 40.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        if self.http is not None:
            self.http.close()
            self.http = None
        return code

    def log_records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def cleanup(self) -> None:
        """No daemon, run supervisor or trainer outlives the test."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.http is not None:
            self.http.close()
        db = self.state / "lorasup.db"
        if not db.exists():
            return
        try:
            with contextlib.closing(sqlite3.connect(db)) as conn:
                rows = conn.execute("SELECT pid, run_dir FROM attempts").fetchall()
        except sqlite3.Error:  # killed before its schema was written (a full disk): no runs
            rows = []
        groups = [pid for pid, _ in rows if pid]
        for _, run_dir in rows:
            events = Path(run_dir) / "events.jsonl"
            if events.exists():
                for line in events.read_text().splitlines():
                    if '"kind":"started"' in line:
                        groups.append(json.loads(line)["pid"])
        for pgid in groups:
            try:  # only a group whose leader is still one of this test's processes
                cmdline = Path(f"/proc/{pgid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"lorasup" in cmdline or b"bar_trainer" in cmdline:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
        assert wait_for(lambda: all(gone(p) for p in groups), timeout=10)


def events_of(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]
