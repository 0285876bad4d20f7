"""One supervised run: spawn, read, gate, watch, stop, decide the outcome, report.

Everything happens in one anyio task group: two readers drain the pipes, the watchdogs
hold deadlines, a controller waits for a stop request and climbs the escalation ladder,
and a sink task writes what the readers parsed. The first stop reason wins and decides
the outcome; the report is written whatever happens.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from itertools import compress, pairwise
from operator import ne
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from anyio.abc import ByteReceiveStream, ObjectReceiveStream, ObjectSendStream

from lorasup.supervisor import logs, redact, signals
from lorasup.supervisor.artifacts import find_artifacts
from lorasup.supervisor.events import (
    Artifacts,
    Checkpoint,
    Event,
    Exited,
    Finished,
    Note,
    Outcome,
    Problem,
    Resumed,
    Scalar,
    SignalSent,
    Started,
    Step,
)
from lorasup.supervisor.fastbars import FastBars, Frames, StepBlock, floats
from lorasup.supervisor.gate import StepGate
from lorasup.supervisor.liveness import boot_id, process_start_time
from lorasup.supervisor.notify import Notifier
from lorasup.supervisor.plot import PlotChild
from lorasup.supervisor.process import (
    ProcessTree,
    become_subreaper,
    spawn,
    wait_gone,
)
from lorasup.supervisor.redact import redact_argv, redact_text
from lorasup.supervisor.safefs import open_append, write_all_fd
from lorasup.supervisor.signals import PREEMPT_SIGNAL, STOP_SIGNALS
from lorasup.supervisor.sink import Batch, ReportSink
from lorasup.supervisor.stacks import evidence, take_stacks
from lorasup.supervisor.streams import LineSplitter
from lorasup.supervisor.unread import Unread
from lorasup.supervisor.watchdogs import (
    DivergenceWatch,
    ProgressWatchdog,
    SilenceWatchdog,
    total_timeout,
)
from lorasup.trainers import scalar_tags
from lorasup.trainers.base import Adapter

if TYPE_CHECKING:
    from lorasup.supervisor.tensorboard import EventFileFollower

log = structlog.get_logger("lorasup")

#: outcome → exit code (interrupted depends on the signal: 130 SIGINT, 143 SIGTERM)
EXIT_CODES = {
    "completed": 0,
    "trainer_failed": 1,
    "usage": 2,
    "timeout": 3,
    "stalled": 4,
    "diverged": 5,
    # SIGUSR1, the scheduler's "time is nearly up": saved and stopped, requeue it (issue 19)
    "preempted": 6,
    "internal_error": 70,
}
READ_SIZE = 64 * 1024
#: batches (one per read) queued for the sink; a slower sink then slows the readers down
#: instead of growing memory
SINK_BUFFER_BATCHES = 16
TREE_SCAN_SECONDS = 2.0
#: after the leader exited, how long readers may wait for EOF from leftover holders
READER_DRAIN_SECONDS = 2.0
#: how often the trainer's TensorBoard event files are read while it runs
TENSORBOARD_POLL_SECONDS = 1.0
#: problem lines logged before the log says "more in the report" (a crash loop can print
#: thousands)
PROBLEMS_LOGGED = 20
#: a progress log entry at most this often (and once at the last step)
PROGRESS_LOG_SECONDS = 30.0
#: systemd's plumbing meant for lorasup, never for the trainer
SERVICE_ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                       "LISTEN_PID", "LISTEN_FDNAMES")
#: parser errors written to the log before only the count goes on
PARSER_ERRORS_LOGGED = 5
#: stop reasons that mean "hung": the tree's stacks are taken before it is stopped
STACKS_BEFORE_STOP = ("stalled", "no_progress")
#: a SIGTERM or SIGHUP this soon after the first stop signal is the same request (a
#: scheduler and a wrapper script both forwarding it), not a reason to skip the grace
REPEATED_SIGNAL_SECONDS = 2.0
#: stop signals a scheduler or service manager may repeat (a second SIGINT is a person's)
REPEATABLE_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _supersedes(new: Step, old: Step) -> bool:
    """Whether ``new`` (same step, later) carries every value ``old`` had."""
    return new.step == old.step and (
        (old.loss is None or new.loss is not None)
        and (old.avg_loss is None or new.avg_loss is not None)
        and (old.lr is None or new.lr is not None)
        and (old.epoch is None or new.epoch is not None))


def _frame_head(line: str, prefix: str) -> str | None:
    """A bar frame's text up to its counter (``steps:  50%|█████     | 6/12``) when the line
    is nothing but that frame; None for anything else."""
    if not line.startswith(prefix) or not line.rstrip().endswith("]"):
        return None
    end = line.find(" [")
    return line[:end] if end > 0 else None


def _drop_redrawn(lines: list[str], prefix: str) -> list[str]:
    """Lines without the bar frames that the very next line redraws at the same step.

    tqdm draws a step twice (the update, then the postfix); when both frames come in one
    read, the first tells nothing the second does not, and parsing it costs the most.
    """
    kept: list[str] = []
    heads = [_frame_head(line, prefix) for line in lines]
    last = len(lines) - 1
    for i, line in enumerate(lines):
        if i < last and heads[i] is not None and heads[i] == heads[i + 1]:
            continue
        kept.append(line)
    return kept


def new_run_id(trainer: str) -> str:
    """Sortable by time; 32 random bits (and an O_EXCL claim) keep two starts apart."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{trainer}-{secrets.token_hex(4)}"



