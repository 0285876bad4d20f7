"""Following a running attempt (events.jsonl for progress, a pidfd for the exit) and
settling it: the outcome recorded and the job's next state decided in one commit,
then the webhooks of a final state.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import anyio
import structlog

from lorasup.supervisor.serve import jobspec, scheduler
from lorasup.supervisor.serve.daemonparts import DaemonParts, Running
from lorasup.supervisor.serve.procid import kill_group
from lorasup.supervisor.serve.runs import usage_error, wait_exit
from lorasup.supervisor.serve.store import FINAL, internal_reason

log = structlog.get_logger("lorasup.serve")

#: how long a trainer left behind by a killed supervisor may take to go after SIGKILL
LEFTOVER_WAIT = 10.0
USAGE_EXIT = 2
#: how long a settled job waits for its run's final report.json (it is written after the
#: outcome event, once the CSV and the plot are done)
REPORT_WAIT = 30.0


def _has_outcome(report: Path) -> bool:
    """report.json exists, reads as JSON and names the run's outcome."""
    try:
        data = json.loads(report.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and isinstance(data.get("outcome"), str)


class Settling(DaemonParts):
    """Following attempts to their end and recording it."""

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
        elif end.retries_used > job.retries_used:
            self._notify(run.job_id, "retrying", retry_in_s=round(
                max(end.not_before - time.time(), 0.0), 1), after=outcome)
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
        self._notify(job_id, None)

    def _notify(self, job_id: int, event: str | None, **extra: Any) -> None:
        """Webhooks of ``event`` (``started``, ``retrying``; None: the job's final state) to
        the targets that ask for it; a failure is logged and changes nothing."""
        try:
            self._hooks_for(job_id, event, extra)
        except Exception as exc:
            log.error("webhook_not_queued", job=job_id, error=internal_reason(exc))

    def _hooks_for(self, job_id: int, event: str | None, extra: dict[str, Any]) -> None:
        assert self.store is not None
        job = self.store.job(job_id)
        if job is None:
            return
        wanted = event or job.state
        targets = [t for t in (job.spec.notify, self.config.notify)
                   if t.get("webhook") and jobspec.wants(t, wanted)]
        if len(targets) == 2 and targets[0]["webhook"] == targets[1]["webhook"]:
            targets.pop()
        if not targets:
            return
        attempts = self.store.attempts(job_id)
        report = str(Path(attempts[-1].run_dir) / "report.json") if attempts else None
        name = f"job.{event or 'finished'}"
        self.hooks.post(targets, name, {
            "event": name, "job": job.id, "name": job.name, "state": job.state,
            "outcome": job.outcome, "reason": job.reason, "steps": job.steps_done,
            "steps_requested": job.target_step or job.spec.steps, "final_loss": job.last_loss,
            "attempts": job.attempts, "report": report,
            "run_dir": attempts[-1].run_dir if attempts else None, "time": time.time(),
            **extra})
