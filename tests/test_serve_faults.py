"""``lorasup serve`` under faults of its own world: poison rows in its database, a database
reset, locked, deleted, corrupted or on a full disk, a SIGKILL between committing an attempt
and spawning its run, a loose umask. Real daemons, real runs, a real SQLite file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.serve_support import Daemon, bar_job, events_of
from tests.support import child_env, lorasup_argv, wait_for


def db_path(d: Daemon) -> Path:
    return d.state / "lorasup.db"


def query(d: Daemon, sql: str, *args: object) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(db_path(d))) as db:
        return db.execute(sql, args).fetchall()


def plant(d: Daemon, sql: str, *args: object) -> int:
    with contextlib.closing(sqlite3.connect(db_path(d))) as db, db:
        return int(db.execute(sql, args).lastrowid or 0)


def stop(d: Daemon) -> None:
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def alive(d: Daemon) -> bool:
    return d.proc is not None and d.proc.poll() is None


# -- item 4: one job's error fails that job, never the daemon ----------------------------


def test_poison_rows_fail_alone_and_the_queue_goes_on(daemons, tmp_path: Path) -> None:
    first = daemons().start()
    good = first.submit_ok(bar_job(2))
    assert first.wait(good)["state"] == "completed"
    stop(first)
    ((spec,),) = query(first, "SELECT spec FROM jobs WHERE id = ?", good)
    now = time.time()
    columns = ("INSERT INTO jobs (name, priority, state, spec, gpus, retries, attempts, created,"
               " updated) VALUES (?, 0, ?, ?, 0, 0, ?, ?, ?)")
    # a spec that does not load at all
    unreadable = plant(first, columns, "unreadable", "queued", "{not json", 0, now, now)
    # a spec that loads but whose job file cannot be written when it starts
    data = json.loads(spec)
    data["values"]["steps"] = None
    unwritable = plant(first, columns, "unwritable", "queued", json.dumps(data), 0, now, now)
    # a column the scheduler computes with, holding text
    odd = plant(first, columns, "odd column", "queued", spec, 0, now, now)
    plant(first, "UPDATE jobs SET not_before = 'soon' WHERE id = ?", odd)
    # a running job whose run reports a step too large for SQLite (settled at recovery)
    overflow = plant(first, columns, "overflow", "running", spec, 1, now, now)
    run_dir = tmp_path / "planted-run"
    run_dir.mkdir()
    records = [{"kind": "started", "run_id": "planted", "pid": 999999999, "steps_requested": 3,
                "t": now}, {"kind": "step", "step": 2**63, "t": now},
               {"kind": "outcome", "outcome": "completed", "exit_code": 0, "t": now}]
    (run_dir / "events.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plant(first, "INSERT INTO attempts (job_id, n, run_id, run_dir, why, started) "
                 "VALUES (?, 1, 'planted', ?, 'submitted', ?)", overflow, str(run_dir), now)

    second = daemons().start()
    for job_id in (unreadable, unwritable, odd, overflow):
        seen = second.wait(job_id, timeout=30)
        assert seen["state"] == "failed", seen
        assert seen["reason"].startswith("internal:"), seen
    assert "JSONDecodeError" in second.job(unreadable)["reason"]
    assert "OverflowError" in second.job(overflow)["reason"]
    listed = second.http.get("/jobs").json()["jobs"]  # type: ignore[union-attr]
    assert {j["id"] for j in listed} >= {good, unreadable, unwritable, odd, overflow}
    shown = subprocess.run(lorasup_argv("ps", "--state-dir", str(second.state)),
                           capture_output=True, text=True, env=child_env(), timeout=60)
    assert shown.returncode == 0 and "unreadable" in shown.stdout, shown.stderr
    after = second.submit_ok(bar_job(2))
    assert second.wait(after)["state"] == "completed"
    assert alive(second)
    stop(second)
    third = daemons().start()  # nothing stored stops a later daemon either
    assert third.job(unreadable)["state"] == "failed" and alive(third)


# -- item 5: an attempt's run directory is its own ----------------------------------------


def test_a_reset_database_never_hands_out_an_old_run(daemons, tmp_path: Path) -> None:
    first = daemons().start()
    old = first.submit_ok(bar_job(4))
    assert first.wait(old)["state"] == "completed"
    old_dir = first.job(old)["run_dir"]
    stop(first)
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{db_path(first)}{suffix}")
    second = daemons().start()
    new = second.submit_ok(bar_job(2))
    assert new == old  # the reset database hands out the same job id again...
    seen = second.wait(new)
    assert seen["state"] == "completed"
    assert seen["run_dir"] != old_dir  # ...but never the same run directory
    ((run_id,),) = query(second, "SELECT run_id FROM attempts WHERE job_id = ?", new)
    assert run_id.startswith(f"job{new}-a1-") and Path(seen["run_dir"]).name == run_id
    # (the report is written just after the outcome: waited for)
    assert wait_for(lambda: (Path(seen["run_dir"]) / "report.json").exists(), timeout=10)
    report = second.http.get(f"/jobs/{new}/report").json()  # type: ignore[union-attr]
    assert report["run_id"] == run_id and report["steps"]["requested"] == 2
    started = [e for e in events_of(seen["run_dir"]) if e["kind"] == "started"]
    assert [e["run_id"] for e in started] == [run_id]
    assert oct(Path(seen["run_dir"]).stat().st_mode & 0o777) == "0o700"


def test_a_run_dir_taken_meanwhile_fails_the_job_cleanly(daemons, tmp_path: Path) -> None:
    d = daemons().start()
    blocker = d.submit_ok(bar_job(200, 0.05))
    d.wait_step(blocker, 1)
    taken = tmp_path / "taken"
    victim = d.submit_ok(bar_job(2, run_dir=str(taken)))  # queued behind the blocker
    taken.mkdir()
    foreign = {"kind": "outcome", "outcome": "completed", "exit_code": 0}
    (taken / "events.jsonl").write_text(json.dumps(foreign) + "\n")
    (taken / "report.json").write_text('{"run_id": "someone-else", "outcome": "completed"}')
    d.http.post(f"/jobs/{blocker}/cancel")  # type: ignore[union-attr]
    seen = d.wait(victim)
    assert seen["state"] == "failed" and "already holds a run" in seen["reason"], seen
    response = d.http.get(f"/jobs/{victim}/report")  # type: ignore[union-attr]
    assert response.status_code == 404  # the other run's report is never the job's
    assert alive(d)


def test_events_of_another_run_are_not_read(tmp_path: Path) -> None:
    from lorasup.supervisor.serve.runs import EventsFollower

    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps({"kind": "started", "run_id": "other", "pid": 5}) + "\n"
                    + json.dumps({"kind": "outcome", "outcome": "completed"}) + "\n")
    mine = EventsFollower(path, "job1-a1-0123abcd")
    mine.drain()
    assert mine.progress.outcome is None and mine.progress.foreign
    by_pid = EventsFollower(path, "other", supervisor_pid=6)
    path.write_text(json.dumps({"kind": "started", "run_id": "other", "pid": 5,
                                "supervisor_pid": 7}) + "\n"
                    + json.dumps({"kind": "outcome", "outcome": "completed"}) + "\n")
    by_pid.drain()
    assert by_pid.progress.outcome is None
    ours = EventsFollower(path, "other", supervisor_pid=7)
    ours.drain()
    assert ours.progress.outcome == {"kind": "outcome", "outcome": "completed"}


# -- item 7: SIGKILL between committing an attempt and spawning its run -------------------


@pytest.mark.parametrize("point", ["after_claim_run_dir", "after_commit_attempt",
                                   "after_spawn"])
def test_sigkill_while_starting_a_run_loses_no_job(daemons, point: str) -> None:
    """LORASUP_FAULT makes the daemon SIGKILL itself at that point of starting a run."""
    doomed = daemons(env={"LORASUP_FAULT": point}).start()
    with contextlib.suppress(httpx.HTTPError):
        doomed.submit(bar_job(20, 0.05))
    assert doomed.wait_exit(timeout=30) == -signal.SIGKILL
    ((job_id, state, attempts),) = query(doomed, "SELECT id, state, attempts FROM jobs")
    again = daemons().start()
    seen = again.wait(job_id)
    assert seen["state"] == "completed", seen
    assert seen["retries_used"] == 0
    rows = query(again, "SELECT n, end_reason, outcome FROM attempts ORDER BY n")
    if point == "after_claim_run_dir":  # nothing was committed: still queued, one attempt
        assert (state, attempts) == ("queued", 0) and len(rows) == 1
    elif point == "after_commit_attempt":  # committed, never spawned: queued again
        assert (state, attempts) == ("running", 1)
        assert rows[0][1].startswith("never started") and rows[0][2] is None
        assert rows[1][2] == "completed" and seen["attempt"] == 2
    else:  # spawned, its pid never recorded: the run is found and adopted, not lost
        assert (state, attempts) == ("running", 1)
        assert len(rows) == 1 and rows[0][2] == "completed"
        assert any(r.get("event") in ("run_adopted", "run_gone") for r in again.log_records())


# -- item 6: the database locked, deleted, damaged, on a full disk --------------------------


def test_a_locked_database_is_waited_out(daemons) -> None:
    d = daemons().start()
    running = d.submit_ok(bar_job(30, 0.05))
    d.wait_step(running, 1)
    holder = sqlite3.connect(db_path(d), isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        response = d.submit(bar_job(2))
        assert response.status_code == 503, response.text
        assert "locked" in response.json()["error"]
        assert int(response.headers["Retry-After"]) >= 1
        # the run ends meanwhile: its outcome waits for the lock, the daemon stays up
        assert wait_for(lambda: any(e["kind"] == "outcome" for e in
                                    events_of(d.job(running)["run_dir"])), timeout=30)
        assert wait_for(lambda: d.http.get("/healthz").json()["storage"]  # type: ignore
                        is not None, timeout=10)
        time.sleep(1.5)  # several tries of the write, all refused (an event-free stretch)
        assert alive(d) and d.job(running)["state"] == "running"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert d.wait(running)["state"] == "completed"
    later = d.submit_ok(bar_job(2))
    assert d.wait(later)["state"] == "completed"
    assert d.http.get("/healthz").json()["storage"] is None  # type: ignore[union-attr]


def test_the_client_waits_out_a_locked_database(daemons, tmp_path: Path) -> None:
    """`lorasup submit` while another process holds lorasup.db: the 503's Retry-After is
    waited out (the same Idempotency-Key each try), the job is queued once, exit 0."""
    import threading

    from lorasup.supervisor.serve.jobspec import to_toml

    d = daemons().start()
    job_file = tmp_path / "job.toml"
    job_file.write_text(to_toml(bar_job(2)), encoding="utf-8")
    holder = sqlite3.connect(db_path(d), isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(2.0, lambda: holder.execute("ROLLBACK"))
    began = time.monotonic()
    release.start()
    try:
        out = subprocess.run(lorasup_argv("submit", str(job_file), "--state-dir", str(d.state)),
                             capture_output=True, text=True, timeout=60, env=child_env(),
                             cwd=tmp_path)
    finally:
        release.join()
        holder.close()
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - began >= 1.5  # it did meet the lock, and waited
    job = int(out.stdout.strip())
    assert [row[0] for row in query(d, "SELECT id FROM jobs")] == [job]
    assert d.wait(job)["state"] == "completed"


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_database_deleted_or_replaced_is_noticed(daemons, how: str) -> None:
    d = daemons().start()
    first = d.submit_ok(bar_job(2))
    assert d.wait(first)["state"] == "completed"
    path = db_path(d)
    if how == "deleted":
        path.unlink()
    else:
        other = path.with_name("other.db")
        with contextlib.closing(sqlite3.connect(other)) as db:
            db.execute("CREATE TABLE unrelated (x)")
        os.replace(other, path)
    second = d.submit_ok(bar_job(2))
    assert d.wait(second)["state"] == "completed"
    assert d.job(first)["state"] == "completed"  # not forgotten
    health = d.http.get("/healthz").json()  # type: ignore[union-attr]
    assert any(how in note for note in health["incidents"]), health
    assert any(r.get("event") == "state_db_replaced" and r.get("level") == "error"
               for r in d.log_records())
    assert [r[0] for r in query(d, "SELECT id FROM jobs ORDER BY id")] == [first, second]
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    if how == "replaced":
        assert list(path.parent.glob("lorasup.db.replaced-*"))


def test_a_damaged_database_is_moved_aside_and_rebuilt(daemons, tmp_path: Path) -> None:
    d = daemons().start()
    done = d.submit_ok(bar_job(3))
    assert d.wait(done)["state"] == "completed"
    own = d.submit_ok(bar_job(2, run_dir=str(tmp_path / "own")))  # outside runs/
    assert d.wait(own)["state"] == "completed"
    running = d.submit_ok(bar_job(200, 0.05))
    d.wait_step(running, 2)
    d.signal(signal.SIGKILL)  # its run goes on without a daemon
    assert d.wait_exit() == -signal.SIGKILL
    path = db_path(d)
    with contextlib.closing(sqlite3.connect(path)) as db:  # the WAL folded in first
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    os.truncate(path, path.stat().st_size // 2)
    with path.open("r+b") as fh:  # and a torn page in what is left
        fh.seek(4096 + 100)
        fh.write(b"\xff" * 512)
    again = daemons().start()
    assert list(path.parent.glob("lorasup.db.corrupt-*")), list(path.parent.iterdir())
    seen = again.job(done)
    assert seen["state"] == "completed" and seen["steps"] == 3, seen
    # rebuilt: its run adopted while alive (or, on a slow box, settled from its outcome)
    assert again.job(running)["state"] in ("running", "completed")
    assert again.wait(running, timeout=60)["state"] == "completed"
    assert again.job(running)["attempt"] == 1
    missing = [r for r in again.log_records() if r.get("event") == "jobs_not_recovered"]
    assert missing and missing[0]["jobs"] == [own]  # said, not silently dropped
    health = again.http.get("/healthz").json()  # type: ignore[union-attr]
    assert any("damaged" in note for note in health["incidents"])
    new = again.submit_ok(bar_job(2))
    assert new > running and again.wait(new)["state"] == "completed"
    text = again.log.read_text()
    assert "Traceback" not in text and "state_db_damaged" in text


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 4 MiB tmpfs (root only); skipped where it cannot be mounted."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path, leave: int) -> Path:
    """A file taking the free space of ``path``'s file system down to ``leave`` bytes."""
    filler = path / "filler"
    free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
    with filler.open("wb") as fh, contextlib.suppress(OSError):
        fh.write(b"\0" * max(free - leave, 0))
    return filler


