"""The daemon's memory: jobs and their attempts in SQLite, the only writer of the database.

WAL keeps readers (``lorasup ps`` through the API) from waiting on writers; every state
change is committed before the daemon acts on it, so a crash at any point leaves a record
the next daemon can act on. Calls are small single-row statements, cheap enough for the
event loop's thread.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorasup.supervisor.serve.jobspec import JobSpec

#: states a job can be in; the last four are final
STATES = ("queued", "running", "completed", "failed", "cancelled", "lost")
ACTIVE = ("queued", "running")
FINAL = ("completed", "failed", "cancelled", "lost")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL,
    outcome TEXT,
    reason TEXT,
    spec TEXT NOT NULL,
    gpus INTEGER NOT NULL,
    retries INTEGER NOT NULL,
    retries_used INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    target_step INTEGER,
    saved_step INTEGER NOT NULL DEFAULT 0,
    steps_done INTEGER,
    last_loss REAL,
    stop_request TEXT,
    waiting TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS attempts (
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    n INTEGER NOT NULL,
    run_id TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    why TEXT NOT NULL,
    slot TEXT,
    devices TEXT,
    pid INTEGER,
    start_time INTEGER,
    boot_id TEXT,
    started REAL NOT NULL,
    ended REAL,
    outcome TEXT,
    exit_code INTEGER,
    end_reason TEXT,
    steps INTEGER,
    PRIMARY KEY (job_id, n)
);
CREATE TABLE IF NOT EXISTS submits (
    key TEXT PRIMARY KEY,
    job_id INTEGER NOT NULL,
    created REAL NOT NULL
);
"""

#: how long an ``Idempotency-Key`` names its job (a client's retry comes within seconds)
SUBMIT_KEY_SECONDS = 24 * 3600


@dataclass
class JobRow:
    id: int
    name: str
    priority: int
    state: str
    outcome: str | None
    reason: str | None
    spec: JobSpec
    retries_used: int
    attempts: int
    not_before: float
    target_step: int | None
    saved_step: int
    steps_done: int | None
    last_loss: float | None
    stop_request: str | None
    waiting: str | None
    created: float
    updated: float


@dataclass
class AttemptRow:
    job_id: int
    n: int
    run_id: str
    run_dir: str
    why: str
    slot: str | None
    devices: str | None
    pid: int | None
    start_time: int | None
    boot_id: str | None
    started: float
    ended: float | None
    outcome: str | None
    exit_code: int | None
    end_reason: str | None
    steps: int | None


def _spec_json(spec: JobSpec) -> str:
    data = dict(spec.__dict__)
    data["output_dirs"] = list(spec.output_dirs)
    return json.dumps(data)


def _spec(text: str) -> JobSpec:
    data = json.loads(text)
    data["output_dirs"] = tuple(data.get("output_dirs") or ())
    return JobSpec(**data)


