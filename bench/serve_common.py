"""What the daemon benchmarks share: the environment that imports this checkout, and a
plain job spec to fill a state database with."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT.parent))

from lorasup.supervisor.serve.jobspec import JobSpec  # noqa: E402


def env() -> dict[str, str]:
    """The environment for the daemon and clients: this checkout first on the path."""
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT.parent),
                                                      out.get("PYTHONPATH")]))
    return out


def job_spec(name: str, retries: int = 0) -> JobSpec:
    """A 100-step ``command`` job as the store holds it (nothing to run: a row to list)."""
    return JobSpec(values={"trainer": "command", "steps": 100}, name=name, priority=0,
                   gpus=0, cwd="/tmp", retries=retries, notify={}, trainer="command",
                   steps=100, grace=30.0, run_dir=None, logs_dir=None)


def start_daemon(state: Path, log: IO[bytes], *extra: str
                 ) -> tuple[subprocess.Popen[bytes], httpx.Client]:
    """``lorasup serve`` on ``state`` (CPU slots; ``extra``: more of its flags), and a
    client of its socket (sending the CLI's CSRF header), once it answers ``/healthz``
    (30 s at most)."""
    daemon = subprocess.Popen(
        [sys.executable, "-m", "lorasup", "serve", "--state-dir", str(state), "--gpus",
         "none", "--log-format", "json", *extra], stdout=log, stderr=subprocess.STDOUT,
        env=env())
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(state / "lorasup.sock")),
                        base_url="http://lorasup", timeout=30,
                        headers={"X-Lorasup-CSRF": "1"})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if http.get("/healthz").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return daemon, http