def test_a_full_disk_refuses_submits_and_running_jobs_go_on(tmp_path: Path,
                                                            small_fs: Path) -> None:
    d = Daemon(tmp_path)
    d.state = small_fs / "state"
    try:
        d.start()
        logs = tmp_path / "logs"  # the runs write elsewhere: only the database's disk fills
        running = d.submit_ok(bar_job(40, 0.05, logs_dir=str(logs)))
        d.wait_step(running, 1)
        # The WAL emptied to 0 bytes, so the daemon's next write needs new space.
        with contextlib.closing(sqlite3.connect(db_path(d))) as db:
            assert db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        filler = fill(small_fs, 0)
        response = d.submit(bar_job(2, logs_dir=str(logs)))
        assert response.status_code == 507, response.text
        assert "no space" in response.json()["error"]
        assert response.headers["Retry-After"]
        assert wait_for(lambda: any(e["kind"] == "outcome" for e in
                                    events_of(d.job(running)["run_dir"])), timeout=30)
        # its outcome cannot be written yet: the daemon says so and keeps it
        assert wait_for(lambda: "no space" in str(d.http.get(  # type: ignore[union-attr]
            "/healthz").json()["storage"]), timeout=15), d.log.read_text()[-2000:]
        assert alive(d) and d.job(running)["state"] == "running"
        filler.unlink()
        assert d.wait(running)["state"] == "completed"
        later = d.submit_ok(bar_job(2, logs_dir=str(logs)))
        assert d.wait(later)["state"] == "completed" and alive(d)
    finally:
        d.cleanup()


