"""The job history rebuilt from the run directories, after a damaged database was moved
aside: each attempt's run directory holds ``attempt.json`` (the job's id, spec and the
attempt's run id, written by the daemon before the run is spawned) and the run's own
``events.jsonl``, which is enough to say what became of the job.

A job whose last attempt has an outcome gets the final state its run says (``completed``
or ``failed`` with the outcome); one whose last attempt has none is restored ``running``,
so the recovery that follows adopts its live supervisor, queues again a run that never
started, or settles a vanished one as usual. Jobs that never had a run directory under the
state directory (queued ones, jobs with their own ``run_dir``/``logs_dir``) cannot be
recovered; their ids are logged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import structlog

from lorasup.supervisor.serve.jobspec import JobSpec
from lorasup.supervisor.serve.runs import ATTEMPT_FILE, EventsFollower
from lorasup.supervisor.serve.store import AttemptRow, Store, internal_reason, load_spec

log = structlog.get_logger("lorasup.serve")

#: run directories looked at, at most (a bound on the time a start can take)
MAX_RUN_DIRS = 100_000


def _attempt_info(run_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((run_dir / ATTEMPT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    job, n = data.get("job"), data.get("attempt")
    if not isinstance(job, int) or not isinstance(n, int) or job < 1 or n < 1:
        return None
    return data


def rebuild(store: Store, runs: Path) -> dict[str, list[int]]:
    """Restore into ``store`` (a fresh database) every job found under ``runs``; which job
    ids were recovered and which could not be (blocking: call from a worker thread)."""
    found: dict[int, dict[int, tuple[Path, dict[str, Any]]]] = {}
    try:
        entries = sorted(runs.iterdir())[:MAX_RUN_DIRS]
    except OSError:
        entries = []
    for run_dir in entries:
        info = _attempt_info(run_dir)
        if info is not None:
            found.setdefault(info["job"], {})[info["attempt"]] = (run_dir, info)
    recovered: list[int] = []
    lost: list[int] = []
    for job_id in sorted(found):
        try:
            _restore(store, job_id, found[job_id])
            recovered.append(job_id)
        except Exception as exc:
            lost.append(job_id)
            log.error("job_not_recovered", job=job_id, error=internal_reason(exc))
    top = max([*found, 0])
    missing = [i for i in range(1, top + 1) if i not in found]
    if missing:
        shown = missing[:50]
        log.error("jobs_not_recovered", jobs=shown, more=len(missing) - len(shown),
                  why="no run directory under the state directory (queued, or a job with "
                      "its own run_dir/logs_dir)")
    log.warning("state_db_rebuilt", recovered=len(recovered), not_recovered=len(lost)
                + len(missing))
    return {"recovered": recovered, "not_recovered": sorted(lost + missing)}


def _restore(store: Store, job_id: int, attempts: dict[int, tuple[Path, dict[str, Any]]]
             ) -> None:
    last_n = max(attempts)
    last_info = attempts[last_n][1]
    if not isinstance(last_info.get("spec"), dict):
        raise ValueError("attempt.json has no job spec (written by an older daemon)")
    spec: JobSpec = load_spec(json.dumps(last_info["spec"]))
    rows: list[AttemptRow] = []
    state, outcome, reason = "running", None, None
    steps_done: int | None = None
    last_loss: float | None = None
    for n in sorted(attempts):
        run_dir, info = attempts[n]
        run_id = info.get("run_id") if isinstance(info.get("run_id"), str) else run_dir.name
        follower = EventsFollower(run_dir / "events.jsonl", run_id)
        follower.drain()
        p = follower.progress
        result = p.outcome or {}
        ended = result.get("t") if isinstance(result.get("t"), int | float) else None
        code = result.get("exit_code")
        rows.append(AttemptRow(
            job_id=job_id, n=n, run_id=run_id, run_dir=str(run_dir),
            why=str(info.get("why") or "submitted"), slot=info.get("slot"),
            devices=",".join(info["devices"]) if isinstance(info.get("devices"), list)
            else None, pid=None, start_time=None, boot_id=None,
            started=(run_dir / ATTEMPT_FILE).stat().st_mtime,
            ended=ended if p.outcome is not None else None,
            outcome=result.get("outcome") if isinstance(result.get("outcome"), str) else None,
            exit_code=code if isinstance(code, int) else None,
            end_reason=str(result.get("reason") or "") if p.outcome is not None else None,
            steps=(p.step - p.offset) if p.step is not None and p.outcome is not None
            else None))
        if n == last_n:
            steps_done, last_loss = p.step, p.loss
            if p.outcome is not None:
                outcome = rows[-1].outcome
                reason = rows[-1].end_reason or None
                state = "completed" if outcome == "completed" else "failed"
            else:
                rows[-1] = AttemptRow(**{**rows[-1].__dict__, "ended": None})
    created = last_info.get("created")
    store.restore_job(job_id, spec, state, outcome, reason, last_n, steps_done, last_loss,
                      created if isinstance(created, int | float) else rows[0].started)
    for row in rows:
        store.restore_attempt(row)
