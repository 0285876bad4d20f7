"""``lorasup serve`` under concurrent submits while storage and process faults hit it.

    python bench/bench_serve_faults.py [--jobs 200] [--slots 4] [--clients 32]

``--jobs`` submits from ``--clients`` threads at once, each job a tiny ``--trainer command``
run (3 steps). While they arrive and run: a second SQLite connection holds ``BEGIN
EXCLUSIVE`` on ``lorasup.db`` for 3 s (twice), and the daemon is killed with SIGKILL and
started again (twice). A client retries a refused submit (503/507, after ``Retry-After``)
and one cut by the kill; before re-sending a cut one it looks the job up by its unique
name once the daemon is back (the cut request may have been committed).

Checked at the end, once every job is final: each name is in exactly one job (none lost,
none duplicated), every job ``completed`` with the report of its own run (the run id in
``report.json`` is the attempt's), the daemon never exited but for our SIGKILLs, and no
trainer process is alive 5 s after its run ended. Prints the numbers as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from serve_common import env

TRAINER = """import sys, time
for k in range(1, 4):
    time.sleep(0.02)
    print(f"steps: {k}/3 [00:00<00:00, avr_loss=0.5]", flush=True)
"""


class Serve:
    """One daemon at a time on ``state``; ``restart`` after a kill."""

    def __init__(self, tmp: Path, slots: int) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        self.slots = slots
        self.proc: subprocess.Popen[bytes] | None = None
        self.own_kills = 0
        self.self_exits: list[int] = []
        self.lock = threading.Lock()
        self.up = threading.Event()

    def start(self) -> None:
        log = (self.tmp / "daemon.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lorasup", "serve", "--state-dir", str(self.state),
             "--gpus", "none", "--slots", str(self.slots), "--retry-backoff", "0.1",
             "--log-format", "json"], stdout=log, stderr=subprocess.STDOUT, env=env())
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, OSError, ValueError), \
                    client(self.state, 2) as http:
                if http.get("/healthz").json()["pid"] == self.proc.pid:
                    self.up.set()
                    return
            if self.proc.poll() is not None:
                raise SystemExit(f"daemon exited {self.proc.returncode} at start")
            time.sleep(0.05)
        raise SystemExit("daemon did not come up")

    def kill_and_restart(self) -> None:
        with self.lock:
            assert self.proc is not None
            self.up.clear()
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.own_kills += 1
            self.start()

    def check_alive(self) -> None:
        with self.lock:
            if self.proc is not None and self.proc.poll() is not None:
                self.self_exits.append(self.proc.returncode)
                self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)


class Counts(dict):  # type: ignore[type-arg]
    """Counters bumped from many threads."""

    def __init__(self) -> None:
        super().__init__(dict.fromkeys(("accepted", "cut", "found_after_cut", "http_503",
                                        "http_507"), 0))
        self._lock = threading.Lock()

    def bump(self, key: str) -> None:
        with self._lock:
            self[key] = self.get(key, 0) + 1


def client(state: Path, timeout: float = 20) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(state / "lorasup.sock")),
                        base_url="http://lorasup", timeout=timeout)


def submit(serve: Serve, trainer: Path, name: str, counts: Counts) -> None:
    job = {"trainer": "command", "steps": 3, "grace": 2, "no_output_timeout": 30,
           "command": [sys.executable, str(trainer)], "name": name}
    cut = False
    while True:
        serve.up.wait()
        try:
            with client(serve.state) as http:
                # committed before the cut? then it is there already
                if cut and any(j["name"] == name for j in http.get("/jobs").json()["jobs"]):
                    counts.bump("found_after_cut")
                    return
                response = http.post("/jobs", json={"job": job, "cwd": str(serve.tmp)})
        except (httpx.HTTPError, OSError):
            counts.bump("cut")
            cut = True
            time.sleep(0.2)
            continue
        if response.status_code == 201:
            counts.bump("accepted")
            return
        if response.status_code in (503, 507):
            counts.bump(f"http_{response.status_code}")
            assert response.json()["error"] and response.headers.get("Retry-After")
            time.sleep(min(float(response.headers.get("Retry-After", 1)), 1.0))
            continue
        raise SystemExit(f"submit {name}: {response.status_code} {response.text}")


def hold_lock(state: Path, seconds: float) -> None:
    db = sqlite3.connect(state / "lorasup.db", isolation_level=None, timeout=30)
    try:
        db.execute("BEGIN EXCLUSIVE")
        time.sleep(seconds)
        db.execute("ROLLBACK")
    finally:
        db.close()


def trainers_alive(trainer: Path) -> list[int]:
    wanted = os.fsencode(str(trainer))
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if wanted in (entry / "cmdline").read_bytes().split(b"\0"):
                    alive.append(int(entry.name))
    return alive


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    shared = Counts()
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        trainer = tmp / "trainer.py"
        trainer.write_text(TRAINER)
        serve = Serve(tmp, args.slots)
        serve.start()
        names = [f"bench-{i}" for i in range(args.jobs)]
        faults: list[tuple[float, str]] = sorted(
            [(rng.uniform(0.5, 6), "lock"), (rng.uniform(4, 12), "lock"),
             (rng.uniform(1, 8), "kill"), (rng.uniform(8, 20), "kill")])

        def inject() -> None:
            start = time.monotonic()
            for at, what in faults:
                time.sleep(max(0.0, at - (time.monotonic() - start)))
                if what == "lock":
                    threading.Thread(target=hold_lock, args=(serve.state, 3.0)).start()
                else:
                    serve.kill_and_restart()

        injector = threading.Thread(target=inject)
        injector.start()
        with ThreadPoolExecutor(args.clients) as pool:
            for future in [pool.submit(submit, serve, trainer, n, shared) for n in names]:
                future.result()
        submitted_s = time.monotonic() - began
        injector.join()
        ended_at: dict[int, float] = {}
        deadline = time.monotonic() + 900
        jobs: list[dict] = []
        while time.monotonic() < deadline:
            serve.check_alive()
            with contextlib.suppress(httpx.HTTPError, OSError), client(serve.state) as http:
                jobs = http.get("/jobs").json()["jobs"]
                now = time.monotonic()
                for j in jobs:
                    if j["state"] in ("completed", "failed", "cancelled", "lost"):
                        ended_at.setdefault(j["id"], now)
                if len(jobs) >= args.jobs and all(j["id"] in ended_at for j in jobs):
                    break
            time.sleep(0.5)
        drained_s = time.monotonic() - began
        time.sleep(5)
        leftovers = trainers_alive(trainer)
        by_name: dict[str, int] = {}
        for j in jobs:
            by_name[j["name"]] = by_name.get(j["name"], 0) + 1
        misreported = []
        db = sqlite3.connect(serve.state / "lorasup.db")
        for j in jobs:
            rows = db.execute("SELECT run_id, run_dir FROM attempts WHERE job_id = ? "
                              "ORDER BY n DESC LIMIT 1", (j["id"],)).fetchall()
            if j["state"] != "completed" or not rows:
                misreported.append((j["id"], j["state"], j["reason"]))
                continue
            run_id, run_dir = rows[0]
            with contextlib.suppress(OSError, ValueError):
                report = json.loads((Path(run_dir) / "report.json").read_text())
                if report.get("run_id") == run_id and report.get("outcome") == "completed":
                    continue
            misreported.append((j["id"], "report", run_id))
        attempts = db.execute("SELECT COUNT(*) FROM attempts").fetchone()[0]
        db.close()
        serve.stop()
        states: dict[str, int] = {}
        for j in jobs:
            states[j["state"]] = states.get(j["state"], 0) + 1
        print(json.dumps({
            "jobs": args.jobs, "slots": args.slots, "clients": args.clients,
            "faults": [f"{what}@{at:.1f}s" for at, what in faults],
            "submits": dict(shared), "states": states, "attempts": attempts,
            "lost": sorted(set(names) - set(by_name)),
            "duplicated": sorted(n for n, c in by_name.items() if c > 1),
            "misreported": misreported[:20], "misreported_count": len(misreported),
            "daemon_sigkills": serve.own_kills, "daemon_self_exits": serve.self_exits,
            "trainers_alive_5s_after": leftovers,
            "all_submitted_s": round(submitted_s, 1), "all_final_s": round(drained_s, 1),
        }, indent=1))


if __name__ == "__main__":
    main()