def test_64k_free_at_start_is_one_clear_line(tmp_path: Path, small_fs: Path) -> None:
    d = Daemon(tmp_path)
    d.state = small_fs / "state"
    fill(small_fs, 64 * 1024)
    try:
        d.start(wait=False)
        assert d.proc is not None
        up = wait_for(lambda: d.proc.poll() is not None or d._healthy(), timeout=20)
        assert up, d.log.read_text()
        text = d.log.read_text()
        assert "Traceback" not in text, text
        if d.proc.poll() is not None:  # refused: one line that says why
            errors = [line for line in text.splitlines() if line.startswith("lorasup: error:")]
            assert len(errors) == 1 and "space" in errors[0], text
        else:  # degraded: up, refusing new jobs
            response = d.submit(bar_job(2))
            assert response.status_code == 507, response.text
    finally:
        d.cleanup()


# -- item 9: private files whatever the umask --------------------------------------------


@pytest.mark.parametrize(("umask", "made", "expected"), [
    (0o022, None, "0o700"), (0o000, None, "0o700"),
    (0o022, 0o755, "0o700"),  # made by an older daemon under umask 022
    (0o000, 0o750, "0o750"),  # group-only on purpose (systemd's StateDirectoryMode=0750)
])
def test_state_and_run_files_are_private_whatever_the_umask(
        daemons, tmp_path: Path, umask: int, made: int | None, expected: str) -> None:
    if made is not None:
        (tmp_path / "state").mkdir()
        os.chmod(tmp_path / "state", made)
    d = daemons().start(umask=umask)
    job = d.submit_ok(bar_job(2))
    seen = d.wait(job)
    assert seen["state"] == "completed"
    assert wait_for(lambda: (Path(seen["run_dir"]) / "report.json").exists(), timeout=10)

    def mode(path: Path) -> str:
        return oct(path.stat().st_mode & 0o777)

    run_dir = Path(seen["run_dir"])
    assert mode(d.state) == expected and mode(d.state / "runs") == "0o700"
    assert mode(run_dir) == "0o700"
    for name in ("lorasup.db", "lorasup.db-wal", "lorasup.db-shm"):
        assert mode(d.state / name) == "0o600", name
    for name in ("lorasup.log", "events.jsonl", "trainer.log", "job.toml", "attempt.json"):
        assert mode(run_dir / name) == "0o600", name
    assert mode(run_dir / "report.json") == "0o644"  # documented: readable inside 0700


