"""The daemon: one event loop that keeps up to K runs going, each under its own
``lorasup start`` process, with the queue in SQLite and an HTTP API on a UNIX socket.

Tasks of the loop: the API server(s), the scheduler (woken by submissions, ends of runs and
backoff timers), one watcher per running attempt (events.jsonl for progress, a pidfd for
the exit), the webhook worker, systemd's watchdog, and the signal handler that turns
SIGTERM/SIGINT into a graceful stop of every run (re-queued, resumed by the next daemon).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections import OrderedDict
from typing import Any

import anyio
import structlog

from lorasup.supervisor.notify import Notifier
from lorasup.supervisor.serve import extend as extending
from lorasup.supervisor.serve import gpus as gpu_slots
from lorasup.supervisor.serve import jobspec, listening, paths
from lorasup.supervisor.serve.attempts import Attempts
from lorasup.supervisor.serve.daemonparts import DaemonConfig, DaemonParts, Running
from lorasup.supervisor.serve.dispatch import Dispatch
from lorasup.supervisor.serve.errors import ApiError
from lorasup.supervisor.serve.gpumemory import GpuMemory
from lorasup.supervisor.serve.hooks import Webhooks
from lorasup.supervisor.serve.procid import start_time
from lorasup.supervisor.serve.recovery import Recovery
from lorasup.supervisor.serve.settle import Settling
from lorasup.supervisor.serve.store import ACTIVE, Store, internal_reason
from lorasup.supervisor.serve.storefaults import StorageFaults
from lorasup.supervisor.serve.views import Views

log = structlog.get_logger("lorasup.serve")

#: seconds on top of the longest grace for the runs' own stop (their report, the plot)
STOP_MARGIN = 15.0

__all__ = ["ApiError", "Daemon", "DaemonConfig"]


class Daemon(Views, Dispatch, Attempts, Settling, Recovery, StorageFaults, GpuMemory,
             DaemonParts):
    """The daemon: its life (start, serve, stop) and the API's operations that change
    the queue; its other parts are the mixins (one module each). New operations go at
    the end of this class."""

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
        #: --until-empty counts its idle time from the start (the first submit may follow)
        self._idle_since: float | None = time.monotonic()
        #: GPU memory peaks per job (gpumemory.py), the newest kept
        self._gpu_peaks: OrderedDict[int, dict[str, Any]] = OrderedDict()

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
                server = make_server(self, token=self.config.token if i else None,
                                     tls=self.config.tls if i else None)
                self._servers.append(server)
                tg.start_soon(server.serve, [sock])
            for server in self._servers:
                while not server.started:
                    await anyio.sleep(0.01)
            log.info("serving", state_dir=str(self.state), socket=str(
                paths.socket_path(self.state)), slots=[s.name for s in self.slots],
                gpu_mode=self.gpu_mode, listen=self.config.listen,
                tls=self.config.tls is not None, dashboard=self._dashboard_address())
            self.notifier.ready(self._status())
            tg.start_soon(self.notifier.keep_alive)
            tg.start_soon(self._schedule_loop)
            tg.start_soon(self._sample_gpu_memory)
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
        # No default: a job run in the daemon's home directory would surprise its submitter.
        cwd = payload.get("cwd")
        try:
            spec = await anyio.to_thread.run_sync(lambda: jobspec.parse(
                values, cwd=cwd if isinstance(cwd, str) else None,
                scratch=self.state / paths.RUNS,
                name=payload.get("name"), priority=payload.get("priority")))
        except jobspec.JobError as exc:
            raise ApiError(400, str(exc), exc.errors if len(exc.errors) > 1 else None
                           ) from None
        if self.gpu_mode and spec.gpus > len(self.slots):
            raise ApiError(400, f"invalid gpus: the job asks for {spec.gpus} GPUs, "
                                f"this daemon has {len(self.slots)}")
        if not self.gpu_mode and spec.gpus > 0:
            # It would run without CUDA_VISIBLE_DEVICES, on whatever GPU it finds.
            found = "it found none" if self.config.gpus.strip().lower() == "auto" \
                else "--gpus none"
            raise ApiError(400, f"invalid gpus: the job asks for {spec.gpus} GPU(s), but this "
                                f"daemon has no GPU slots ({found}); name the devices with "
                                "`lorasup serve --gpus 0,1`, or submit with gpus = 0")
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

    def _dashboard_address(self) -> str | None:
        """The dashboard on --listen (a browser signs in there once with ``?token=``)."""
        if not self.config.listen:
            return None
        scheme = "https" if self.config.tls else "http"
        return f"{scheme}://{self.config.listen}/"

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

    async def extend(self, job_id: int, steps: int) -> dict[str, Any]:
        """"Add N steps": a new queued job continuing a finished one from its newest save
        to its old target plus ``steps`` (extend.py says which jobs can)."""
        assert self.store is not None
        old = self._job(job_id)
        target = extending.new_target(old, steps)
        if not self.accepting:
            raise ApiError(503, "the daemon is stopping; no new jobs")
        values, name = await anyio.to_thread.run_sync(
            extending.continued_values, old, steps, target)
        try:
            spec = await anyio.to_thread.run_sync(lambda: jobspec.parse(
                values, cwd=old.spec.cwd, scratch=self.state / paths.RUNS, name=name,
                priority=old.priority))
        except jobspec.JobError as exc:
            raise ApiError(409, f"job {job_id} cannot be continued: {exc}") from None
        # From here to the commits nothing awaits (as in submit).
        self._refuse_duplicates(spec)
        if not self.accepting:
            raise ApiError(503, "the daemon is stopping; no new jobs")
        new_id = self.store.add_job(spec)
        # a retry of the new job resumes from the old save until it saves one of its own
        self.store.update_job(new_id, target_step=target, saved_step=old.saved_step)
        log.info("job_extended", job=new_id, continues=job_id, name=spec.name,
                 steps_added=steps, target_step=target, from_step=old.saved_step)
        self.wake()
        self._update_status()
        return self.describe(self._job(new_id))
