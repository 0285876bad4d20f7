"""Benchmark ``lorasup ps`` with 1,000 jobs: the daemon up, and the daemon down (``ps``
then reads ``lorasup.db`` read-only itself).

    python bench/bench_ps.py [--jobs 1000] [--rounds 7]

The state database is written through the store: ``--jobs`` jobs, of which 10 are queued
(backing off for an hour, so the daemon starts none of them) and the rest finished, each
with its attempt. Each timing is the wall time of a new ``lorasup ps`` process (Python
start-up included), median of ``--rounds``, with its CPU time; also ``ps --all`` (every
job) and the bare interpreter importing typer and httpx as a floor. Prints one JSON
document.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serve_common import env, job_spec, start_daemon

from lorasup.supervisor.serve.store import Store

QUEUED = 10


def fill(state: Path, count: int) -> None:
    """``count`` jobs: the first finished (completed or failed), the last QUEUED queued."""
    state.mkdir(parents=True)
    store = Store(state / "lorasup.db")
    spec = job_spec("bench", retries=2)
    for i in range(count):
        job = store.add_job(spec)
        if i >= count - QUEUED:
            store.update_job(job, not_before=time.time() + 3600)
            continue
        store.start_attempt(job, 1, f"job{job}-a1", f"/tmp/none/{job}", "submitted", "cpu0",
                            None)
        outcome = "completed" if i % 7 else "timeout"
        store.end_attempt(job, 1, outcome, 0 if outcome == "completed" else 3, "done", {
            "state": "completed" if outcome == "completed" else "failed", "outcome": outcome,
            "steps_done": 100, "last_loss": 0.1 + i * 1e-4})
    store.close()


def timed(argv: list[str], rounds: int) -> dict[str, float]:
    """Median wall time and median CPU time (user + system, which a loaded box inflates
    less than the wall time) of ``argv`` as a new process."""
    walls, cpus = [], []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        began = time.perf_counter()
        subprocess.run(argv, env=env(), capture_output=True, check=True)
        walls.append(time.perf_counter() - began)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return {"wall_s": round(statistics.median(walls), 3),
            "cpu_s": round(statistics.median(cpus), 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    results: dict[str, object] = {"python": sys.version.split()[0], "cpus": os.cpu_count(),
                                  "jobs": args.jobs, "load": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp_name:
        state = Path(tmp_name) / "state"
        fill(state, args.jobs)
        ps = [sys.executable, "-m", "lorasup", "ps", "--state-dir", str(state)]
        results["python_floor_s"] = timed([sys.executable, "-c", "import typer, httpx"],
                                          args.rounds)
        results["daemon_down_ps_s"] = timed(ps, args.rounds)
        results["daemon_down_ps_all_s"] = timed([*ps, "--all"], args.rounds)
        log = (Path(tmp_name) / "daemon.log").open("wb")
        daemon, http = start_daemon(state, log)
        try:
            shown = subprocess.run(ps, env=env(), capture_output=True, text=True, check=True)
            results["rows_shown_by_default"] = len(shown.stdout.splitlines()) - 1
            results["daemon_up_ps_s"] = timed(ps, args.rounds)
            results["daemon_up_ps_all_s"] = timed([*ps, "--all"], args.rounds)
        finally:
            http.close()
            daemon.terminate()
            daemon.wait(timeout=30)
            log.close()
    results["load_after"] = os.getloadavg()[0]
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