# -- the store's reading of rows it did not write (property) ------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)


def test_any_stored_row_loads_or_fails_its_own_job(tmp_path: Path) -> None:
    """Whatever a row holds, reading it gives a job: loaded, or failed ``internal:`` alone."""
    from lorasup.supervisor.serve.store import Store

    store = Store(tmp_path / "lorasup.db")
    good = json.dumps({"values": {"trainer": "builtin"}, "name": "n", "priority": 0, "gpus": 0,
                       "cwd": "/", "retries": 0, "notify": {}, "trainer": "builtin",
                       "steps": 1, "grace": 1.0, "run_dir": None, "logs_dir": None})
    fields = st.fixed_dictionaries({}, optional={
        k: _json for k in ("values", "name", "priority", "gpus", "cwd", "retries", "notify",
                           "trainer", "steps", "grace", "run_dir", "logs_dir", "extra")})

    @given(spec=st.one_of(st.text(max_size=40), fields.map(
               lambda f: json.dumps({**json.loads(good), **f}))),
           not_before=st.one_of(st.floats(allow_nan=False), st.integers(-2**63, 2**63 - 1),
                                st.text(max_size=5), st.none()),
           state=st.sampled_from(["queued", "running", "completed", "weird"]),
           priority=st.one_of(st.integers(-2**63, 2**63 - 1), st.text(max_size=5)))
    def check(spec: str, not_before: object, state: str, priority: object) -> None:
        now = time.time()
        with store.db:
            job_id = store.db.execute(
                "INSERT INTO jobs (name, priority, state, spec, gpus, retries, not_before, "
                "created, updated) VALUES ('x', ?, ?, ?, 0, 0, COALESCE(?, 0), ?, ?)",
                (priority, state, spec, not_before, now, now)).lastrowid
        row = store.job(int(job_id or 0))
        assert row is not None
        if row.broken is not None:
            assert row.reason is None or state not in ("queued", "running") \
                or row.reason.startswith("internal:")
            assert row.state != "queued" and row.state != "running"
            assert store.jobs(("queued", "running"), limit=1) == [] or all(
                j.id != job_id for j in store.jobs(("queued", "running")))
        else:
            assert isinstance(row.spec.steps, int) and isinstance(row.not_before, int | float)

    check()
    store.close()
