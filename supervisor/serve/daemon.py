"""The daemon: one event loop that keeps up to K runs going, each under its own
``lorasup start`` process, with the queue in SQLite and an HTTP API on a UNIX socket.

Tasks of the loop: the API server(s), the scheduler (woken by submissions, ends of runs and
backoff timers), one watcher per running attempt (events.jsonl for progress, a pidfd for
the exit), the webhook worker, systemd's watchdog, and the signal handler that turns
SIGTERM/SIGINT into a graceful stop of every run (re-queued, resumed by the next daemon).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog

from lorasup.supervisor.notify import Notifier
from lorasup.supervisor.serve import gpus as gpu_slots
from lorasup.supervisor.serve import jobspec, listening, paths, scheduler
from lorasup.supervisor.serve import store as stores
from lorasup.supervisor.serve.errors import ApiError
from lorasup.supervisor.serve.hooks import Webhooks
from lorasup.supervisor.serve.procid import Identity, kill_group, start_time
from lorasup.supervisor.serve.runs import (
    POLL_SECONDS,
    EventsFollower,
    Progress,
    RunDirTaken,
    child_environment,
    claim_run_dir,
    find_supervisor,
    spawn_supervisor,
    usage_error,
    wait_exit,
)
from lorasup.supervisor.serve.scheduler import Slot, Waiting
from lorasup.supervisor.serve.store import (
    ACTIVE,
    FINAL,
    JobRow,
    Store,
    StoreUnavailable,
    internal_reason,
)

log = structlog.get_logger("lorasup.serve")

#: seconds on top of the longest grace for the runs' own stop (their report, the plot)
STOP_MARGIN = 15.0
#: how long a trainer left behind by a killed supervisor may take to go after SIGKILL
LEFTOVER_WAIT = 10.0
#: the scheduler looks again at least this often (backoff timers, GPUs freed by others)
SCHEDULE_SECONDS = 2.0
USAGE_EXIT = 2
#: the longest wait between two tries of a write the database refused (locked, disk full)
STORE_BACKOFF_MAX = 5.0
#: an attempt whose run never started is queued again this often at most (then: settled)
NEVER_STARTED_MAX = 3
NEVER_STARTED = "never started"
#: how long the start waits for a database another process holds locked
OPEN_WAIT = 30.0
#: test hook (documented in the README): ``LORASUP_FAULT=<point>`` makes the daemon SIGKILL
#: itself at that point of starting a run: after_claim_run_dir, after_commit_attempt,
#: after_spawn (before the pid is recorded). Unset: no effect.
FAULT_ENV = "LORASUP_FAULT"


def _fault(point: str) -> None:
    """The crash a test asks for at ``point`` (nothing unless LORASUP_FAULT names it)."""
    if os.environ.get(FAULT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)
#: how long a settled job waits for its run's final report.json (it is written after the
#: outcome event, once the CSV and the plot are done)
REPORT_WAIT = 30.0

__all__ = ["ApiError", "Daemon", "DaemonConfig"]


def _json_number(value: float | None) -> float | str | None:
    """JSON has no NaN/inf; a diverged loss is spelled out as events.jsonl spells it."""
    if value is None or math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _has_outcome(report: Path) -> bool:
    """report.json exists, reads as JSON and names the run's outcome."""
    try:
        data = json.loads(report.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and isinstance(data.get("outcome"), str)


@dataclass
class DaemonConfig:
    state_dir: Path
    slots: int = 1
    gpus: str = "auto"
    until_empty: bool = False
    listen: str | None = None
    token: str | None = None
    notify: dict[str, str] = field(default_factory=dict)
    retry_backoff: float = 10.0
    poll_seconds: float = POLL_SECONDS


@dataclass
class Running:
    """One attempt being followed."""

    job_id: int
    n: int
    run_dir: Path
    slots: tuple[Slot, ...]
    grace: float
    identity: Identity | None
    own_child: bool
    follower: EventsFollower
    stop_request: str | None = None
    started: float = field(default_factory=time.time)
    done: anyio.Event = field(default_factory=anyio.Event)

    @property
    def progress(self) -> Progress:
        return self.follower.progress


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.state = config.state_dir
        self.slots, self.gpu_mode = gpu_slots.slots(config.gpus, config.slots)
        self.running: dict[int, Running] = {}
        self.accepting = True
        self.stopping = False
        self.exit_code = 0
        self.hooks = Webhooks()
        self.notifier = Notifier()
        self.started = time.time()
        self._wake = anyio.Event()
        self._stop = anyio.Event()
        self._tg: Any = None
        self._servers: list[Any] = []
        self._status_text = ""
        self.store: Store | None = None
        #: the storage fault last logged (logged once, and once more when it is over)
        self._fault_logged: str | None = None
        #: jobs whose failure could not even be recorded: never started again by this daemon
        self._poisoned: set[int] = set()
        #: the umask the runs get (the user's); the daemon's own files are private (077)
        self._child_umask = -1

    # -- life ------------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or an empty queue with --until-empty); the exit code."""
        self._child_umask = os.umask(0o077)  # the db, its -wal/-shm, job files: 0600
        for folder in (self.state, self.state / paths.RUNS):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = folder.stat()
            # runs/ is 0700 always; the state directory too unless its mode is deliberately
            # group-only (systemd's StateDirectoryMode=0750, so the group reaches the 0660
            # socket): one open to others was made under a loose umask (an older daemon).
            if st.st_uid == os.getuid() and (folder != self.state or st.st_mode & 0o007):
                os.chmod(folder, 0o700)
        try:
            lock = listening.lock(self.state)
        except listening.ListenError as exc:
            raise ApiError(2, str(exc)) from None
        try:
            self.store = await self._open_store()
            sockets: list[socket.socket] = []
            try:
                sockets.append(listening.bind_unix(paths.socket_path(self.state)))
                if self.config.listen:
                    sockets.append(listening.bind_tcp(self.config.listen))
            except listening.ListenError as exc:
                for sock in sockets:
                    sock.close()
                raise ApiError(2, str(exc)) from None
            try:
                return await self._serve(sockets)
            finally:
                for sock in sockets:
                    sock.close()
                with contextlib.suppress(FileNotFoundError):
                    paths.socket_path(self.state).unlink()
                try:  # a database deleted since the last look is written out once more
                    self.store.check_file()
                except Exception as exc:
                    log.error("state_db_not_saved", error=internal_reason(exc))
                self.store.close()
        finally:
            os.close(lock)

    async def _serve(self, sockets: list[socket.socket]) -> int:
        from lorasup.supervisor.serve.api import make_server

        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._watch_signals)
            tg.start_soon(self.hooks.run)
            await self._recover()
            for i, sock in enumerate(sockets):
                server = make_server(self, token=self.config.token if i else None)
                self._servers.append(server)
                tg.start_soon(server.serve, [sock])
            for server in self._servers:
                while not server.started:
                    await anyio.sleep(0.01)
            log.info("serving", state_dir=str(self.state), socket=str(
                paths.socket_path(self.state)), slots=[s.name for s in self.slots],
                gpu_mode=self.gpu_mode, listen=self.config.listen)
            self.notifier.ready(self._status())
            tg.start_soon(self.notifier.keep_alive)
            tg.start_soon(self._schedule_loop)
            await self._stop.wait()
            await self._shutdown()
            for server in self._servers:
                server.should_exit = True
            self.hooks.close()
            await self._drain_then_cancel(tg)
        log.info("stopped", exit_code=self.exit_code)
        return self.exit_code

    async def _drain_then_cancel(self, tg: Any) -> None:
        """Give the servers and pending webhooks a moment, then end every task."""
        with anyio.move_on_after(3):
            while self.hooks.pending():
                await anyio.sleep(0.05)
        await anyio.sleep(0.15)  # uvicorn checks should_exit every 0.1 s
        tg.cancel_scope.cancel()

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.warning("daemon_signalled", signal=signal.Signals(signum).name)
                self._stop.set()

    # -- recovery --------------------------------------------------------------------------

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

    # -- faults of one job, of the storage ---------------------------------------------------

    async def _retry(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args)`` until the database takes it: a locked database or a full disk is
        waited out with a backoff (the outcome in hand is kept, never dropped)."""
        delay = 0.1
        while True:
            try:
                result = fn(*args, **kwargs)
            except StoreUnavailable as exc:
                self._storage_fault(exc)
                await anyio.sleep(delay)
                delay = min(delay * 2, STORE_BACKOFF_MAX)
                continue
            self._storage_ok()
            return result

    @property
    def storage_problem(self) -> str | None:
        """Why the database cannot be written now (None: its last write went through)."""
        fault = self.store.db.fault if self.store is not None else None
        return fault.message if fault is not None else None

    def _storage_fault(self, exc: StoreUnavailable) -> None:
        if self._fault_logged != exc.message:
            log.error("state_db_unavailable", error=exc.message, action="retrying")
        self._fault_logged = exc.message

    def _storage_ok(self) -> None:
        if self._fault_logged is not None and self.storage_problem is None:
            log.info("state_db_available", was=self._fault_logged)
            self._fault_logged = None

    async def _internal_failure(self, job_id: int, n: int | None, exc: BaseException,
                                doing: str) -> None:
        """An exception of lorasup's own while handling one job: that job is failed with
        the error as its reason, and the daemon goes on with the others."""
        assert self.store is not None
        reason = internal_reason(exc, doing)
        log.error("job_internal_error", job=job_id, attempt=n, error=reason, exc_info=exc)
        self._poisoned.add(job_id)
        run = self.running.pop(job_id, None)
        if run is not None:
            self._signal(run, signal.SIGTERM)  # not followed any more: not left running
            run.done.set()
        fields = {"state": "failed", "outcome": "internal_error", "reason": reason,
                  "stop_request": None, "waiting": None}
        try:
            if n is not None and self.store.attempt(job_id, n) is not None:
                await self._retry(self.store.end_attempt, job_id, n, "internal_error", None,
                                  reason, fields)
            else:
                await self._retry(self.store.update_job, job_id, **fields)
        except Exception as again:
            log.error("job_internal_error_unrecorded", job=job_id,
                      error=internal_reason(again), action="skipped until the next start")
            return
        self._final(job_id)
        self.wake()

    # -- scheduling ------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def _held(self) -> set[str]:
        return {slot.name for run in self.running.values() for slot in run.slots}

    def _free_slots(self) -> tuple[list[Slot], str | None]:
        held = self._held()
        free: list[Slot] = []
        why: str | None = None
        for slot in self.slots:
            if slot.name in held:
                continue
            holders = [p for d in slot.devices for p in gpu_slots.foreign_holders(d)]
            if holders:
                why = (f"GPU {','.join(slot.devices)} is used by pid "
                       f"{', '.join(map(str, holders))}, not a lorasup job")
                continue
            free.append(slot)
        return free, why

    async def _schedule_loop(self) -> None:
        assert self.store is not None
        delay = 0.1
        while not self.stopping:
            self._wake = anyio.Event()
            try:
                self.store.check_file()
                timeout = await self._schedule()
                delay = 0.1
                self._storage_ok()
            except Exception as exc:  # waited out: nothing starts meanwhile
                fault = stores.unavailable(exc)
                if fault is not None:
                    self._storage_fault(fault)
                else:  # a bug of its own: logged, and the queue goes on after a pause
                    log.error("schedule_failed", error=internal_reason(exc), exc_info=exc)
                with anyio.move_on_after(delay):
                    await self._stop.wait()
                delay = min(delay * 2, STORE_BACKOFF_MAX)
                continue
            if self.config.until_empty and not self.running and not self.store.jobs(ACTIVE):
                log.info("queue_empty", action="exiting (--until-empty)")
                self._stop.set()
                return
            self._update_status()
            with anyio.move_on_after(timeout):
                await self._wake.wait()

    async def _schedule(self) -> float:
        """Start what can start; seconds until the next backoff timer (or the default)."""
        assert self.store is not None
        queued = [j for j in self.store.jobs(("queued",)) if j.id not in self._poisoned]
        if not queued or self.stopping:
            return SCHEDULE_SECONDS
        now = time.time()
        free, why = await anyio.to_thread.run_sync(self._free_slots)
        if not await anyio.to_thread.run_sync(self.store.free_space_ok):
            free, why = [], "no space left in the state directory; waiting for space"
        waiting = [Waiting(j.id, j.priority, j.spec.gpus, j.not_before) for j in queued]
        starts = scheduler.assign(waiting, free, now, gpu_mode=self.gpu_mode)
        by_id = {j.id: j for j in queued}
        for job_id, slots in starts:
            try:
                await self._start(by_id[job_id], slots)
            except StoreUnavailable:
                raise  # the database's fault, not the job's: waited out by the loop
            except Exception as exc:
                attempt = by_id[job_id].attempts + 1
                await self._internal_failure(job_id, attempt, exc, "starting it")
        started = {job_id for job_id, _ in starts}
        for job in queued:
            text = why if job.id not in started and why else None
            if text != job.waiting:
                self.store.update_job(job.id, waiting=text)
        later = [j.not_before - now for j in queued if j.not_before > now]
        return max(0.05, min([SCHEDULE_SECONDS, *later]))

    def _run_dir(self, job: JobRow, n: int) -> tuple[str, Path, bool]:
        """(run id, run directory, whether the name is the daemon's own). The daemon's
        names are unique for good (``job<ID>-a<n>-<random>``): a reset database, a second
        daemon on the same logs directory never hand out one twice. A job's own
        ``run_dir`` keeps its name (the run id is its last part, as ``lorasup start``
        names it)."""
        spec = job.spec
        if spec.run_dir is not None:
            path = Path(spec.run_dir if n == 1 else f"{spec.run_dir}.attempt{n}")
            return path.name, path, False
        run_id = f"job{job.id}-a{n}-{secrets.token_hex(4)}"
        base = Path(spec.logs_dir) if spec.logs_dir else self.state / paths.RUNS
        return run_id, base / run_id, True

    def _claim(self, job: JobRow, n: int) -> tuple[str, Path]:
        """A fresh run directory for the attempt, claimed (blocking: from a thread)."""
        for _ in range(8):
            run_id, run_dir, own = self._run_dir(job, n)
            try:
                claim_run_dir(run_dir, exclusive=own)
            except RunDirTaken:
                if own:
                    continue  # taken by another daemon a moment ago: another name
                raise
            return run_id, run_dir
        raise RunDirTaken(f"no free run directory name for job {job.id}")

    async def _start(self, job: JobRow, slots: tuple[Slot, ...]) -> None:
        assert self.store is not None
        n = job.attempts + 1
        try:
            run_id, run_dir = await anyio.to_thread.run_sync(self._claim, job, n)
        except RunDirTaken as exc:
            reason = f"cannot start: {exc}"
            log.error("run_dir_taken", job=job.id, error=str(exc))
            self.store.update_job(job.id, state="failed", outcome="usage", reason=reason)
            self._final(job.id)
            return
        except OSError as exc:
            if stores.unavailable(exc) is not None:
                raise stores.unavailable(exc) from exc  # disk full: waited out, job kept
            raise
        _fault("after_claim_run_dir")
        why = job.reason if n > 1 and job.reason else "submitted"
        values = None
        if n > 1 and job.target_step is not None:
            values = await anyio.to_thread.run_sync(lambda: jobspec.resumed_values(
                job.spec.values, job.spec.trainer, target_step=job.target_step or 0,
                saved_step=job.saved_step, output_dirs=job.spec.output_dirs))
        resume_from = (job.saved_step if job.spec.trainer == "builtin" else "checkpoint") \
            if values is not None else None
        text = jobspec.to_toml(values or job.spec.values)
        devices = tuple(d for s in slots for d in s.devices) if self.gpu_mode else None
        slot_names = ",".join(s.name for s in slots)
        try:
            self.store.start_attempt(job.id, n, run_id, str(run_dir), why, slot_names,
                                     ",".join(devices) if devices else None)
        except BaseException:
            with contextlib.suppress(OSError):  # not recorded: no empty directory left
                run_dir.rmdir()
            raise
        _fault("after_commit_attempt")
        info = {"job": job.id, "name": job.name, "attempt": n, "why": why,
                "resumed_from_step": resume_from, "slot": slot_names,
                "devices": list(devices) if devices is not None else None,
                # what rebuilds the job's row should the database be lost
                "run_id": run_id, "spec": stores.spec_data(job.spec),
                "created": job.created}
        try:
            process = await anyio.to_thread.run_sync(
                spawn_supervisor, run_dir, text, info, job.spec.cwd,
                child_environment(devices), self._child_umask)
        except OSError as exc:
            if stores.unavailable(exc) is not None:
                # A full disk: not the job's fault. The attempt never started: queued again.
                log.error("spawn_failed", job=job.id, error=str(exc), action="queued again")
                await self._retry(self.store.end_attempt, job.id, n, None, None,
                                  f"never started: {exc}", {"state": "queued",
                                                            "reason": f"re-queued: {exc}"})
                return
            log.error("spawn_failed", job=job.id, error=str(exc))
            self.store.end_attempt(job.id, n, "usage", 2, f"could not start lorasup: {exc}",
                                   {"state": "failed", "outcome": "usage",
                                    "reason": f"could not start lorasup: {exc}"})
            self._final(job.id)
            return
        identity = Identity.of(process.pid)
        _fault("after_spawn")
        # The exit is collected through the pidfd and waitpid by _watch. A Popen dropped
        # while "running" would be queued for subprocess' own reaping (stealing the status),
        # so it is marked as collected here.
        process.returncode = 0
        run = Running(job.id, n, run_dir, slots, job.spec.grace, identity, own_child=True,
                      follower=EventsFollower(run_dir / "events.jsonl", run_id, identity.pid))
        self.running[job.id] = run
        log.info("run_started", job=job.id, name=job.name, attempt=n, pid=identity.pid,
                 run_dir=str(run_dir), slot=slot_names, why=why)
        self._tg.start_soon(self._watch, run)
        # Followed from here on, whatever the database does; the pid is on record once
        # it takes it (a restart finds the process by its run directory meanwhile).
        await self._retry(self.store.set_process, job.id, n, identity.pid,
                          identity.start_time, identity.boot_id)
        # A cancel or a stop of the daemon that came while the process was being started.
        latest = self.store.job(job.id)
        run.stop_request = latest.stop_request if latest else None
        if self.stopping and run.stop_request is None:
            run.stop_request = "daemon_stop"
            self.store.update_job(job.id, stop_request="daemon_stop")
        if run.stop_request is not None:
            self._signal(run, signal.SIGTERM)

    # -- following a run -------------------------------------------------------------------

    async def _follow(self, run: Running, exited: anyio.Event, scope: anyio.CancelScope
                      ) -> None:
        """Progress from events.jsonl until the outcome is written or the process is gone."""
        while True:
            while await anyio.to_thread.run_sync(run.follower.poll):
                pass
            if run.progress.outcome is not None or exited.is_set():
                scope.cancel()
                return
            with anyio.move_on_after(self.config.poll_seconds):
                await exited.wait()

    async def _watch(self, run: Running) -> None:
        """Follow one attempt. The job is settled as soon as its outcome is on record (the
        trainer is gone by then; the supervisor may still be drawing its plot), so the slot
        is free at once; the supervisor itself is still awaited to be reaped."""
        assert run.identity is not None
        identity = run.identity
        exited = anyio.Event()
        codes: list[int | None] = []

        async def wait() -> None:
            codes.append(await wait_exit(identity, run.own_child))
            exited.set()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                async with anyio.create_task_group() as following:
                    following.start_soon(self._follow, run, exited, following.cancel_scope)
                await self._settle(run, codes[0] if codes else None)
        except Exception as exc:
            if self.running.get(run.job_id) is run:
                await self._internal_failure(run.job_id, run.n, exc, "following its run")

    async def _kill_leftovers(self, run: Running) -> None:
        """A supervisor that died without an outcome (SIGKILL, OOM) leaves its trainer: the
        trainer's process group goes, so no job runs twice on one GPU."""
        pgid = run.progress.trainer_pid
        if pgid is None:
            return
        floor = run.identity.start_time if run.identity else None
        if not await anyio.to_thread.run_sync(kill_group, pgid, signal.SIGKILL, floor):
            return
        log.warning("leftover_trainer_killed", job=run.job_id, pgid=pgid)
        from lorasup.supervisor.serve.procid import group_exists

        with anyio.move_on_after(LEFTOVER_WAIT):
            while await anyio.to_thread.run_sync(group_exists, pgid):
                await anyio.sleep(0.05)

    async def _settle(self, run: Running, returncode: int | None) -> None:
        """The attempt ended: record it and decide the job's next state, in one commit. An
        error of lorasup's own while doing so fails this job alone."""
        try:
            await self._settle_one(run, returncode)
        except Exception as exc:
            await self._internal_failure(run.job_id, run.n, exc, "settling its run")

    async def _settle_one(self, run: Running, returncode: int | None) -> None:
        assert self.store is not None
        await anyio.to_thread.run_sync(run.follower.drain)
        p = run.progress
        if p.outcome is not None:
            await self._report_written(run)
        job = self.store.job(run.job_id)
        assert job is not None
        outcome = p.outcome.get("outcome") if p.outcome else None
        if not isinstance(outcome, str):
            outcome = None
            await self._kill_leftovers(run)
        if p.foreign is not None:
            log.error("foreign_run_ignored", job=run.job_id, attempt=run.n,
                      run_dir=str(run.run_dir), events_of=p.foreign)
        if outcome is None and returncode == USAGE_EXIT and p.trainer_pid is None:
            # `lorasup start` refused the job before starting anything (something changed
            # since it was submitted, e.g. the trainer program is gone): its one-line error.
            error = await anyio.to_thread.run_sync(usage_error, run.run_dir)
            p.outcome = {"outcome": "usage", "exit_code": USAGE_EXIT,
                         "reason": error or "lorasup start refused the job"}
            outcome = "usage"
        stop = run.stop_request or job.stop_request
        target = job.target_step if job.target_step is not None else p.final
        fields: dict[str, Any] = {
            "saved_step": max(job.saved_step, p.checkpoint_step),
            "target_step": target, "steps_done": p.step if p.step is not None else job.steps_done,
            "last_loss": p.loss if p.loss is not None else job.last_loss, "stop_request": None,
        }
        exit_code = p.outcome.get("exit_code") if p.outcome else returncode
        transient = scheduler.transient(outcome, p.trainer_returncode, p.sigkill_sent,
                                        list(p.problems))
        end = scheduler.after_attempt(
            outcome, (p.outcome or {}).get("reason"), stop_request=stop, returncode=returncode,
            transient_failure=transient, retries_used=job.retries_used,
            retries=job.spec.retries, backoff_base=self.config.retry_backoff, now=time.time())
        fields.update(end.fields())
        done_here = (p.step - p.offset) if p.step is not None else 0
        await self._retry(self.store.end_attempt, run.job_id, run.n, outcome,
                          exit_code if isinstance(exit_code, int) else None,
                          fields.get("reason") or "", fields, steps=done_here)
        self.running.pop(run.job_id, None)
        run.done.set()
        log.info("run_ended", job=run.job_id, attempt=run.n, outcome=outcome,
                 state=fields["state"], reason=fields.get("reason"))
        if fields["state"] in FINAL:
            self._final(run.job_id)
        self.wake()
        self._update_status()

    async def _report_written(self, run: Running) -> None:
        """A job reads final only once its report can be read: the run writes report.json
        after its outcome event (the CSV and the plot first). Wait for a report with an
        outcome, or for the run's supervisor to be gone (nothing more will come), at most
        REPORT_WAIT. The trainer is gone already: its slot is free for the next job meanwhile
        (as it was before this wait), so a slow plot costs no GPU time."""
        path = run.run_dir / "report.json"
        if await anyio.to_thread.run_sync(_has_outcome, path):
            return
        run.slots = ()
        self.wake()
        with anyio.move_on_after(REPORT_WAIT):
            while not await anyio.to_thread.run_sync(_has_outcome, path):
                if run.identity is None or not await anyio.to_thread.run_sync(
                        run.identity.alive):
                    return
                await anyio.sleep(0.05)

    def _final(self, job_id: int) -> None:
        """A job reached a final state: webhooks (per job and daemon-wide). A failure here
        is logged; it never changes the state already recorded."""
        try:
            self._final_hooks(job_id)
        except Exception as exc:
            log.error("webhook_not_queued", job=job_id, error=internal_reason(exc))

    def _final_hooks(self, job_id: int) -> None:
        assert self.store is not None
        job = self.store.job(job_id)
        if job is None:
            return
        targets = [t for t in (job.spec.notify, self.config.notify) if t.get("webhook")]
        if len(targets) == 2 and targets[0]["webhook"] == targets[1]["webhook"]:
            targets.pop()
        if not targets:
            return
        attempts = self.store.attempts(job_id)
        report = str(Path(attempts[-1].run_dir) / "report.json") if attempts else None
        self.hooks.post(targets, "job.finished", {
            "event": "job.finished", "job": job.id, "name": job.name, "state": job.state,
            "outcome": job.outcome, "reason": job.reason, "steps": job.steps_done,
            "steps_requested": job.target_step or job.spec.steps, "final_loss": job.last_loss,
            "attempts": job.attempts, "report": report,
            "run_dir": attempts[-1].run_dir if attempts else None, "time": time.time()})

    # -- stopping --------------------------------------------------------------------------

    def _status(self) -> str:
        assert self.store is not None
        queued = len(self.store.jobs(("queued",)))
        return f"{len(self.running)} running, {queued} queued"

    def _update_status(self) -> None:
        text = self._status()
        if text != self._status_text:
            self._status_text = text
            self.notifier.status(text)

    async def _shutdown(self) -> None:
        """Stop accepting, stop every run gracefully, re-queue them; within the longest
        grace (plus a margin for their reports)."""
        assert self.store is not None
        self.stopping = True
        self.accepting = False
        runs = list(self.running.values())
        if self.config.until_empty and not runs:
            self.notifier.stopping("queue empty")
            return
        longest = max([r.grace for r in runs], default=0.0) + STOP_MARGIN
        self.notifier.send(STOPPING="1", STATUS=f"stopping {len(runs)} run(s)",
                           EXTEND_TIMEOUT_USEC=str(int(longest * 1e6)))
        for run in runs:
            if run.stop_request is None:
                run.stop_request = "daemon_stop"
                self.store.update_job(run.job_id, stop_request="daemon_stop")
            self._signal(run, signal.SIGTERM)
        log.info("stopping_runs", runs=[r.job_id for r in runs], deadline_s=longest)
        deadline = anyio.current_time() + longest
        with anyio.move_on_after(longest):
            for run in runs:
                while not run.done.is_set():
                    left = deadline - anyio.current_time()
                    # systemd extends the stop timeout by this much from each message
                    self.notifier.send(EXTEND_TIMEOUT_USEC=str(int(max(left, 1) * 1e6)))
                    with anyio.move_on_after(min(5.0, max(left, 0.1))):
                        await run.done.wait()
        for run in runs:
            if not run.done.is_set():
                log.error("run_did_not_stop", job=run.job_id, action="SIGKILL")
                self._signal(run, signal.SIGKILL)
                await self._kill_leftovers(run)

    def _signal(self, run: Running, sig: signal.Signals) -> bool:
        if run.identity is None or not run.identity.alive():
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(run.identity.pid, sig)
            return True
        return False

    # -- the API's operations --------------------------------------------------------------

    def _job(self, job_id: int) -> JobRow:
        assert self.store is not None
        job = self.store.job(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id}")
        return job

    async def submit(self, payload: dict[str, Any], key: str | None = None
                     ) -> tuple[dict[str, Any], bool]:
        """Queue a job; (the job, True when new). With ``key`` (an Idempotency-Key) a
        repeated submit gets the job the first one queued."""
        assert self.store is not None
        if key is not None and (known := self.store.submitted(key)) is not None:
            return self.describe(self._job(known)), False
        if not self.accepting:
            raise ApiError(503, "the daemon is stopping; no new jobs")
        try:
            values = jobspec.values_from_payload(payload)
        except jobspec.JobError as exc:
            raise ApiError(400, str(exc)) from None
        cwd = payload.get("cwd") or str(Path.home())
        try:
            spec = await anyio.to_thread.run_sync(lambda: jobspec.parse(
                values, cwd=str(cwd), scratch=self.state / paths.RUNS,
                name=payload.get("name"), priority=payload.get("priority")))
        except jobspec.JobError as exc:
            raise ApiError(400, str(exc)) from None
        if self.gpu_mode and spec.gpus > len(self.slots):
            raise ApiError(400, f"invalid gpus: the job asks for {spec.gpus} GPUs, "
                                f"this daemon has {len(self.slots)}")
        if not self.gpu_mode and spec.gpus > 0 and self.config.gpus.strip().lower() != "auto":
            raise ApiError(400, "invalid gpus: this daemon runs without GPUs (--gpus none)")
        # From here to the commit nothing awaits: a concurrent submit with the same key
        # sees either no job or this one, never a half.
        if key is not None and (known := self.store.submitted(key)) is not None:
            return self.describe(self._job(known)), False
        self._refuse_duplicates(spec)
        if not self.accepting:
            raise ApiError(503, "the daemon is stopping; no new jobs")
        if key is None:
            job_id = self.store.add_job(spec)
        else:
            job_id, new = self.store.add_job_once(spec, key)
            if not new:
                return self.describe(self._job(job_id)), False
        log.info("job_queued", job=job_id, name=spec.name, priority=spec.priority,
                 trainer=spec.trainer, steps=spec.steps)
        self.wake()
        self._update_status()
        return self.describe(self._job(job_id)), True

    def _refuse_duplicates(self, spec: jobspec.JobSpec) -> None:
        """Two queued/running jobs never write one output or run directory."""
        assert self.store is not None
        active = self.store.jobs(ACTIVE)
        clash = jobspec.conflict(spec, [(f"job {j.id} ({j.name}, {j.state})", j.spec)
                                        for j in active])
        if clash is not None:
            raise ApiError(409, clash)

    def describe(self, job: JobRow) -> dict[str, Any]:
        """One job as ``ps`` and the API show it."""
        run = self.running.get(job.id)
        assert self.store is not None
        attempt = self.store.attempt(job.id, job.attempts) if job.attempts else None
        step, total, loss, rate = job.steps_done, job.target_step or job.spec.steps, \
            job.last_loss, None
        if run is not None:
            p = run.progress
            step = p.step if p.step is not None else step
            total = p.final or total
            loss = p.loss if p.loss is not None else loss
            rate = p.rate
        return {
            "id": job.id, "name": job.name, "state": job.state, "priority": job.priority,
            "trainer": None if job.broken else job.spec.trainer, "step": step,
            "steps": None if job.broken else total,
            "loss": _json_number(loss), "steps_per_second": _json_number(rate),
            "outcome": job.outcome, "reason": job.reason,
            "waiting": job.waiting, "attempt": job.attempts, "retries": job.spec.retries,
            "retries_used": job.retries_used, "gpus": job.spec.gpus,
            "slot": attempt.slot if attempt and job.state == "running" else None,
            "devices": attempt.devices if attempt and job.state == "running" else None,
            "pid": attempt.pid if attempt and job.state == "running" else None,
            "run_dir": attempt.run_dir if attempt else None,
            "output_dirs": list(job.spec.output_dirs), "cwd": job.spec.cwd,
            "created": job.created, "updated": job.updated,
        }

    def list_jobs(self, limit: int | None = None) -> list[dict[str, Any]]:
        assert self.store is not None
        return [self.describe(j) for j in self.store.jobs(limit=limit)]

    def show(self, job_id: int) -> dict[str, Any]:
        assert self.store is not None
        job = self._job(job_id)
        out = self.describe(job)
        out["attempts"] = [a.__dict__ for a in self.store.attempts(job_id)]
        out["job"] = job.spec.values
        out["notify"] = {k: v for k, v in job.spec.notify.items() if k != "secret"}
        return out

    def run_dirs(self, job_id: int) -> list[Path]:
        assert self.store is not None
        self._job(job_id)
        return [Path(a.run_dir) for a in self.store.attempts(job_id)]

    def is_final(self, job_id: int) -> bool:
        """Final, and its last run's supervisor has exited (the job is settled as soon as the
        outcome is on record; the supervisor then still writes its report and last log line)."""
        assert self.store is not None
        job = self._job(job_id)
        if job.state not in FINAL:
            return False
        attempt = self.store.attempt(job_id, job.attempts) if job.attempts else None
        if attempt is None or attempt.pid is None:
            return True
        return not Identity(attempt.pid, attempt.start_time, attempt.boot_id or "").alive()

    def cancel(self, job_id: int) -> dict[str, Any]:
        assert self.store is not None
        job = self._job(job_id)
        if job.state == "queued":
            self.store.update_job(job_id, state="cancelled", outcome="cancelled",
                                  reason="cancelled while queued")
            log.info("job_cancelled", job=job_id, was="queued")
            self._final(job_id)
            self._update_status()
        elif job.state == "running":
            run = self.running.get(job_id)
            self.store.update_job(job_id, stop_request="cancel")
            if run is not None:
                run.stop_request = "cancel"
                self._signal(run, signal.SIGTERM)
            log.info("job_cancelled", job=job_id, was="running", action="SIGTERM to its "
                     "supervisor")
        else:
            raise ApiError(409, f"job {job_id} is already {job.state}")
        return self.describe(self._job(job_id))

    def metrics(self) -> tuple[bytes, str]:
        from lorasup.supervisor.serve.metrics import render

        return render(self)

    def health(self) -> dict[str, Any]:
        assert self.store is not None
        return {"ok": self.storage_problem is None,
                "pid": os.getpid(), "running": len(self.running),
                "accepting": self.accepting, "slots": len(self.slots),
                "storage": self.storage_problem, "incidents": list(self.store.incidents),
                "uptime_s": round(time.time() - self.started, 3),
                "start_time": start_time(os.getpid())}

    # -- the dashboard's additions (issue 18) -----------------------------------------------

    @property
    def listen_address(self) -> str | None:
        """``--listen HOST:PORT``: its host is one the API answers to (security.Shield)."""
        return self.config.listen

    def set_priority(self, job_id: int, priority: int) -> dict[str, Any]:
        """A queued job's new priority (the scheduler orders by the column)."""
        assert self.store is not None
        job = self._job(job_id)
        if job.state != "queued":
            raise ApiError(409, f"job {job_id} is {job.state}: only a queued job's priority "
                                "can change")
        self.store.update_job(job_id, priority=priority)
        log.info("job_priority", job=job_id, priority=priority, was=job.priority)
        self.wake()
        return self.describe(self._job(job_id))
