"""The jobs as the API shows them: one job described (with the live progress of its run),
the list, one job in full, its run directories, whether it is over.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorasup.supervisor.serve.errors import ApiError
from lorasup.supervisor.serve.procid import Identity
from lorasup.supervisor.serve.store import ACTIVE, FINAL, JobRow


def _json_number(value: float | None) -> float | str | None:
    """JSON has no NaN/inf; a diverged loss is spelled out as events.jsonl spells it."""
    if value is None or math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


if TYPE_CHECKING:
    from lorasup.supervisor.serve.daemonparts import DaemonParts as _Parts
else:  # `ps` without a daemon uses these views: not the daemon's imports (anyio, hooks...)
    _Parts = object


class Views(_Parts):
    """Read-only views of the jobs for the API and ``ps``/``show``."""

    def _job(self, job_id: int) -> JobRow:
        assert self.store is not None
        job = self.store.job(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id}")
        return job

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
        now = time.time()
        elapsed = eta = None
        if attempt is not None:
            elapsed = (attempt.ended if attempt.ended is not None else now) - attempt.started
        if job.state == "running" and rate and step is not None and total and not job.broken:
            eta = max(total - step, 0) / rate
        waiting = job.waiting
        if job.state == "queued" and job.not_before > now:
            waiting = f"retry in {math.ceil(job.not_before - now)} s"
        out: dict[str, Any] = {
            "id": job.id, "name": job.name, "state": job.state, "priority": job.priority,
            "trainer": None if job.broken else job.spec.trainer, "step": step,
            "steps": None if job.broken else total,
            "loss": _json_number(loss), "steps_per_second": _json_number(rate),
            "outcome": job.outcome, "reason": job.reason,
            "waiting": waiting, "attempt": job.attempts, "retries": job.spec.retries,
            "retries_used": job.retries_used, "gpus": job.spec.gpus,
            "slot": attempt.slot if attempt and job.state == "running" else None,
            "devices": attempt.devices if attempt and job.state == "running" else None,
            "pid": attempt.pid if attempt and job.state == "running" else None,
            "run_dir": attempt.run_dir if attempt else None,
            "output_dirs": list(job.spec.output_dirs), "cwd": job.spec.cwd,
            "created": job.created, "updated": job.updated,
            "elapsed_s": None if elapsed is None else round(max(elapsed, 0.0), 3),
            "eta_s": None if eta is None else round(eta, 1),
        }
        gpu_memory = getattr(self, "gpu_memory_fields", None)  # the daemon's (gpumemory.py)
        if gpu_memory is not None:
            out.update(gpu_memory(job.id, job.state))
        return out

    def list_jobs(self, limit: int | None = None, finished: int | None = None
                  ) -> list[dict[str, Any]]:
        """Every job (the newest ``limit``); with ``finished``: the queued and running ones
        and the newest ``finished`` of the others (what ``ps`` shows by default)."""
        assert self.store is not None
        if finished is None:
            return [self.describe(j) for j in self.store.jobs(limit=limit)]
        rows = self.store.jobs(ACTIVE) + (
            self.store.jobs(FINAL, limit=finished) if finished > 0 else [])
        rows.sort(key=lambda j: j.id)
        return [self.describe(j) for j in rows]

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
