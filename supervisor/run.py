"""One supervised run, orchestrated: start, watch, stop, settle.

Everything happens in one anyio task group: two readers drain the pipes (the bytes →
events path is :mod:`intake`), the watchdogs hold deadlines, a controller waits for a stop
request and climbs the escalation ladder (:mod:`stopping`), and a sink task writes what
the readers parsed. The first stop reason wins; :mod:`outcome` turns it and the exit
status into the outcome; the report is written whatever happens.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import anyio
import structlog
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from lorasup.supervisor import logs, redact, signals
from lorasup.supervisor.artifacts import artifacts_event
from lorasup.supervisor.console import Progress, TerminalEcho
from lorasup.supervisor.events import Artifacts, Event, Exited, Note, Outcome, Problem
from lorasup.supervisor.gate import StepGate
from lorasup.supervisor.intake import Intake
from lorasup.supervisor.notify import Notifier
from lorasup.supervisor.outcome import EXIT_CODES, RunFacts, decide
from lorasup.supervisor.plan import RunPlan, RunResult, environment, report_command, started_event
from lorasup.supervisor.plot import PlotChild
from lorasup.supervisor.process import ProcessTree, become_subreaper, spawn, wait_gone
from lorasup.supervisor.redact import redact_argv
from lorasup.supervisor.signals import STOP_SIGNALS
from lorasup.supervisor.sink import Batch, ReportSink, emit
from lorasup.supervisor.stacks import evidence, take_stacks
from lorasup.supervisor.stopping import Stopper
from lorasup.supervisor.trainerlog import TrainerLog
from lorasup.supervisor.watchdogs import (
    DivergenceWatch,
    ProgressWatchdog,
    SilenceWatchdog,
    total_timeout,
)
from lorasup.trainers.base import Adapter

if TYPE_CHECKING:
    from lorasup.supervisor.tensorboard import EventFileFollower

log = structlog.get_logger("lorasup")

#: batches (one per read) queued for the sink; a slower sink then slows the readers down
#: instead of growing memory
SINK_BUFFER_BATCHES = 16
TREE_SCAN_SECONDS = 2.0
#: after the leader exited, how long readers may wait for EOF from leftover holders
READER_DRAIN_SECONDS = 2.0
#: stop reasons that mean "hung": the tree's stacks are taken before it is stopped
STACKS_BEFORE_STOP = ("stalled", "no_progress")


class Supervisor:
    """Runs one plan to its outcome. Create, then ``await run()`` once."""

    def __init__(self, plan: RunPlan, adapter: Adapter, plot: PlotChild | None = None,
                 echo: TerminalEcho | None = None) -> None:
        self.plan = plan
        self.adapter = adapter
        # A token given by name (argv flag, environment) is masked wherever it shows later.
        redact.remember(plan.argv, os.environ)
        self.tree: ProcessTree | None = None
        self.stop_reason: str | None = None
        self.stop_requested = anyio.Event()
        self.stop_done = anyio.Event()
        self.exited = False
        self._t0 = anyio.current_time()
        self._wall0 = time.time()
        self.gate = StepGate(plan.steps, stop_at_limit=not adapter.stops_by_itself,
                             on_stop=self.request_stop, on_limit=self._on_limit)
        self.divergence = DivergenceWatch(plan.nan_patience)
        self.silence = SilenceWatchdog(plan.no_output_timeout, plan.startup_timeout)
        self.progress_watch = (ProgressWatchdog(plan.no_progress_timeout)
                               if plan.no_progress_timeout is not None else None)
        #: what the silence watchdog saw when it fired (the outcome's reason)
        self._silence_reason: str | None = None
        #: one stacks capture at a time (SIGQUIT and a stall may meet)
        self._stacks_lock = anyio.Lock()
        #: lorasup's own faults: an exception of ours, the sink's failure
        self.internal_error: str | None = None
        self.sink_error: str | None = None
        #: lorasup's own failure made it stop a trainer that was still running
        self.crash_stopped = False
        self.sink = ReportSink(plan.run_dir, self._model_files, plot=plot)
        self.notifier = Notifier()
        self.spawn_error: str | None = None
        self.progress = Progress(self.gate, plan.steps, self.notifier, tty=plan.progress_tty)
        self.stopper = Stopper(adapter.stop_signals, plan.grace, clock=self.now,
                               request_stop=self.request_stop)
        self.intake = Intake(adapter, self.gate, self.divergence, self.progress,
                             self.sink.faults, clock=self.now, request_stop=self.request_stop,
                             touched=self.silence.touch, stepped=self._stepped,
                             sigint_sent=lambda: self.stopper.sigint_sent, echo=echo)
        self.follower: EventFileFollower | None = None
        if plan.tensorboard_dir is not None:
            # Imported only here: most runs read no event files, and every start pays
            # for what it imports before the trainer is spawned.
            from lorasup.supervisor.tensorboard import EventFileFollower

            root = plan.tensorboard_dir
            root = root if root.is_absolute() else plan.cwd / root
            self.follower = EventFileFollower(root, not_before=self._wall0 - 1)

    def now(self) -> float:
        return anyio.current_time() - self._t0

    # -- stopping ---------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Ask for the trainer to be stopped; the first reason is the one that counts."""
        if self.stop_reason is not None or self.exited:
            return
        self.stop_reason = reason
        self.stop_requested.set()
        self.notifier.stopping(f"stopping the trainer: {reason}")
        log.info("stop_requested", reason=reason, step=self.gate.last, t=round(self.now(), 3))

    def _on_limit(self) -> None:
        if self.progress_watch is not None:
            # No step follows the last one: the final save is the finish limit's business.
            self.progress_watch.stand_down()
        if self.adapter.stops_by_itself:
            self.silence.finish_within(self.plan.finish_timeout)
            log.info("last_step_seen", step=self.gate.last,
                     waiting_for="trainer to finish saving",
                     finish_timeout_s=self.plan.finish_timeout)

    async def _escalate(self, reason: str, send: ObjectSendStream[Batch]) -> None:
        assert self.tree is not None
        await self.stopper.escalate(self.tree, reason, send)

    async def _control(self, send: ObjectSendStream[Batch]) -> None:
        async with send:
            await self.stop_requested.wait()
            with anyio.CancelScope(shield=True):
                if self.stop_reason in STACKS_BEFORE_STOP:
                    # Where it hung, before the evidence is killed (bounded, see stacks.py).
                    await self._dump_stacks(self.stop_reason or "stalled", send, stalled=True)
                await self._escalate(self.stop_reason or "stop", send)
            self.stop_done.set()

    # -- watching ---------------------------------------------------------------------

    async def _dump_stacks(self, reason: str, send: ObjectSendStream[Batch], *,
                           stalled: bool) -> None:
        """The tree's Python stacks into stacks.txt and the report; for a stall, each
        process's innermost frames become the problem's evidence."""
        assert self.tree is not None
        async with self._stacks_lock:
            event, stacks = await take_stacks(self.tree, self.plan.run_dir, reason)
        t = self.now()
        batch: list[tuple[float, Event]] = [(t, event)]
        if stalled:
            batch.extend((t, Problem(problem="stalled_in" if s.threads else "no_stack",
                                     line=evidence(s))) for s in stacks)
        await emit(send, batch)

    async def _watch_quit(self, send: ObjectSendStream[Batch]) -> None:
        """lorasup's own SIGQUIT: dump the tree's stacks, stop nothing."""
        async with send:
            with anyio.open_signal_receiver(signal.SIGQUIT) as signals:
                async for _ in signals:
                    log.info("lorasup_signalled", signal="SIGQUIT", action="dumping stacks")
                    if not self.exited:
                        await self._dump_stacks("SIGQUIT", send, stalled=False)

    def _on_silence(self) -> None:
        before = "" if self.silence.training else " before the first step"
        self._silence_reason = f"no output for {self.silence.limit:g}s{before}"
        self.request_stop("stalled")

    def _stepped(self) -> None:
        """A new step: the start-up allowance is over, and progress was made."""
        self.silence.first_step()
        if self.progress_watch is not None:
            self.progress_watch.stepped()

    async def _watch_signals(self, signals: AsyncIterator[int]) -> None:
        """lorasup's own SIGINT/SIGTERM/SIGHUP: stop the trainer gracefully, exit 128+n.

        The receiver is opened before the trainer is spawned and held until the report is
        written, so no signal ever meets the default action (death, no report, an orphan).
        """
        async for signum in signals:
            self.stopper.on_signal(signal.Signals(signum))

    async def _scan_tree(self) -> None:
        assert self.tree is not None
        while True:
            # /proc is read in a worker thread; the tree is only changed on this thread.
            self.tree.remember(await anyio.to_thread.run_sync(self.tree.discover))
            await anyio.sleep(TREE_SCAN_SECONDS)

    # -- the run ----------------------------------------------------------------------

    def _artifacts(self) -> Artifacts:
        return artifacts_event(self.intake.checkpoints, self.plan.output_dirs, self.plan.cwd,
                               self._wall0)

    def _model_files(self) -> list[str]:
        """The sink's fallback when no ``artifacts`` event reached it."""
        return list(self._artifacts().model_files)

    async def _run_sink(self, receive: ObjectReceiveStream[Batch]) -> None:
        try:
            await self.sink.run(receive)
        except Exception as exc:  # the run must still reach its outcome
            self.sink_error = f"{type(exc).__name__}: {exc}"
            log.error("sink_failed", error=self.sink_error, exc_info=exc,
                      action="the run goes on without events.jsonl/report updates")

    async def run(self) -> RunResult:
        """The whole run; whatever fails inside, it ends with an outcome and no process of
        the trainer's tree left alive."""
        plan = self.plan
        structlog.contextvars.bind_contextvars(run_id=plan.run_id)
        logs.set_fallback_file(plan.run_dir / "lorasup.log")
        send, receive = anyio.create_memory_object_stream[Batch](SINK_BUFFER_BATCHES)
        returncode: int | None = None
        outcome, code, reason = "internal_error", EXIT_CODES["internal_error"], "unfinished"
        try:
            # Handlers first: a signal from here on stops the run, it never kills lorasup.
            with anyio.open_signal_receiver(*STOP_SIGNALS) as received:
                for held in signals.take_held():
                    self.stopper.on_signal(held)
                async with anyio.create_task_group() as watchers:
                    watchers.start_soon(self._watch_signals, received)
                    async with anyio.create_task_group() as outer:
                        outer.start_soon(self._run_sink, receive)
                        async with send:
                            try:
                                returncode = await self._supervise(send)
                            except Exception as exc:  # see _after_crash
                                returncode = await self._after_crash(exc, send)
                            outcome, code, reason = decide(self._facts(returncode))
                            # Recorded, so that a rebuilt report names the same files.
                            left = await anyio.to_thread.run_sync(self._artifacts)
                            await emit(send, [(self.now(), left), (self.now(), Outcome(
                                outcome=outcome, exit_code=code, reason=reason,
                                trainer_returncode=returncode))])
                    watchers.cancel_scope.cancel()
                # Closing the receiver restores the default actions: hold them again.
                signals.hold()
        finally:
            # The safety net runs first on every path: no process of the tree outlives us.
            with anyio.CancelScope(shield=True):
                await self._release_tree()
            self.intake.trainer_log.close()
            if echo := self.intake.echo:
                # what is queued reaches the terminal (bounded) before the outcome's line
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(echo.close)
            self.notifier.close()
            self.progress.write("\n")
        log.info("outcome", outcome=outcome, exit_code=code, reason=reason,
                 trainer_returncode=returncode, step=self.gate.last,
                 report=str(plan.run_dir / "report.json"),
                 **({"unwritten": self.sink.unwritten} if self.sink.unwritten else {}))
        structlog.contextvars.unbind_contextvars("run_id")
        return RunResult(outcome, code, plan.run_dir, self.sink.report)

    async def _release_tree(self) -> None:
        if self.tree is None:
            return
        if self.tree.survivors():
            log.error("tree_killed_at_exit", pids=self.tree.survivors(),
                      reason="lorasup is ending and the trainer's tree is still running")
            self.tree.kill_now()
            await wait_gone(self.tree, 5.0)
        await self.tree.release()

    async def _after_crash(self, exc: Exception, send: ObjectSendStream[Batch]) -> int | None:
        """A bug of lorasup's own: stop the trainer gracefully (its pipes drained) and end
        as ``internal_error``, never leaving it running or killing it without a grace."""
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]  # type: ignore[assignment]  # the task's own error
        self.internal_error = f"{type(exc).__name__}: {exc}"[:500]
        log.error("internal_error", error=self.internal_error, exc_info=exc)
        await emit(send, [(self.now(),
                                 Note(message=f"lorasup failed: {self.internal_error}"))])
        if self.tree is None:
            return None
        with anyio.CancelScope(shield=True):
            if not self.exited:
                self.crash_stopped = True
                async with anyio.create_task_group() as tg:
                    process = self.tree.process
                    for which, stream in enumerate((process.stdout, process.stderr)):
                        if stream is not None:
                            tg.start_soon(self.intake.drain, stream, which)
                    await self._escalate("internal_error", send)
                    tg.cancel_scope.cancel()
        return self.tree.returncode

    async def _supervise(self, send: ObjectSendStream[Batch]) -> int | None:
        plan = self.plan
        become_subreaper()
        if self.stop_reason in ("interrupted", "preempted"):
            return None  # signalled before anything was started: nothing to stop
        note = self.intake.trainer_log.open(plan.run_dir / TrainerLog.NAME)
        if note is not None:
            await emit(send, [(self.now(), note)])
        try:
            self.tree = await spawn(plan.argv, environment(self.adapter), cwd=str(plan.cwd),
                                    then=report_command(plan.run_dir))
        except OSError as exc:
            # Checked before, but the file system can change in between (or exec fails).
            self.spawn_error = f"could not start the trainer: {exc.strerror or exc}"
            log.error("spawn_failed", error=str(exc), argv=redact_argv(plan.argv))
            return None
        self.silence.touch()  # silence counts from the spawn, not from our own set-up
        started = started_event(plan, self.tree.pid, self._wall0)
        await emit(send, [(self.now(), started)])
        self.notifier.ready(f"training with {plan.trainer}: step 0/{self.gate.final_step}")
        log.info("started", trainer=plan.trainer, argv=list(started.argv), pid=self.tree.pid,
                 steps=plan.steps, run_dir=str(plan.run_dir), timeout_s=plan.timeout,
                 no_output_timeout_s=plan.no_output_timeout, grace_s=plan.grace,
                 startup_timeout_s=plan.startup_timeout,
                 no_progress_timeout_s=plan.no_progress_timeout)
        process = self.tree.process
        assert process.stdout is not None and process.stderr is not None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.intake.read, process.stdout, send.clone(), 0)
            tg.start_soon(self.intake.read, process.stderr, send.clone(), 1)
            tg.start_soon(total_timeout, plan.timeout, lambda: self.request_stop("timeout"))
            tg.start_soon(self.silence.run, self._on_silence,
                          lambda: self.request_stop("finish_timeout"))
            if self.progress_watch is not None:
                tg.start_soon(self.progress_watch.run, lambda: self.request_stop("no_progress"))
            tg.start_soon(self._watch_quit, send.clone())
            tg.start_soon(self._control, send.clone())
            tg.start_soon(self._scan_tree)
            tg.start_soon(self.notifier.keep_alive)
            if self.follower is not None:
                tg.start_soon(self.intake.follow_tensorboard, self.follower, plan.trainer,
                              send.clone())
            returncode = await self._trainer_exit(send)
            self.exited = True
            log.info("trainer_exited", returncode=returncode, step=self.gate.last)
            if self.stop_requested.is_set():
                await self.stop_done.wait()
            elif await self._leftovers():
                # The trainer ended but left processes behind: they must not outlive the run.
                log.warning("leftover_processes", pids=self.tree.survivors())
                with anyio.CancelScope(shield=True):
                    await self._escalate("cleanup", send)
            with anyio.move_on_after(READER_DRAIN_SECONDS):
                await self.intake.readers_done.wait()
            tg.cancel_scope.cancel()  # the TensorBoard follower makes its final sweep
        if self.follower is not None and not self.follower.files:
            await emit(send, [(self.now(), Note(
                message=f"no TensorBoard event files appeared under {self.follower.root}; "
                        "the report uses the console series only"))])
        return returncode

    async def _trainer_exit(self, send: ObjectSendStream[Batch]) -> int | None:
        """The trainer's exit status from its guard; None when the guard would not tell
        it (stopped, frozen: see ``ProcessTree.wait_exit``), noted in the report."""
        assert self.tree is not None
        returncode = await self.tree.wait_exit()
        batch: list[tuple[float, Event]] = [
            (self.now(), Note(message=note)) for note in self.tree.guard_notes]
        if returncode is not None:
            batch.append((self.now(), Exited(returncode=returncode)))
        await emit(send, batch)
        return returncode

    async def _leftovers(self) -> list[int]:
        """Processes of the tree still running after the trainer itself exited."""
        assert self.tree is not None
        self.tree.remember(await anyio.to_thread.run_sync(self.tree.discover))
        return self.tree.survivors()

    def _facts(self, returncode: int | None) -> RunFacts:
        """What the outcome rules (outcome.py) need to know of this run."""
        plan, gate, tree = self.plan, self.gate, self.tree
        nothing_read = ""
        if gate.last == gate.offset:
            nothing_read = self.intake.unread.explain(parse_hint=self.adapter.accepts_parse_table)
        return RunFacts(
            returncode=returncode, stop_reason=self.stop_reason, started=tree is not None,
            guard_fault=tree.guard_fault if tree is not None else None,
            interrupt_signal=self.stopper.interrupt_signal, spawn_error=self.spawn_error,
            internal_error=self.internal_error, crash_stopped=self.crash_stopped,
            last_step=gate.last, offset=gate.offset, final_step=gate.final_step,
            steps=plan.steps, jumped=gate.jumped, finished_marker=self.intake.finished_marker,
            nonfinite=self.divergence.nonfinite, silence_reason=self._silence_reason,
            nothing_read=nothing_read, timeout=plan.timeout,
            no_output_timeout=plan.no_output_timeout, finish_timeout=plan.finish_timeout,
            no_progress_timeout=plan.no_progress_timeout)
