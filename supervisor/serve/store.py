"""The daemon's memory: jobs and their attempts in SQLite, the only writer of the database.

WAL keeps readers (``lorasup ps`` through the API) from waiting on writers; every state
change is committed before the daemon acts on it, so a crash at any point leaves a record
the next daemon can act on. Calls are small single-row statements, cheap enough for the
event loop's thread.


The database file's faults are in ``dbfile``, the rows and the stored spec in ``rows``;
their names are importable from here as before.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import structlog

from lorasup.supervisor.serve.dbfile import (
    BUSY_MS,
    MIN_FREE,
    SIDE_FILES,
    GuardedConnection,
    StoreUnavailable,
    _utc_stamp,
    damage,
    move_aside,
    unavailable,
)
from lorasup.supervisor.serve.jobspec import JobSpec
from lorasup.supervisor.serve.rows import (
    ACTIVE,
    FINAL,
    STATES,
    AttemptRow,
    JobRow,
    _check_columns,
    _spec,
    _spec_json,
    broken_spec,
    load_spec,
    spec_data,
)

#: re-exported: the rest of serve/ knows these as ``store.<name>``
__all__ = ["ACTIVE", "BUSY_MS", "FINAL", "MIN_FREE", "SIDE_FILES", "STATES", "AttemptRow",
           "GuardedConnection", "JobRow", "Store", "StoreUnavailable", "broken_spec", "damage",
           "internal_reason", "load_spec", "move_aside", "spec_data", "unavailable"]

log = structlog.get_logger("lorasup.serve")



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


def internal_reason(exc: BaseException, doing: str | None = None) -> str:
    """``internal: <ExcType>: <message>``, one bounded line: a job's own failure reason."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    where = f"{doing}: " if doing else ""
    text = f"internal: {where}{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:500]


class Store:
    """One connection, used from the event loop's thread only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        #: (st_dev, st_ino) of the file this connection opened: a file deleted or replaced
        #: under the daemon is told by a different pair at ``path``
        self.identity: tuple[int, int] | None = None
        #: storage incidents since the start, newest last (the health endpoint shows them)
        self.incidents: list[str] = []
        self.db = self._connect()

    def _connect(self) -> GuardedConnection:
        """Open (creating it 0600, whatever the umask) and set up the database."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        for suffix in SIDE_FILES:  # an older daemon's files, created under a loose umask
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f"{self.path}{suffix}", 0o600)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                             factory=GuardedConnection)
        try:
            db.row_factory = sqlite3.Row
            db.execute(f"PRAGMA busy_timeout={BUSY_MS}")
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL: a commit survives a crash of this process (not a power cut of
            # the last few): what a restart of the daemon needs, without an fsync per change.
            db.execute("PRAGMA synchronous=NORMAL")
            with db:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
        except BaseException:
            db.close()
            raise
        self.identity = (st.st_dev, st.st_ino)
        return db

    def close(self) -> None:
        self.db.close()

    def check_file(self) -> None:
        """Notice a database file deleted or replaced under the daemon, and carry on with
        a new file at the path holding everything this connection still sees (the jobs are
        never silently forgotten); a file that replaced ours is kept aside, not used."""
        try:
            st = os.stat(self.path)
            here: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            here = None
        if here == self.identity:
            return
        what = "deleted" if here is None else "replaced by another file"
        kept = None
        if here is not None:
            kept = Path(f"{self.path}.replaced-{_utc_stamp()}")
            os.replace(self.path, kept)
        tmp = self.path.with_name(f".{self.path.name}.rebuild")
        for suffix in ("", *SIDE_FILES):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{tmp}{suffix}")
        try:
            copy = sqlite3.connect(tmp)
            try:
                self.db.backup(copy)  # read through the open (possibly unlinked) file
            finally:
                copy.close()
            os.chmod(tmp, 0o600)
        except (sqlite3.Error, OSError) as exc:
            raise unavailable(exc) or StoreUnavailable(
                503, f"lorasup.db was {what} and cannot be recreated: {exc}", 5) from exc
        # The old connection goes first: closing it removes its -wal/-shm by name.
        with contextlib.suppress(sqlite3.Error):
            self.db.close()
        os.replace(tmp, self.path)
        self.db = self._connect()
        jobs = self.db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        note = (f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {self.path.name} was "
                f"{what} under the running daemon; recreated from its open copy ({jobs} jobs)"
                + (f"; the other file was kept as {kept.name}" if kept else ""))
        self.incidents = [*self.incidents[-9:], note]
        log.error("state_db_replaced", path=str(self.path), what=what, jobs=jobs,
                  kept=str(kept) if kept else None)

    def _write(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        self.check_file()
        with self.db:  # one transaction, committed on leaving
            return self.db.execute(sql, args)

    def free_space_ok(self) -> bool:
        """Enough free space in the state directory for new jobs and their runs."""
        try:
            return shutil.disk_usage(self.path.parent).free >= MIN_FREE
        except OSError:
            return False

    # -- jobs ------------------------------------------------------------------------------

    def add_job(self, spec: JobSpec) -> int:
        if not self.free_space_ok():
            raise StoreUnavailable(507, "no space left in the state directory; new jobs are "
                                        "refused until space returns", 5)
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
        rows = [self._job(r) for r in self.db.execute(sql, args).fetchall()]
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
        try:
            _check_columns(data)
            data["spec"] = _spec(data["spec"])
        except Exception as exc:  # one unreadable row fails its own job, nothing else
            data["spec"] = broken_spec(row)
            data["broken"] = internal_reason(exc, "cannot load the job")
            if data["state"] in ACTIVE:
                log.error("job_unreadable", job=data["id"], error=data["broken"])
                data.update(state="failed", outcome="internal_error", reason=data["broken"])
                with contextlib.suppress(Exception):  # shown failed; written when it can be
                    self._write("UPDATE jobs SET state = 'failed', outcome = 'internal_error',"
                                " reason = ?, updated = ? WHERE id = ? AND state IN "
                                "('queued', 'running')", (data["broken"], time.time(),
                                                          data["id"]))
        return JobRow(**data)

    def restore_job(self, job_id: int, spec: JobSpec, state: str, outcome: str | None,
                    reason: str | None, attempts: int, steps_done: int | None,
                    last_loss: float | None, created: float) -> None:
        """A job rebuilt from its run directories (after a damaged database was moved
        aside), under its old id."""
        self._write(
            "INSERT INTO jobs (id, name, priority, state, outcome, reason, spec, gpus, retries,"
            " attempts, steps_done, last_loss, created, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, spec.name, spec.priority, state, outcome, reason, _spec_json(spec),
             spec.gpus, spec.retries, attempts, steps_done, last_loss, created, time.time()))

    def restore_attempt(self, row: AttemptRow) -> None:
        fields = dict(row.__dict__)
        names = ", ".join(fields)
        self._write(f"INSERT INTO attempts ({names}) VALUES ({','.join('?' * len(fields))})",
                    tuple(fields.values()))

    # -- attempts --------------------------------------------------------------------------

    def start_attempt(self, job_id: int, n: int, run_id: str, run_dir: str, why: str,
                      slot: str | None, devices: str | None) -> None:
        """The job is running from here on: committed before its process is spawned."""
        now = time.time()
        self.check_file()
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
        self.check_file()
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
