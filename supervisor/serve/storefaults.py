"""The daemon's faults of the storage and of one job: a write the database refuses is
waited out (the outcome in hand is kept); an exception of lorasup's own while handling
one job fails that job alone.
"""

from __future__ import annotations

import signal
from typing import Any

import anyio
import structlog

from lorasup.supervisor.serve.daemonparts import DaemonParts
from lorasup.supervisor.serve.store import StoreUnavailable, internal_reason

log = structlog.get_logger("lorasup.serve")

#: the longest wait between two tries of a write the database refused (locked, disk full)
STORE_BACKOFF_MAX = 5.0


class StorageFaults(DaemonParts):
    """Retrying the database; failing one job for an error of lorasup's own."""

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