class Store:
    """One connection, used from the event loop's thread only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL: a commit survives a crash of this process (not a power cut of the
        # last few): what a restart of the daemon needs, without an fsync per change.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def _write(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        with self.db:  # one transaction, committed on leaving
            return self.db.execute(sql, args)

    # -- jobs ------------------------------------------------------------------------------

    def add_job(self, spec: JobSpec) -> int:
        now = time.time()
        cur = self._write(
            "INSERT INTO jobs (name, priority, state, spec, gpus, retries, created, updated)"
            " VALUES (?, ?, 'queued', ?, ?, ?, ?, ?)",
            (spec.name, spec.priority, _spec_json(spec), spec.gpus, spec.retries, now, now))
        return int(cur.lastrowid or 0)

    def job(self, job_id: int) -> JobRow | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._job(row) if row else None

    def jobs(self, states: tuple[str, ...] | None = None, limit: int | None = None
             ) -> list[JobRow]:
        sql = "SELECT * FROM jobs"
        args: list[Any] = []
        if states:
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            args += states
        sql += " ORDER BY id DESC"
        if limit:
            sql += " LIMIT ?"
            args.append(limit)
        rows = [self._job(r) for r in self.db.execute(sql, args)]
        rows.reverse()
        return rows

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for row in self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            counts[row[0]] = row[1]
        return counts

    def finished_outcomes(self) -> dict[str, int]:
        return {r[0] or "none": r[1] for r in self.db.execute(
            "SELECT outcome, COUNT(*) FROM jobs WHERE state IN "
            "('completed', 'failed', 'cancelled', 'lost') GROUP BY outcome")}

    def durations(self) -> list[float]:
        return [r[0] for r in self.db.execute(
            "SELECT ended - started FROM attempts WHERE ended IS NOT NULL")]

    def steps_total(self) -> int:
        """Steps done by finished attempts (each counts its own, so this only grows)."""
        row = self.db.execute("SELECT COALESCE(SUM(steps), 0) FROM attempts").fetchone()
        return int(row[0])

    def update_job(self, job_id: int, **fields: Any) -> None:
        fields["updated"] = time.time()
        names = ", ".join(f"{k} = ?" for k in fields)
        self._write(f"UPDATE jobs SET {names} WHERE id = ?", (*fields.values(), job_id))

    def _job(self, row: sqlite3.Row) -> JobRow:
        data = dict(row)
        data.pop("gpus")
        data.pop("retries")
        data["spec"] = _spec(data["spec"])
        return JobRow(**data)

    # -- attempts --------------------------------------------------------------------------

    def start_attempt(self, job_id: int, n: int, run_id: str, run_dir: str, why: str,
                      slot: str | None, devices: str | None) -> None:
        """The job is running from here on: committed before its process is spawned."""
        now = time.time()
        with self.db:
            self.db.execute(
                "INSERT INTO attempts (job_id, n, run_id, run_dir, why, slot, devices, started)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, n, run_id, run_dir, why, slot, devices, now))
            self.db.execute(
                "UPDATE jobs SET state = 'running', attempts = ?, waiting = NULL, "
                "stop_request = NULL, updated = ? WHERE id = ?", (n, now, job_id))

    def set_process(self, job_id: int, n: int, pid: int, start_time: int | None,
                    boot_id: str) -> None:
        self._write("UPDATE attempts SET pid = ?, start_time = ?, boot_id = ? "
                    "WHERE job_id = ? AND n = ?", (pid, start_time, boot_id, job_id, n))

    def end_attempt(self, job_id: int, n: int, outcome: str | None, exit_code: int | None,
                    end_reason: str, job_fields: dict[str, Any], steps: int | None = None
                    ) -> None:
        """The attempt's end and the job's next state, in one transaction."""
        now = time.time()
        job_fields = {**job_fields, "updated": now}
        names = ", ".join(f"{k} = ?" for k in job_fields)
        with self.db:
            self.db.execute(
                "UPDATE attempts SET ended = ?, outcome = ?, exit_code = ?, end_reason = ?, "
                "steps = ? WHERE job_id = ? AND n = ?",
                (now, outcome, exit_code, end_reason, steps, job_id, n))
            self.db.execute(f"UPDATE jobs SET {names} WHERE id = ?",
                            (*job_fields.values(), job_id))

    def attempt(self, job_id: int, n: int) -> AttemptRow | None:
        row = self.db.execute("SELECT * FROM attempts WHERE job_id = ? AND n = ?",
                              (job_id, n)).fetchone()
        return AttemptRow(**dict(row)) if row else None

    def attempts(self, job_id: int) -> list[AttemptRow]:
        return [AttemptRow(**dict(r)) for r in self.db.execute(
            "SELECT * FROM attempts WHERE job_id = ? ORDER BY n", (job_id,))]

    # -- idempotent submits (POST /jobs with an Idempotency-Key) ---------------------------

    def submitted(self, key: str, now: float | None = None) -> int | None:
        """The job an earlier submit with ``key`` queued (within SUBMIT_KEY_SECONDS)."""
        since = (time.time() if now is None else now) - SUBMIT_KEY_SECONDS
        row = self.db.execute("SELECT job_id FROM submits WHERE key = ? AND created > ?",
                              (key, since)).fetchone()
        return int(row[0]) if row else None

    def add_job_once(self, spec: JobSpec, key: str) -> tuple[int, bool]:
        """(job id, True when new): the job queued earlier with ``key``, else a new one. The
        key is written in the job's own transaction: no job is committed without its key, so
        a client that lost the reply and retries gets this job, never a second one."""
        now = time.time()
        with self.db:
            self.db.execute("DELETE FROM submits WHERE created <= ?",
                            (now - SUBMIT_KEY_SECONDS,))
            row = self.db.execute("SELECT job_id FROM submits WHERE key = ?",
                                  (key,)).fetchone()
            if row:
                return int(row[0]), False
            cur = self.db.execute(
                "INSERT INTO jobs (name, priority, state, spec, gpus, retries, created, "
                "updated) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?)",
                (spec.name, spec.priority, _spec_json(spec), spec.gpus, spec.retries, now,
                 now))
            job_id = int(cur.lastrowid or 0)
            self.db.execute("INSERT INTO submits (key, job_id, created) VALUES (?, ?, ?)",
                            (key, job_id, now))
        return job_id, True
