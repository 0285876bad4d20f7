"""The daemon's start: the database opened (a damaged one moved aside and rebuilt from
the run directories, a locked one waited for), and every run left running by the last
daemon adopted or settled.
"""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import structlog

from lorasup.supervisor.serve import paths
from lorasup.supervisor.serve import store as stores
from lorasup.supervisor.serve.daemonparts import DaemonParts, Running
from lorasup.supervisor.serve.errors import ApiError
from lorasup.supervisor.serve.procid import Identity
from lorasup.supervisor.serve.runs import EventsFollower, find_supervisor, usage_error
from lorasup.supervisor.serve.store import JobRow, Store, StoreUnavailable, internal_reason
from lorasup.supervisor.serve.storefaults import STORE_BACKOFF_MAX

log = structlog.get_logger("lorasup.serve")

#: an attempt whose run never started is queued again this often at most (then: settled)
NEVER_STARTED_MAX = 3
NEVER_STARTED = "never started"
#: how long the start waits for a database another process holds locked
OPEN_WAIT = 30.0


class Recovery(DaemonParts):
    """Opening the store; adopting or settling the runs found at start."""

    async def _open_store(self) -> Store:
        """The database, checked first: a damaged one (``PRAGMA quick_check``) is moved
        aside and the job history rebuilt from the run directories; one held locked by
        another process is waited for (with a deadline); a full disk is one clear line."""
        path = self.state / paths.DB_NAME
        problem = await anyio.to_thread.run_sync(stores.damage, path)
        moved: Path | None = None
        if problem is not None:
            moved = await anyio.to_thread.run_sync(stores.move_aside, path, "corrupt")
            log.error("state_db_damaged", path=str(path), problem=problem,
                      moved_to=str(moved), action="rebuilding the jobs from the run dirs")
        deadline = time.monotonic() + OPEN_WAIT
        delay = 0.1
        while True:
            try:
                store = Store(path)
                break
            except StoreUnavailable as exc:
                if exc.status != 503 or time.monotonic() > deadline:
                    raise ApiError(2, f"cannot open the job database {path}: "
                                      f"{exc.message}") from None
                log.warning("state_db_busy", error=exc.message, retry_in_s=delay)
            except OSError as exc:
                fault = stores.unavailable(exc)
                if fault is None:
                    raise
                raise ApiError(2, f"cannot open the job database {path}: "
                                  f"{fault.message}") from None
            await anyio.sleep(delay)
            delay = min(delay * 2, STORE_BACKOFF_MAX)
        if moved is not None:
            from lorasup.supervisor.serve.rebuild import rebuild

            note = f"{path.name} was damaged ({problem}); moved aside as {moved.name}"
            store.incidents.append(note)
            try:
                await anyio.to_thread.run_sync(rebuild, store, self.state / paths.RUNS)
            except Exception as exc:  # the daemon starts with what it has
                log.error("rebuild_failed", error=internal_reason(exc), exc_info=exc)
        return store

    async def _recover(self) -> None:
        """Re-adopt every run whose supervisor still lives; settle the others. A job whose
        handling raises fails alone (``internal: ...``)."""
        assert self.store is not None
        for job in await self._retry(self.store.jobs, ("running",)):
            try:
                await self._recover_one(job)
            except Exception as exc:
                await self._internal_failure(job.id, job.attempts or None, exc,
                                             "recovering it")

    async def _recover_one(self, job: JobRow) -> None:
        assert self.store is not None
        attempt = self.store.attempt(job.id, job.attempts)
        if attempt is None:
            self.store.update_job(job.id, state="queued", reason="recovered: no attempt")
            return
        run_dir = Path(attempt.run_dir)
        follower = EventsFollower(run_dir / "events.jsonl", attempt.run_id, attempt.pid)
        await anyio.to_thread.run_sync(follower.drain)
        identity: Identity | None = None
        if attempt.pid is not None:
            candidate = Identity(attempt.pid, attempt.start_time, attempt.boot_id or "")
            identity = candidate if candidate.alive() else None
        else:
            identity = await anyio.to_thread.run_sync(
                find_supervisor, run_dir, follower.progress.supervisor_pid)
            if identity is not None:
                self.store.set_process(job.id, attempt.n, identity.pid, identity.start_time,
                                       identity.boot_id)
        if identity is None and not follower.progress.started_seen \
                and follower.progress.outcome is None \
                and await anyio.to_thread.run_sync(usage_error, run_dir) is None:
            # The daemon died between committing the attempt and spawning its run (or its
            # supervisor before it started anything): the run never started, so the job is
            # queued again without using up a retry; `lost` is for runs that started.
            earlier = [a for a in self.store.attempts(job.id)
                       if (a.end_reason or "").startswith(NEVER_STARTED)]
            if len(earlier) < NEVER_STARTED_MAX:
                log.warning("run_never_started", job=job.id, attempt=attempt.n,
                            pid=attempt.pid, action="queued again")
                self.store.end_attempt(
                    job.id, attempt.n, None, None, f"{NEVER_STARTED} (the daemon or its "
                    "supervisor stopped before the trainer was spawned)",
                    {"state": "queued", "reason": "re-queued: its run never started"})
                return
        slots = tuple(s for s in self.slots if s.name in (attempt.slot or "").split(","))
        run = Running(job.id, attempt.n, run_dir, slots, job.spec.grace, identity,
                      own_child=False, follower=follower,
                      stop_request=job.stop_request, started=attempt.started)
        self.running[job.id] = run
        if identity is not None:
            log.info("run_adopted", job=job.id, attempt=attempt.n, pid=identity.pid,
                     step=follower.progress.step)
            self._tg.start_soon(self._watch, run)
        else:
            log.warning("run_gone", job=job.id, attempt=attempt.n,
                        outcome=(follower.progress.outcome or {}).get("outcome"))
            self._tg.start_soon(self._settle, run, None)
