"""Starting one attempt of a job: a fresh run directory claimed, the attempt committed,
its ``lorasup start`` spawned and followed from then on.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
from pathlib import Path

import anyio
import structlog

from lorasup.supervisor.serve import jobspec, paths
from lorasup.supervisor.serve import store as stores
from lorasup.supervisor.serve.daemonparts import DaemonParts, Running
from lorasup.supervisor.serve.procid import Identity
from lorasup.supervisor.serve.runs import (
    EventsFollower,
    RunDirTaken,
    child_environment,
    claim_run_dir,
    spawn_supervisor,
)
from lorasup.supervisor.serve.scheduler import Slot
from lorasup.supervisor.serve.store import JobRow

log = structlog.get_logger("lorasup.serve")

#: test hook (documented in the README): ``LORASUP_FAULT=<point>`` makes the daemon SIGKILL
#: itself at that point of starting a run: after_claim_run_dir, after_commit_attempt,
#: after_spawn (before the pid is recorded). Unset: no effect.
FAULT_ENV = "LORASUP_FAULT"


def _fault(point: str) -> None:
    """The crash a test asks for at ``point`` (nothing unless LORASUP_FAULT names it)."""
    if os.environ.get(FAULT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


class Attempts(DaemonParts):
    """Claiming a run directory and spawning an attempt's supervisor."""

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
        resume_from: int | str | None = None
        if n > 1 and job.target_step is not None:
            found = await anyio.to_thread.run_sync(lambda: jobspec.resumed(
                job.spec.values, job.spec.trainer, target_step=job.target_step or 0,
                saved_step=job.saved_step, output_dirs=job.spec.output_dirs))
            if found is not None:
                # the step the save holds where the trainer's files tell it, else the save
                values, resume = found
                resume_from = resume.step if resume.step is not None else (
                    resume.point or "checkpoint")
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
        self._notify(job.id, "started", attempt=n)
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
