"""Benchmark ``lorasup serve``: idle memory with a full history, submit latency, ``ps`` time.

    python bench/bench_serve.py [--jobs 1000] [--rounds 5]

- idle RSS: the daemon's RSS (psutil) after start-up on a database holding ``--jobs``
  finished jobs (written through the store), and again after ``GET /jobs`` listed them all
  and ``GET /metrics`` was scraped.
- submit → spawned: from sending ``POST /jobs`` (a free slot) to (a) the daemon's
  ``run_started`` (the run's ``lorasup start`` process exists) and (b) the trainer's first
  line of Python (it prints time.time()); wall clock.
- per running job: the RSS of a run's supervisor (``lorasup start``) while its trainer runs.
- ``lorasup ps``: wall time of the command (a new Python process) with ``--jobs`` jobs.

Everything runs in a temporary state directory that is removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from serve_common import env, job_spec, start_daemon

from lorasup.supervisor.serve.store import Store

TRAINER = """import sys, time
print(f"T0 {time.time():.6f}", flush=True)
for k in range(1, 4):
    time.sleep(0.05)
    print(f"steps: {k}/3 [00:00<00:00, avr_loss=0.5]", flush=True)
"""


def fill(state: Path, count: int) -> None:
    state.mkdir(parents=True)
    store = Store(state / "lorasup.db")
    spec = job_spec("old", retries=0)
    for i in range(count):
        job = store.add_job(spec)
        store.start_attempt(job, 1, f"job{job}-a1", f"/tmp/none/{job}", "submitted", "cpu0",
                            None)
        store.end_attempt(job, 1, "completed", 0, "done", {
            "state": "completed", "outcome": "completed", "steps_done": 100,
            "last_loss": 0.1 + i * 1e-4})
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, object] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        state = tmp / "state"
        fill(state, args.jobs)
        trainer = tmp / "trainer.py"
        trainer.write_text(TRAINER, encoding="utf-8")
        log = (tmp / "daemon.log").open("wb")
        daemon, http = start_daemon(state, log)
        try:
            proc = psutil.Process(daemon.pid)
            time.sleep(1.0)
            results["idle_rss_mb"] = round(proc.memory_info().rss / 2**20, 1)
            listed = len(http.get("/jobs").json()["jobs"])
            http.get("/metrics")
            results["jobs_listed"] = listed
            results["rss_after_list_and_metrics_mb"] = round(proc.memory_info().rss / 2**20, 1)
            ps_times = []
            for _ in range(args.rounds):
                began = time.perf_counter()
                subprocess.run([sys.executable, "-m", "lorasup", "ps", "--state-dir",
                                str(state)], env=env(), capture_output=True, check=True)
                ps_times.append(time.perf_counter() - began)
            results["ps_seconds_median"] = round(statistics.median(ps_times), 3)
            spawned, trainer_lat, sup_rss = [], [], []
            for _ in range(args.rounds):
                began = time.time()
                job = http.post("/jobs", json={"job": {
                    "trainer": "command", "steps": 3, "command": [sys.executable, str(trainer)]},
                    "cwd": str(tmp)}).json()["id"]
                run_dir = state / "runs" / f"job{job}-a1"
                t0 = None
                while time.time() - began < 30:
                    text = (run_dir / "trainer.log").read_text() if (
                        run_dir / "trainer.log").exists() else ""
                    if "T0 " in text:
                        t0 = float(text.split("T0 ")[1].split()[0])
                        pid = http.get(f"/jobs/{job}").json().get("pid")
                        # the run's supervisor while its trainer runs
                        with contextlib.suppress(psutil.Error, TypeError, ValueError):
                            sup_rss.append(psutil.Process(pid).memory_info().rss)
                        break
                    time.sleep(0.002)
                for line in (tmp / "daemon.log").read_text().splitlines():
                    record = json.loads(line) if line.startswith("{") else {}
                    if record.get("event") == "run_started" and record.get("job") == job:
                        attempt = http.get(f"/jobs/{job}").json()["attempts"][0]
                        spawned.append(attempt["started"] - began)
                if t0 is not None:
                    trainer_lat.append(t0 - began)
                while http.get(f"/jobs/{job}").json()["state"] == "running":
                    time.sleep(0.05)
            results["submit_to_run_process_ms_median"] = round(
                1000 * statistics.median(spawned), 1)
            results["submit_to_trainer_ms_median"] = round(
                1000 * statistics.median(trainer_lat), 1)
            results["run_supervisor_rss_mb_median"] = round(
                statistics.median(sup_rss) / 2**20, 1) if sup_rss else None
            results["daemon_rss_after_runs_mb"] = round(proc.memory_info().rss / 2**20, 1)
        finally:
            http.close()
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
            log.close()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
