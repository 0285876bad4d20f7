"""The daemon's scheduling loop: woken by submissions, ends of runs and backoff timers,
it asks the scheduler's pure decision what starts on which free slot.
"""

from __future__ import annotations

import math
import time

import anyio
import structlog

from lorasup.supervisor.serve import gpus as gpu_slots
from lorasup.supervisor.serve import scheduler
from lorasup.supervisor.serve import store as stores
from lorasup.supervisor.serve.daemonparts import DaemonParts
from lorasup.supervisor.serve.scheduler import Slot, Waiting
from lorasup.supervisor.serve.store import ACTIVE, StoreUnavailable, internal_reason
from lorasup.supervisor.serve.storefaults import STORE_BACKOFF_MAX

log = structlog.get_logger("lorasup.serve")

#: the scheduler looks again at least this often (backoff timers, GPUs freed by others)
SCHEDULE_SECONDS = 2.0


class Dispatch(DaemonParts):
    """The loop that starts queued jobs on free slots."""

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
            if self.config.until_empty:
                idle_left = self._idle_left()
                if idle_left <= 0:
                    log.info("queue_empty", idle_s=self.config.idle,
                             action="exiting (--until-empty)")
                    self._stop.set()
                    return
                timeout = min(timeout, idle_left)
            self._update_status()
            with anyio.move_on_after(timeout):
                await self._wake.wait()

    def _idle_left(self) -> float:
        """Seconds until ``--until-empty`` may exit: the queue empty and nothing running for
        ``--idle`` seconds, counted from the daemon's start or the last job's end (so a
        daemon started just before the first submit waits for it); inf while busy."""
        assert self.store is not None
        if self.running or self.store.jobs(ACTIVE):
            self._idle_since = None
            return math.inf
        now = time.monotonic()
        if self._idle_since is None:
            self._idle_since = now
        return self._idle_since + self.config.idle - now

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
        waits = scheduler.reasons(waiting, free, now, gpu_mode=self.gpu_mode)
        for job in queued:
            text = waits.get(job.id)
            if why and text is not None and not text.startswith("after job"):
                text = why  # a foreign process on the GPU, a full disk: the real cause
            if text != job.waiting:
                self.store.update_job(job.id, waiting=text)
        later = [j.not_before - now for j in queued if j.not_before > now]
        return max(0.05, min([SCHEDULE_SECONDS, *later]))