@dataclass(frozen=True)
class RunPlan:
    """Everything resolved before spawning: validated, nothing started yet."""

    run_id: str
    run_dir: Path
    trainer: str
    argv: list[str]
    steps: int
    timeout: float
    no_output_timeout: float
    grace: float
    finish_timeout: float
    nan_patience: int
    cwd: Path
    output_dirs: tuple[Path, ...] = ()
    progress_tty: bool = False
    #: a folder where the trainer writes TensorBoard event files, followed live
    tensorboard_dir: Path | None = None
    #: the silence limit before the first step; None = no_output_timeout
    startup_timeout: float | None = None
    #: time without a new step (from the first step) that counts as stalled; None = off
    no_progress_timeout: float | None = None


@dataclass(frozen=True)
class RunResult:
    outcome: str
    exit_code: int
    run_dir: Path
    report: dict[str, Any] | None


class Supervisor:
    """Runs one plan to its outcome. Create, then ``await run()`` once."""

    def __init__(self, plan: RunPlan, adapter: Adapter, plot: PlotChild | None = None) -> None:
        self.plan = plan
        self.adapter = adapter
        # A token given by name (argv flag, environment) is masked wherever it shows later.
        redact.remember(plan.argv, os.environ)
        self.tree: ProcessTree | None = None
        self.stop_reason: str | None = None
        self.stop_requested = anyio.Event()
        self.stop_done = anyio.Event()
        self.exited = False
        self.interrupt_signal: signal.Signals | None = None
        self._signalled_at = 0.0
        self.finished_marker = False
        self._force = False
        self._grace_scope: anyio.CancelScope | None = None
        self._t0 = anyio.current_time()
        self._wall0 = time.time()
        self.gate = StepGate(plan.steps, stop_at_limit=not adapter.stops_by_itself,
                             on_stop=self.request_stop, on_limit=self._on_limit)
        self.divergence = DivergenceWatch(plan.nan_patience)
        #: what the trainer printed while no step was read (the reason of a 0-step run)
        self.unread = Unread()
        self.silence = SilenceWatchdog(plan.no_output_timeout, plan.startup_timeout)
        self.progress_watch = (ProgressWatchdog(plan.no_progress_timeout)
                               if plan.no_progress_timeout is not None else None)
        #: what the silence watchdog saw when it fired (the outcome's reason)
        self._silence_reason: str | None = None
        #: one stacks capture at a time (SIGQUIT and a stall may meet)
        self._stacks_lock = anyio.Lock()
        self._trainer_log: int | None = None
        #: lorasup's own faults, counted: file writes that failed, parser exceptions
        self.parser_errors = 0
        self.internal_error: str | None = None
        self.sink_error: str | None = None
        #: lorasup's own failure made it stop a trainer that was still running
        self.crash_stopped = False
        self.sink = ReportSink(plan.run_dir, self._model_files, plot=plot)
        self._readers_open = 2
        self._readers_done = anyio.Event()
        self._next_progress = 0.0
        self._final_progress_logged = False
        self.notifier = Notifier()
        self._total_checked = False
        self._problems_logged = 0
        #: after our own SIGINT, a KeyboardInterrupt traceback is the stop, not a problem
        self._sigint_sent = False
        self.spawn_error: str | None = None
        #: bar frames starting with this are redrawn whole: only the last of a run counts
        self._redraw_prefix: str | None = getattr(adapter, "redraw_prefix", None)
        #: substrings the adapter needs to see in a line; () = every line matters
        self._needles: tuple[str, ...] = tuple(getattr(adapter, "needles", ()))
        #: the adapter's bytes pattern for whole bar-frame lines: reads scanned in one pass
        fast_bar = getattr(adapter, "fast_bar", None)
        self._fast = FastBars(fast_bar) if fast_bar is not None else None
        self._last_tty = 0.0
        self._tty = plan.progress_tty
        self._checkpoints: list[str] = []
        self.follower: EventFileFollower | None = None
        if plan.tensorboard_dir is not None:
            # Imported only here: most runs read no event files, and every start pays
            # for what it imports before the trainer is spawned.
            from lorasup.supervisor.tensorboard import EventFileFollower

            root = plan.tensorboard_dir
            root = root if root.is_absolute() else plan.cwd / root
            self.follower = EventFileFollower(root, not_before=self._wall0 - 1)

    # -- time -------------------------------------------------------------------------

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

    def _send_signal(self, sig: signal.Signals, reason: str, batch: list) -> None:
        assert self.tree is not None
        t = self.now()  # before: whatever the signal makes the trainer print comes later
        pids = self.tree.signal(sig)
        event = SignalSent(signal=sig.name, reason=reason, pids=tuple(pids))
        self._sigint_sent = self._sigint_sent or sig == signal.SIGINT
        batch.append((t, event))
        log.warning("signal_sent", signal=sig.name, reason=reason, pids=pids,
                    t=round(self.now(), 3))

    async def _escalate(self, reason: str, send: ObjectSendStream[Batch]) -> None:
        """Graceful signal(s), each given its share of the grace, then SIGKILL."""
        assert self.tree is not None
        ladder = [] if self._force else list(self.adapter.stop_signals)
        share = self.plan.grace / len(ladder) if ladder else 0.0
        for sig in ladder:
            batch: list = []
            self._send_signal(sig, reason, batch)
            # Catch descendants that appeared since the last scan, and signal them too.
            late = self.tree.remember(await anyio.to_thread.run_sync(self.tree.discover))
            if late:
                self.tree.signal(sig, only=set(late))
            await self._emit(send, batch)
            with anyio.CancelScope() as scope:
                self._grace_scope = scope
                if await wait_gone(self.tree, share):
                    return
            if self._force:
                break
        batch = []
        self._send_signal(signal.SIGKILL, reason, batch)
        await self._emit(send, batch)
        if not await wait_gone(self.tree, 10.0):
            log.error("processes_survived_sigkill", pids=self.tree.survivors())

    async def _control(self, send: ObjectSendStream[Batch]) -> None:
        async with send:
            await self.stop_requested.wait()
            with anyio.CancelScope(shield=True):
                if self.stop_reason in STACKS_BEFORE_STOP:
                    # Where it hung, before the evidence is killed (bounded, see stacks.py).
                    await self._dump_stacks(self.stop_reason or "stalled", send, stalled=True)
                await self._escalate(self.stop_reason or "stop", send)
            self.stop_done.set()

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
        await self._emit(send, batch)

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
            self._on_signal(signal.Signals(signum))

    def _on_signal(self, sig: signal.Signals) -> None:
        now = time.monotonic()
        if self.interrupt_signal is None:
            self.interrupt_signal = sig
            self._signalled_at = now
            log.warning("lorasup_signalled", signal=sig.name)
            self.request_stop("preempted" if sig == PREEMPT_SIGNAL else "interrupted")
        elif sig == PREEMPT_SIGNAL or (  # a repeated time warning asks for nothing new
                sig in REPEATABLE_SIGNALS and self.interrupt_signal in REPEATABLE_SIGNALS
                and now - self._signalled_at < REPEATED_SIGNAL_SECONDS):
            log.warning("lorasup_signalled_again", signal=sig.name,
                        action="the same stop request: the grace goes on")
        else:
            log.warning("lorasup_signalled_again", signal=sig.name,
                        action="skipping the grace period")
            self._force = True
            if self._grace_scope is not None:
                self._grace_scope.cancel()

    async def _scan_tree(self) -> None:
        assert self.tree is not None
        while True:
            # /proc is read in a worker thread; the tree is only changed on this thread.
            self.tree.remember(await anyio.to_thread.run_sync(self.tree.discover))
            await anyio.sleep(TREE_SCAN_SECONDS)

    # -- reading ----------------------------------------------------------------------

    async def _read(self, stream: ByteReceiveStream, send: ObjectSendStream[Batch]) -> None:
        splitter = LineSplitter()
        sample = self.unread.stream()
        async with send:
            try:
                while True:
                    try:
                        chunk = await stream.receive(READ_SIZE)
                    except (anyio.EndOfStream, anyio.ClosedResourceError,
                            anyio.BrokenResourceError):
                        break
                    self.silence.touch()
                    if self.gate.last == self.gate.offset:
                        sample.feed(chunk)
                    if self._fast is not None:
                        lines = splitter.feed_fast(chunk, self._needles, self._fast)
                    else:
                        lines = splitter.feed(chunk, self._needles)
                    batch = self._handle_safely(lines)
                    self._log_raw(chunk, batch)
                    if batch:
                        await self._emit(send, batch)
                batch = self._handle_safely(splitter.close())
                if splitter.dropped_chars:
                    batch.append((self.now(), Note(
                        message=f"{splitter.truncated_lines} over-long line(s) cut; "
                                f"{splitter.dropped_chars} characters dropped")))
                if batch:
                    await self._emit(send, batch)
            finally:
                self._readers_open -= 1
                if self._readers_open == 0:
                    self._readers_done.set()

    def _log_raw(self, chunk: bytes, batch: list[tuple[float, Event]]) -> None:
        """Append to trainer.log; a failing disk is noted once and the run goes on."""
        if self._trainer_log is None:
            return
        try:
            write_all_fd(self._trainer_log, chunk)
        except OSError as exc:
            note = self.file_fault("trainer.log", exc)
            if note is not None:
                batch.append((self.now(), note))

    def file_fault(self, name: str, exc: OSError) -> Note | None:
        """Count a failed write of lorasup's own (in the sink's tally, logged once); the
        first one per file also becomes a note in events.jsonl."""
        first = name not in self.sink.faults.counts
        self.sink.faults.record(name, exc)
        if not first:
            return None
        reason = exc.strerror or str(exc)
        return Note(message=f"could not write {name}: {reason}; the run goes on")

    def _parse(self, line: str) -> list[Event]:
        """The adapter's events for a line; an exception in it is counted, never fatal."""
        try:
            return list(self.adapter.parse(line))
        except Exception as exc:  # trainer text must never end the run
            self.parser_errors += 1
            text = redact_text(line[:300])
            if self.parser_errors <= PARSER_ERRORS_LOGGED:
                log.warning("parser_error", error=f"{type(exc).__name__}: {exc}"[:300],
                            line=text)
            return [Note(message=f"parser_error: {type(exc).__name__} on line {text!r}")]

    def _handle_safely(self, lines: list[Any]) -> list[tuple[float, Event]]:
        """``_handle``, whose failure on odd input loses those lines, never the run."""
        try:
            return self._handle(lines)
        except Exception as exc:  # trainer text must never end the run
            self.parser_errors += 1
            if self.parser_errors <= PARSER_ERRORS_LOGGED:
                log.warning("parser_error", error=f"{type(exc).__name__}: {exc}"[:300],
                            lines=len(lines))
            return [(self.now(), Note(
                message=f"parser_error: {type(exc).__name__} while reading {len(lines)} "
                        "line(s); they were skipped"))]

    def _handle(self, items: list[Any]) -> list[tuple[float, Event]]:
        """Parse lines (and fast-path frame runs) into events; the step gate and divergence
        act right here."""
        batch: list[tuple[float, Event]] = []
        if not items:
            return batch
        t = self.now()
        last_before = self.gate.last
        if self._redraw_prefix is not None and len(items) > 1 and any(
                type(item) is Frames for item in items):
            items = self._drop_redrawn_frames(items)
        lines: list[str] = []
        for item in items:
            if type(item) is str:
                lines.append(item)
                continue
            if lines:
                self._handle_lines(lines, t, batch)
                lines = []
            self._handle_frames(item, t, batch)
        if lines:
            self._handle_lines(lines, t, batch)
        if self.gate.last > last_before and self.gate.last > self.gate.offset:
            self._stepped()  # a new step: the start-up allowance is over, progress made
        return batch

    def _frame_step(self, line: str) -> bytes | None:
        """The step counter of a bar-frame line (as bytes, like a Frames column), or None."""
        head = _frame_head(line, self._redraw_prefix or "")
        if head is None:
            return None
        return head.rsplit(" ", 1)[-1].split("/", 1)[0].encode()

    def _drop_redrawn_frames(self, items: list[Any]) -> list[Any]:
        """What ``_drop_redrawn`` does for lines, across a fast-path run's edges: a frame
        that the very next frame redraws at the same step is left out."""
        out: list[Any] = []
        for i, item in enumerate(items):
            following = items[i + 1] if i + 1 < len(items) else None
            if type(item) is str and type(following) is Frames:
                step = self._frame_step(item)
                if step is not None and step == following.columns["step"][0]:
                    continue
            elif type(item) is Frames and type(following) is str:
                step = self._frame_step(following)
                if step is not None and step == item.columns["step"][-1]:
                    if len(item) == 1:
                        continue
                    item = Frames({name: col[:-1] for name, col in item.columns.items()})
            out.append(item)
        return out

    def _handle_lines(self, lines: list[str], t: float,
                      batch: list[tuple[float, Event]]) -> None:
        parse = self._parse
        if self._redraw_prefix is not None and len(lines) > 1:
            lines = _drop_redrawn(lines, self._redraw_prefix)
        for line in lines:
            if not line:
                continue
            for event in parse(line):
                kind = type(event)
                if kind is Step:
                    self._admit(event, t, batch)
                    continue
                if kind is Finished:
                    self.finished_marker = True
                elif kind is Resumed:
                    self.gate.resume(event.step)
                elif kind is Problem:
                    # Trainer text goes into the report: mask token-shaped strings first.
                    event = Problem(problem=event.problem, line=redact_text(event.line))
                    self._log_problem(event)
                elif kind is Checkpoint:
                    self._checkpoints.append(event.path)
                    log.info("checkpoint", path=event.path)
                batch.append((t, event))

    def _admit(self, event: Step, t: float, batch: list[tuple[float, Event]]) -> None:
        """One step event through the gate, the divergence watch and the progress log."""
        admitted = self.gate.admit(event)
        if admitted is None:
            return
        if (batch and type(admitted) is Step and type(batch[-1][1]) is Step
                and _supersedes(admitted, batch[-1][1])):  # type: ignore[arg-type]
            # Two frames of one step in one read: the later one has it all.
            batch[-1] = (t, admitted)
        else:
            batch.append((t, admitted))
        if type(admitted) is Step:
            if not self._total_checked and admitted.total is not None:
                self._check_total(admitted)
            loss, avg = admitted.loss, admitted.avg_loss
            # (x - x) is 0.0 for a finite x and NaN for NaN/inf: one cheap test.
            if ((loss is not None and loss - loss != 0.0)
                    or (avg is not None and avg - avg != 0.0)) and (
                    self.divergence.observe(admitted.step, loss, avg)):
                self.request_stop("diverged")
            if t >= self._next_progress or self._tty or (
                    admitted.step == self.gate.final_step):
                self._progress(admitted, t)

    def _handle_frames(self, frames: Frames, t: float,
                       batch: list[tuple[float, Event]]) -> None:
        """A run of bar frames from the fast path: admitted in bulk when they are simply
        the next steps (the common case), else frame by frame like parsed lines."""
        columns = frames.columns
        steps = list(map(int, columns["step"]))
        n = len(steps)
        if n > 1 and steps != list(range(steps[0], steps[0] + n)):
            # a step drawn twice in a row (kohya): only the last frame of it counts
            keep = [*compress(range(n - 1), map(ne, steps, steps[1:])), n - 1]
            if len(keep) < n:
                columns = {name: [col[i] for i in keep] for name, col in columns.items()}
                steps = [steps[i] for i in keep]
                n = len(steps)
        values = {name: floats(columns.get(name)) for name in ("loss", "avg_loss", "lr")}
        gate = self.gate
        increasing = n == 1 or steps == list(range(steps[0], steps[0] + n)) or all(
            a < b for a, b in pairwise(steps))
        if not (increasing and steps[0] > gate.last and steps[0] > gate.offset
                and steps[-1] <= gate.final_step):
            totals = columns["total"]
            for i in range(n):
                self._admit(Step(step=steps[i], total=int(totals[i]),
                                 **{k: v[i] if v else None for k, v in values.items()}),
                            t, batch)
            return
        last = Step(step=steps[-1], total=int(columns["total"][-1]),
                    **{k: v[-1] if v else None for k, v in values.items()})
        if gate.admit(last) is None:  # cannot happen for a new step; be safe
            return
        batch.append((t, StepBlock(round(t, 6), steps, columns, values)))  # type: ignore
        if not self._total_checked:
            self._check_total(last)
        if t >= self._next_progress or self._tty or last.step == gate.final_step:
            self._progress(last, t)

    def _log_problem(self, problem: Problem) -> None:
        """The first few problems go to the log; all of them go to events.jsonl."""
        if self._sigint_sent and self.adapter.expected_exit(problem.problem,
                                                            problem.line) is not False:
            # our SIGINT's traceback (its exception line says which; others stay warnings)
            log.info("trainer_stopping", problem=problem.problem, line=problem.line[:200])
            return
        self._problems_logged += 1
        if self._problems_logged <= PROBLEMS_LOGGED:
            log.warning("trainer_problem", problem=problem.problem, line=problem.line[:200])
        elif self._problems_logged == PROBLEMS_LOGGED + 1:
            log.warning("trainer_problems_continue",
                        message="further problems are in events.jsonl and the report only")

    async def _follow_tensorboard(self, send: ObjectSendStream[Batch]) -> None:
        """Full-precision scalars from the trainer's event files: the follower's own loop
        (tensorboard/follow.py) at a modest interval until the run's task group ends, then
        its final sweep (shielded), so records written just before the exit count."""
        assert self.follower is not None
        async with send:
            # which tags are per-epoch means: the adapters say (imported off the loop)
            kinds = await anyio.to_thread.run_sync(scalar_tags, self.plan.trainer)
            await self.follower.run(functools.partial(self._emit_scalars, send, kinds),
                                    interval=TENSORBOARD_POLL_SECONDS,
                                    on_error=self._tensorboard_failed)

    def _tensorboard_failed(self, exc: Exception) -> None:
        """Odd event files must not end the run: counted with the parser's errors."""
        self.parser_errors += 1
        if self.parser_errors <= PARSER_ERRORS_LOGGED:
            log.warning("tensorboard.read_failed", error=f"{type(exc).__name__}: {exc}")

    async def _emit_scalars(self, send: ObjectSendStream[Batch], kinds: Mapping[str, str],
                            scalars: list[Scalar]) -> None:
        batch = self._handle_scalars(scalars, kinds)
        if batch:
            await self._emit(send, batch)

    def _handle_scalars(self, scalars: list[Scalar],
                        kinds: Mapping[str, str]) -> list[tuple[float, Event]]:
        """Scalars within the requested steps; a non-finite loss among them is divergence.
        A per-epoch mean (its step is the epoch number) is kept whatever its step."""
        t = self.now()
        final = self.gate.final_step
        batch: list[tuple[float, Event]] = []
        for scalar in scalars:
            per_epoch = kinds.get(scalar.tag) == "epoch_loss"
            if scalar.step > final and not per_epoch:
                continue
            key = ("epoch", scalar.step) if per_epoch else scalar.step
            if "loss" in scalar.tag and self.divergence.observe(key, scalar.value):
                self.request_stop("diverged")
            batch.append((t, scalar))
        return batch

    def _check_total(self, step: Step) -> None:
        """Say so once when the trainer's own step total disagrees with the limit."""
        self._total_checked = True
        if self.gate.plans_more(step):
            log.warning("trainer_plans_more_steps", trainer_total=step.total,
                        limit=self.gate.final_step, action="stopping it at the limit")

    def _progress(self, step: Step, t: float) -> None:
        """Progress in the logs at a sane rate, and a live line on a terminal."""
        final = self.gate.final_step
        last = step.step == final and not self._final_progress_logged
        if t >= self._next_progress or last:
            self._next_progress = t + PROGRESS_LOG_SECONDS
            self._final_progress_logged = self._final_progress_logged or last
            values = {k: v for k, v in (("loss", step.loss), ("avg_loss", step.avg_loss),
                                        ("lr", step.lr), ("epoch", step.epoch)) if v is not None}
            log.info("progress", step=step.step, of=final, t=round(t, 1), **values)
            self.notifier.status(f"step {step.step}/{final}")
        if self._tty and (t - self._last_tty >= 0.1 or step.step == final):
            self._last_tty = t
            done = step.step - self.gate.offset
            rate = done / t if t > 0 else 0.0
            eta = (self.plan.steps - done) / rate if rate > 0 else float("inf")
            loss = step.loss if step.loss is not None else step.avg_loss
            loss_text = f"{loss:.4g}" if loss is not None else "-"
            self._tty_write(f"\r\x1b[Kstep {step.step}/{final}  loss {loss_text}  "
                            f"{rate:.2f} it/s  ETA {eta:.0f}s")

    # -- the run ----------------------------------------------------------------------

    def _artifacts(self) -> Artifacts:
        """Checkpoints and model files this run left (absolute): announced ones, and new
        ones in the output folders. Never raises: a failure is recorded in the event."""
        try:
            checkpoints, models = find_artifacts(self._checkpoints, self.plan.output_dirs,
                                                 self.plan.cwd, self._wall0)
        except Exception as exc:  # a path the OS refuses (ENAMETOOLONG) is no reason to fail
            log.warning("model_files_failed", error=repr(exc))
            return Artifacts(error=f"model files could not be listed: {exc!r}"[:500])
        return Artifacts(checkpoints=tuple(checkpoints), model_files=tuple(models))

    def _model_files(self) -> list[str]:
        """The sink's fallback when no ``artifacts`` event reached it."""
        return list(self._artifacts().model_files)

    def _environment(self) -> dict[str, str]:
        """lorasup's environment without its service plumbing, unbuffered, plus the
        adapter's additions."""
        env = {k: v for k, v in os.environ.items() if k not in SERVICE_ENVIRONMENT}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.adapter.environment())
        return env

    async def _emit(self, send: ObjectSendStream[Batch], batch: Batch) -> None:
        """Hand a batch to the sink; a sink that died (a bug of ours) loses the batch only."""
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await send.send(batch)

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
                    self._on_signal(held)
                async with anyio.create_task_group() as watchers:
                    watchers.start_soon(self._watch_signals, received)
                    async with anyio.create_task_group() as outer:
                        outer.start_soon(self._run_sink, receive)
                        async with send:
                            try:
                                returncode = await self._supervise(send)
                            except Exception as exc:  # see _after_crash
                                returncode = await self._after_crash(exc, send)
                            outcome, code, reason = self._decide(returncode)
                            # Recorded, so that a rebuilt report names the same files.
                            left = await anyio.to_thread.run_sync(self._artifacts)
                            await self._emit(send, [(self.now(), left), (self.now(), Outcome(
                                outcome=outcome, exit_code=code, reason=reason,
                                trainer_returncode=returncode))])
                    watchers.cancel_scope.cancel()
                # Closing the receiver restores the default actions: hold them again.
                signals.hold()
        finally:
            # The safety net runs first on every path: no process of the tree outlives us.
            with anyio.CancelScope(shield=True):
                await self._release_tree()
            if self._trainer_log is not None:
                with contextlib.suppress(OSError):
                    os.close(self._trainer_log)
                self._trainer_log = None
            self.notifier.close()
            self._tty_write("\n")
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
        await self._emit(send, [(self.now(),
                                 Note(message=f"lorasup failed: {self.internal_error}"))])
        if self.tree is None:
            return None
        with anyio.CancelScope(shield=True):
            if not self.exited:
                self.crash_stopped = True
                async with anyio.create_task_group() as tg:
                    process = self.tree.process
                    for stream in (process.stdout, process.stderr):
                        if stream is not None:
                            tg.start_soon(self._drain, stream)
                    await self._escalate("internal_error", send)
                    tg.cancel_scope.cancel()
        return self.tree.returncode

    async def _drain(self, stream: ByteReceiveStream) -> None:
        """Keep a pipe empty (into trainer.log) so a stopping trainer never blocks on it."""
        with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError,
                                 anyio.BrokenResourceError):
            while True:
                self._log_raw(await stream.receive(READ_SIZE), [])

    def _tty_write(self, text: str) -> None:
        """The live progress line; a terminal that went away only ends the live line."""
        if not self._tty:
            return
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except (OSError, ValueError):
            self._tty = False

    def _started_event(self) -> Started:
        assert self.tree is not None
        plan = self.plan
        return Started(run_id=plan.run_id, trainer=plan.trainer,
                       argv=tuple(redact_argv(plan.argv)), pid=self.tree.pid,
                       steps_requested=plan.steps, wall_time=self._wall0,
                       supervisor_pid=os.getpid(), supervisor_start=process_start_time(),
                       boot_id=boot_id())

    async def _supervise(self, send: ObjectSendStream[Batch]) -> int | None:
        plan = self.plan
        become_subreaper()
        if self.stop_reason in ("interrupted", "preempted"):
            return None  # signalled before anything was started: nothing to stop
        try:
            self._trainer_log = open_append(plan.run_dir / "trainer.log")  # 0600, no symlink
        except OSError as exc:
            note = self.file_fault("trainer.log", exc)
            if note is not None:
                await self._emit(send, [(self.now(), note)])
        try:
            self.tree = await spawn(plan.argv, self._environment(), cwd=str(plan.cwd),
                                    then=self._report_command())
        except OSError as exc:
            # Checked before, but the file system can change in between (or exec fails).
            self.spawn_error = f"could not start the trainer: {exc.strerror or exc}"
            log.error("spawn_failed", error=str(exc), argv=redact_argv(plan.argv))
            return None
        self.silence.touch()  # silence counts from the spawn, not from our own set-up
        started = self._started_event()
        await self._emit(send, [(self.now(), started)])
        self.notifier.ready(f"training with {plan.trainer}: step 0/{self.gate.final_step}")
        log.info("started", trainer=plan.trainer, argv=list(started.argv), pid=self.tree.pid,
                 steps=plan.steps, run_dir=str(plan.run_dir), timeout_s=plan.timeout,
                 no_output_timeout_s=plan.no_output_timeout, grace_s=plan.grace,
                 startup_timeout_s=plan.startup_timeout,
                 no_progress_timeout_s=plan.no_progress_timeout)
        process = self.tree.process
        assert process.stdout is not None and process.stderr is not None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._read, process.stdout, send.clone())
            tg.start_soon(self._read, process.stderr, send.clone())
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
                tg.start_soon(self._follow_tensorboard, send.clone())
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
                await self._readers_done.wait()
            tg.cancel_scope.cancel()  # the TensorBoard follower makes its final sweep
        if self.follower is not None and not self.follower.files:
            await self._emit(send, [(self.now(), Note(
                message=f"no TensorBoard event files appeared under {self.follower.root}; "
                        "the report uses the console series only"))])
        return returncode

    def _report_command(self) -> list[str]:
        """What the guard runs after it killed the tree because lorasup died: the report
        of this run (outcome ``lost``), so that it exists without anyone asking."""
        return [sys.executable, "-m", "lorasup", "report", str(self.plan.run_dir.absolute())]

    async def _trainer_exit(self, send: ObjectSendStream[Batch]) -> int | None:
        """The trainer's exit status from its guard; None when the guard would not tell
        it (stopped, frozen: see ``ProcessTree.wait_exit``), noted in the report."""
        assert self.tree is not None
        returncode = await self.tree.wait_exit()
        batch: list[tuple[float, Event]] = [
            (self.now(), Note(message=note)) for note in self.tree.guard_notes]
        if returncode is not None:
            batch.append((self.now(), Exited(returncode=returncode)))
        await self._emit(send, batch)
        return returncode

    async def _leftovers(self) -> list[int]:
        """Processes of the tree still running after the trainer itself exited."""
        assert self.tree is not None
        self.tree.remember(await anyio.to_thread.run_sync(self.tree.discover))
        return self.tree.survivors()

    def _nothing_read(self) -> str:
        """``: no step read in 523 line(s) of output ...`` when no step was read, else ""."""
        if self.gate.last != self.gate.offset:
            return ""
        hint = bool(getattr(self.adapter, "accepts_parse_table", False))
        return ": " + self.unread.explain(parse_hint=hint)

    def _decide(self, returncode: int | None) -> tuple[str, int, str]:
        reason = self.stop_reason
        if self.crash_stopped or (self.internal_error and returncode is None):
            return "internal_error", EXIT_CODES["internal_error"], (
                f"lorasup failed ({self.internal_error}); the trainer was stopped")
        if returncode is None and reason == "interrupted" and self.tree is None:
            sig = self.interrupt_signal or signal.SIGINT
            return "interrupted", 128 + int(sig), f"lorasup received {sig.name} before the start"
        # -- issue 19: SIGUSR1 (time nearly up) is "preempted" unless the job got done --
        if reason == "preempted" and not (
                returncode == 0 and self.gate.last >= self.gate.final_step):
            return "preempted", EXIT_CODES["preempted"], (
                "lorasup received SIGUSR1 (the scheduler's time limit is near); the trainer "
                "was stopped with its final save: requeue to continue")
        # -- end issue 19 --
        guard_fault = self.tree.guard_fault if self.tree is not None else None
        if returncode is None and guard_fault is None:
            return "usage", EXIT_CODES["usage"], self.spawn_error or "trainer not started"
        if returncode is None and reason is None:
            # The trainer ended by itself, and how is unknown: never guessed as completed.
            return "internal_error", EXIT_CODES["internal_error"], (
                f"{guard_fault}; the trainer's exit status is unknown")
        done = self.gate.last >= self.gate.final_step or self.gate.jumped is not None
        if reason == "interrupted":
            sig = self.interrupt_signal or signal.SIGINT
            return "interrupted", 128 + int(sig), f"lorasup received {sig.name}"
        if reason == "no_progress":
            return "stalled", EXIT_CODES["stalled"], (
                f"no new step for {self.plan.no_progress_timeout:g}s "
                f"(last new step: {self.gate.last})")
        if reason in ("timeout", "stalled", "diverged"):
            return reason, EXIT_CODES[reason], {
                "timeout": f"total time limit of {self.plan.timeout:g}s passed"
                + self._nothing_read(),
                "stalled": self._silence_reason
                or f"no output for {self.plan.no_output_timeout:g}s",
                "diverged": f"non-finite loss at {self.divergence.nonfinite} step(s)",
            }[reason]
        if reason == "finish_timeout":
            if done and self.finished_marker:
                return "completed", 0, "all steps done and saved; stopped after finish timeout"
            return "timeout", EXIT_CODES["timeout"], (
                f"trainer did not finish within {self.plan.finish_timeout:g}s after the last step")
        if reason in ("step_limit", "overshoot"):
            if self.gate.jumped is not None:
                before, after = self.gate.jumped
                return "completed", 0, (
                    f"stopped at step {after}: the output jumped from {before} to {after}, "
                    f"past the limit of {self.gate.final_step}")
            if done:
                return "completed", 0, f"stopped at step {self.gate.final_step}"
            return "trainer_failed", 1, "trainer went past the step limit without reaching it"
        if returncode != 0:
            return "trainer_failed", 1, f"trainer exited with {returncode}"
        if not done:
            return "trainer_failed", 1, (
                f"trainer exited 0 after {self.gate.last - self.gate.offset} of "
                f"{self.plan.steps} steps" + self._nothing_read())
        return "completed", 0, "trainer finished all steps"
