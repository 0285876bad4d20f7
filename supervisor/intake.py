"""The trainer's bytes → events: read, split, parse, gate; TensorBoard scalars → events.

One :class:`Intake` per run. Each read of a pipe is appended raw to ``trainer.log``, cut
into lines (chunks holding none of the adapter's ``needles`` are skipped), whole bar
frames go through the fast path (:mod:`fastbars`) in one regex pass, other lines through
``adapter.parse`` (an exception there costs a note, never the run), and steps through the
:class:`StepGate`; divergence and the watchdogs' progress are told right here. What comes
out is one batch per read, handed to the sink by :func:`emit`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from itertools import compress, pairwise
from operator import ne
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from anyio.abc import ByteReceiveStream, ObjectSendStream

from lorasup.supervisor.console import Progress, TerminalEcho
from lorasup.supervisor.events import (
    Checkpoint,
    Event,
    Finished,
    Note,
    Problem,
    Resumed,
    Scalar,
    Step,
)
from lorasup.supervisor.fastbars import FastBars, Frames, StepBlock, floats
from lorasup.supervisor.gate import StepGate
from lorasup.supervisor.outcome import stop_expected
from lorasup.supervisor.redact import redact_text
from lorasup.supervisor.redraw import drop_redrawn, drop_redrawn_frames
from lorasup.supervisor.safefs import WriteFaults
from lorasup.supervisor.sink import Batch, emit
from lorasup.supervisor.streams import LineSplitter
from lorasup.supervisor.trainerlog import TrainerLog
from lorasup.supervisor.unread import Unread
from lorasup.supervisor.watchdogs import DivergenceWatch
from lorasup.trainers import scalar_tags
from lorasup.trainers.base import Adapter

if TYPE_CHECKING:

    from lorasup.supervisor.tensorboard import EventFileFollower

log = structlog.get_logger("lorasup")

READ_SIZE = 64 * 1024
#: parser errors written to the log before only the count goes on
PARSER_ERRORS_LOGGED = 5
#: problem lines logged before the log says "more in the report" (a crash loop can print
#: thousands)
PROBLEMS_LOGGED = 20
#: how often the trainer's TensorBoard event files are read while it runs
TENSORBOARD_POLL_SECONDS = 1.0

Timed = list[tuple[float, Event]]


def _supersedes(new: Step, old: Step) -> bool:
    """Whether ``new`` (same step, later) carries every value ``old`` had."""
    return new.step == old.step and (
        (old.loss is None or new.loss is not None)
        and (old.avg_loss is None or new.avg_loss is not None)
        and (old.lr is None or new.lr is not None)
        and (old.epoch is None or new.epoch is not None))


class Intake:
    """Reads the trainer's output into events; every fault in it is counted, never fatal."""

    def __init__(self, adapter: Adapter, gate: StepGate, divergence: DivergenceWatch,
                 progress: Progress, faults: WriteFaults, *, clock: Callable[[], float],
                 request_stop: Callable[[str], None], touched: Callable[[], None],
                 stepped: Callable[[], None], sigint_sent: Callable[[], bool],
                 echo: TerminalEcho | None = None) -> None:
        self.adapter = adapter
        self.gate = gate
        self.divergence = divergence
        self.progress = progress
        self.now = clock
        self.request_stop = request_stop
        #: output came (the silence watchdog's business)
        self._touched = touched
        #: a new step came (the start-up allowance is over, progress was made)
        self._stepped = stepped
        #: what the trainer printed while no step was read (the reason of a 0-step run)
        self.unread = Unread()
        #: bar frames starting with this are redrawn whole: only the last of a run counts
        self._redraw_prefix = adapter.redraw_prefix
        #: substrings the adapter needs to see in a line; () = every line matters
        self._needles = tuple(adapter.needles)
        #: the adapter's bytes pattern for whole bar-frame lines: reads scanned in one pass
        self._fast = FastBars(adapter.fast_bar) if adapter.fast_bar is not None else None
        self.finished_marker = False
        self.checkpoints: list[str] = []
        self.parser_errors = 0
        self._problems_logged = 0
        self._total_checked = False
        #: whether lorasup sent SIGINT: then a KeyboardInterrupt traceback is the stop
        self._sigint_sent = sigint_sent
        #: the raw bytes of both pipes, as they came
        self.trainer_log = TrainerLog(faults)
        #: the trainer's output shown live on lorasup's stderr (``lorasup start`` on a terminal)
        self.echo = echo
        #: both pipes read to their end (the trainer and whatever held them are gone)
        self.readers_done = anyio.Event()
        self._readers_open = 2

    # -- reading ----------------------------------------------------------------------

    async def read(self, stream: ByteReceiveStream, send: ObjectSendStream[Batch],
                   which: int = 0) -> None:
        """One pipe to its end (``which``: 0 stdout, 1 stderr): each read becomes one batch
        for the sink."""
        try:
            await self._read(stream, send, which)
        finally:
            self._readers_open -= 1
            if self._readers_open == 0:
                self.readers_done.set()

    async def _read(self, stream: ByteReceiveStream, send: ObjectSendStream[Batch],
                    which: int) -> None:
        echo = self.echo
        splitter = LineSplitter()
        sample = self.unread.stream()
        async with send:
            while True:
                try:
                    chunk = await stream.receive(READ_SIZE)
                except (anyio.EndOfStream, anyio.ClosedResourceError,
                        anyio.BrokenResourceError):
                    break
                self._touched()
                if echo is not None:
                    echo.feed(which, chunk)
                if self.gate.last == self.gate.offset:
                    sample.feed(chunk)
                if self._fast is not None:
                    lines = splitter.feed_fast(chunk, self._needles, self._fast)
                else:
                    lines = splitter.feed(chunk, self._needles)
                batch = self._handle_safely(lines)
                self._log_raw(chunk, batch)
                if batch:
                    await emit(send, batch)
            batch = self._handle_safely(splitter.close())
            if splitter.dropped_chars:
                batch.append((self.now(), Note(
                    message=f"{splitter.truncated_lines} over-long line(s) cut; "
                            f"{splitter.dropped_chars} characters dropped")))
            if batch:
                await emit(send, batch)

    async def drain(self, stream: ByteReceiveStream, which: int = 0) -> None:
        """Keep a pipe empty (into trainer.log) so a stopping trainer never blocks on it."""
        with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError,
                                 anyio.BrokenResourceError):
            while True:
                chunk = await stream.receive(READ_SIZE)
                if self.echo is not None:
                    self.echo.feed(which, chunk)
                self.trainer_log.write(chunk)

    def _log_raw(self, chunk: bytes, batch: Timed) -> None:
        note = self.trainer_log.write(chunk)
        if note is not None:
            batch.append((self.now(), note))

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

    def _handle_safely(self, lines: list[Any]) -> Timed:
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

    def _handle(self, items: list[Any]) -> Timed:
        """Parse lines (and fast-path frame runs) into events; the step gate and divergence
        act right here."""
        batch: Timed = []
        if not items:
            return batch
        t = self.now()
        last_before = self.gate.last
        if self._redraw_prefix is not None and len(items) > 1 and any(
                type(item) is Frames for item in items):
            items = drop_redrawn_frames(items, self._redraw_prefix)
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

    def _handle_lines(self, lines: list[str], t: float, batch: Timed) -> None:
        parse = self._parse
        if self._redraw_prefix is not None and len(lines) > 1:
            lines = drop_redrawn(lines, self._redraw_prefix)
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
                    self.checkpoints.append(event.path)
                    log.info("checkpoint", path=event.path)
                batch.append((t, event))

    def _admit(self, event: Step, t: float, batch: Timed) -> None:
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
            if self.progress.due(admitted.step, t):
                self.progress.step(admitted, t)

    def _handle_frames(self, frames: Frames, t: float, batch: Timed) -> None:
        """A run of bar frames from the fast path: admitted in bulk when they are simply
        the next steps (the common case), else frame by frame like parsed lines."""
        columns = frames.columns
        steps = list(map(int, columns["step"]))
        n = len(steps)
        if n > 1 and steps != list(range(steps[0], steps[0] + n)):
            # a step drawn twice in a row (a trainer that redraws its bar at the same step):
            # only the last frame of it counts
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
        if self.progress.due(last.step, t):
            self.progress.step(last, t)

    def _log_problem(self, problem: Problem) -> None:
        """The first few problems go to the log; all of them go to events.jsonl."""
        if stop_expected(self.adapter, self._sigint_sent(), problem.problem, problem.line):
            # our SIGINT's traceback (its exception line says which; others stay warnings)
            log.info("trainer_stopping", problem=problem.problem, line=problem.line[:200])
            return
        self._problems_logged += 1
        if self._problems_logged <= PROBLEMS_LOGGED:
            log.warning("trainer_problem", problem=problem.problem, line=problem.line[:200])
        elif self._problems_logged == PROBLEMS_LOGGED + 1:
            log.warning("trainer_problems_continue",
                        message="further problems are in events.jsonl and the report only")

    def _check_total(self, step: Step) -> None:
        """Say so once when the trainer's own step total disagrees with the limit."""
        self._total_checked = True
        if self.gate.plans_more(step):
            log.warning("trainer_plans_more_steps", trainer_total=step.total,
                        limit=self.gate.final_step, action="stopping it at the limit")

    # -- TensorBoard ------------------------------------------------------------------

    async def follow_tensorboard(self, follower: EventFileFollower, trainer: str,
                                 send: ObjectSendStream[Batch]) -> None:
        """Full-precision scalars from the trainer's event files: the follower's own loop
        (tensorboard/follow.py) at a modest interval until the run's task group ends, then
        its final sweep (shielded), so records written just before the exit count."""
        async with send:
            # which tags are per-epoch means: the adapters say (imported off the loop)
            kinds = await anyio.to_thread.run_sync(scalar_tags, trainer)
            await follower.run(functools.partial(self._emit_scalars, send, kinds),
                               interval=TENSORBOARD_POLL_SECONDS,
                               on_error=self._tensorboard_failed)

    def _tensorboard_failed(self, exc: Exception) -> None:
        """Odd event files must not end the run: counted with the parser's errors."""
        self.parser_errors += 1
        if self.parser_errors <= PARSER_ERRORS_LOGGED:
            log.warning("tensorboard.read_failed", error=f"{type(exc).__name__}: {exc}")

    async def _emit_scalars(self, send: ObjectSendStream[Batch], kinds: Mapping[str, str],
                            scalars: list[Scalar]) -> None:
        batch = self.handle_scalars(scalars, kinds)
        if batch:
            await emit(send, batch)

    def handle_scalars(self, scalars: list[Scalar], kinds: Mapping[str, str]) -> Timed:
        """Scalars within the requested steps; a non-finite loss among them is divergence.
        A per-epoch mean (its step is the epoch number) is kept whatever its step."""
        t = self.now()
        final = self.gate.final_step
        batch: Timed = []
        for scalar in scalars:
            per_epoch = kinds.get(scalar.tag) == "epoch_loss"
            if scalar.step > final and not per_epoch:
                continue
            key = ("epoch", scalar.step) if per_epoch else scalar.step
            if "loss" in scalar.tag and self.divergence.observe(key, scalar.value):
                self.request_stop("diverged")
            batch.append((t, scalar))
        return batch
