"""Hugging Face transformers ``Trainer`` scripts (plain, peft, TRL), run directly or under
``accelerate launch`` / ``torchrun``.

What their output looks like (from real recordings of transformers 5.24 with tqdm 4.70, see
tests/data/hf and the shared recordings README):

- stderr: the training bar, a tqdm bar with NO description whose total is ``max_steps``,
  ``\\r 45%|████▌     | 9/20 [00:19<00:14,  1.34s/it]``; other bars share the stream
  (``Loading weights:``, ``Map:``, TRL's dataset bars, the evaluation bar of
  ``eval_strategy``), and so do ``[transformers] ...`` log records (``Saving model
  checkpoint to <path>`` at ``log_level="info"``, glued right after a bar frame).
- stdout: one Python dict per ``Trainer.log`` call, values formatted ``%.4g`` as strings and
  no step key: ``{'loss': '6.224', 'grad_norm': '1.035', 'learning_rate': '0.001', 'epoch':
  '0.03125'}`` (TRL adds keys such as ``entropy``); evaluation logs carry ``eval_loss``; the
  end of ``train()`` logs ``{'train_runtime': ..., 'train_loss': ..., 'epoch': ...}``.

Steps come from the training bar alone: one stream, exact, never above N. tqdm redraws at
most every 0.1 s, so with faster steps not every step is drawn: the series holds the drawn
ones (every logged step is drawn, by the redraw after its dict, and so is N).

**How a loss dict gets its step.** The dict has no step, and it travels on another pipe than
the bar, so the order in which lorasup reads the two is not the order they were written in;
attaching a dict to "the last bar frame seen" mislabels it whenever stdout lags (with a
buffered stdout every dict would land on the last step). Counting dicts and multiplying by
``logging_steps`` needs a ``logging_steps`` that scripts often hard-code. Instead, each
stream is used for what it says in its own order: the Trainer prints a dict with
``tqdm.write``, which clears the training bar on stderr (``\\r<spaces>\\r``, as wide as the
frame it clears), writes the dict to stdout, and redraws the bar showing the current
step. So the k-th write mark on stderr (a clear followed by the redraw, whose step is the
step of the log) belongs to the k-th dict on stdout, whichever of the two lorasup reads
first; the values are emitted when both halves are in. That is exact, whatever
``logging_steps``, ``logging_first_step``, a resume or a buffered stdout do, provided:

- every stdout line that is a dict with an ``'epoch'`` key is a ``Trainer.log`` record (the
  Trainer adds ``epoch`` to every record it logs during training), and nothing else writes
  through ``tqdm.write`` while the training bar is open;
- the training bar is on (``disable_tqdm=False``, the Trainer's default unless its log level
  is above WARNING); without it there are neither steps nor losses;
- besides the training bar, at most one other description-less bar is open at a time (the
  evaluation bar): its redraws and its closing clear are told apart from a log write by
  counting clears (a write clears every open bar, closing the evaluation bar clears one);
  an evaluation bar whose total equals ``max_steps`` is indistinguishable from the
  training bar (its counts would be read as steps).

A loss that arrives after a later step was already seen (a buffered stdout) is recorded
late for its own step: the step gate takes late values for counted steps, never counting
them again. It is never put on the wrong step.

The adapter remembers per run (one instance per run; ``command()`` is called before any
``parse``): N, the injected ``max_steps`` (only a description-less bar with total N is the
training bar); the width and step of the last training frame and of an open evaluation bar;
and the write marks and dicts still waiting for their other half (bounded; a dropped one
keeps its place in the count, so the pairing never shifts).

Other decisions:

- ``epoch``: the dict's ``epoch`` is fractional and rounded (``%.4g``); ``Step.epoch`` is
  the 1-based epoch the step belongs to: ``ceil`` of a fractional value (exact), a whole
  number ``m`` is the last step of epoch ``m`` (wrong only for the first step of the next
  epoch when it rounds to ``m`` too: epochs of over ~2000 steps, over ~200 from epoch 10).
- ``'loss': 'nan'`` is NaN in the step (divergence is the engine's call);
  ``eval_loss`` becomes a ``Scalar`` (the report's validation series); the ``train_runtime``
  summary and other records only keep the pairing in step.
- The ``train_runtime`` summary is NOT a completion marker: it ends ``trainer.train()``, but
  the script's own final save comes after it, so a finish timeout stays a timeout.
- A script that ignores ``--max_steps`` draws a bar with another total: lorasup then sees no
  step (and says so once, as a ``bar_total_mismatch`` problem) rather than guess.

The command: ``--max_steps N`` is appended in the form the user wrote it (``--max_steps N``),
else as ``--max_steps=N``, replacing the user's value (HfArgumentParser takes both). With
lorasup's ``--tensorboard``: ``--report_to tensorboard`` (kept as given when it already names
tensorboard or all; any other reporters are replaced) and ``--logging_dir <run_dir>/tensorboard``
(HfArgumentParser flags: a script with its own argparse must accept them), plus
``TENSORBOARD_LOGGING_DIR`` in the environment, the only place transformers 5 reads it from.
"""

from __future__ import annotations

import math
import os
import re
import signal
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import MappingProxyType

from lorasup.supervisor.events import Checkpoint, Event, Problem, Scalar, Step
from lorasup.supervisor.numbers import MAX_COUNT, read_count, read_step
from lorasup.trainers.base import (
    PYTHON_PROBLEM_NEEDLES,
    AdapterBase,
    Resume,
    TrainerJob,
    UsageError,
    checkpoint_path,
    drop_flag,
    flag_value,
    newest_folder,
    python_problems,
    replace_flag,
    steps_from_flag,
)
from lorasup.trainers.hflog import parse_log_dict

STEPS_FLAG = "--max_steps"
OUTPUT_FLAG = "--output_dir"
LOGGING_FLAG = "--logging_dir"
REPORT_FLAG = "--report_to"
RESUME_FLAG = "--resume_from_checkpoint"
#: transformers 5 reads the TensorBoard folder from here (``--logging_dir`` is kept, unused)
TB_ENV = "TENSORBOARD_LOGGING_DIR"

#: a description-less tqdm frame in the Trainer's unit: ``  5%|▌   | 1/20 [00:07<02:31,  7.97s/it]``
_BAR = re.compile(r"\s*\d+%\|[^|]*\|\s*(\d+)/(\d+) \[[^\]]*?(?:it/s|s/it)\]")
_SAVING = "Saving model checkpoint to "
_CHECKPOINT_STEP = re.compile(r"checkpoint-(\d+)/?$")
#: dict records longer than this are not Trainer logs (keeps literal_eval cheap)
#: write marks or dicts waiting for their other half, at most (oldest dropped first)
_MAX_WAITING = 4096


def _epoch(value: float | None) -> int | None:
    if value is None or not math.isfinite(value) or value <= 0 or value > MAX_COUNT:
        return None
    return int(value) if value.is_integer() else math.ceil(value)


def match_bar(line: str) -> tuple[int, int, int] | None:
    """(step, total, frame width) of a description-less bar frame at the start of a line."""
    match = _BAR.match(line)
    if match is None:
        return None
    step, total = read_step(match[1]), read_count(match[2])
    if step is None or total is None:
        return None  # not counts a trainer can mean (e.g. 5000 digits): not a bar
    return step, total, match.end()


def _split_report(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(every value given to ``--report_to``, argv without the flag and its values).

    The flag takes ``=v``, ``v``, or several values after it.
    """
    values: list[str] = []
    rest: list[str] = []
    taking = False
    for arg in argv:
        if arg == REPORT_FLAG:
            taking = True
        elif arg.startswith(REPORT_FLAG + "="):
            values.append(arg.split("=", 1)[1])
            taking = False
        elif taking and not arg.startswith("-"):
            values.append(arg)
        else:
            taking = False
            rest.append(arg)
    return values, rest


def _reports_tensorboard(values: Sequence[str]) -> bool:
    return any("tensorboard" in v or v == "all" for v in values)


class HfAdapter(AdapterBase):
    name = "hf"
    stops_by_itself = True
    # SIGINT raises KeyboardInterrupt (finally blocks and atexit run); SIGTERM ends Python
    # at once. The Trainer saves only at its save steps, never on a signal.
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    #: the Trainer's TensorBoard tags (transformers 4 and 5 spellings)
    scalar_tags = MappingProxyType({"loss": "loss", "train/loss": "loss", "learning_rate": "lr",
                                    "train/learning_rate": "lr"})
    needles = ("\r", "it/s]", "s/it]", "'epoch'", _SAVING, *PYTHON_PROBLEM_NEEDLES)

    def __init__(self, steps: int | None = None) -> None:
        #: N, the injected max_steps: the training bar is the bare bar with this total
        self.total = steps
        self._tb_dir: str | None = None
        self._t_step: int | None = None   # step of the last training frame
        self._t_width: int | None = None  # its width: a clear of the bar is this wide
        self._p_width: int | None = None  # width of the open evaluation bar, if any
        self._clears: list[int] = []      # widths of clears since the last bar frame
        self._write_due = False           # a write seen; its step is the next training frame
        self._mismatch_told = False
        self._writes = 0                  # write marks seen (ordinal of the next one)
        self._logs = 0                    # log dicts seen (ordinal of the next one)
        self._waiting_steps: deque[tuple[int, int]] = deque()
        self._waiting_logs: deque[tuple[int, dict[str, float]]] = deque()

    # -- the command --------------------------------------------------------------------

    def resolve_steps(self, steps: int | None, argv: Sequence[str]) -> int:
        if not argv:
            raise UsageError("--trainer hf needs the training script after '--' "
                             "(e.g. -- accelerate launch train.py --output_dir out ...)")
        return steps_from_flag(steps, argv, STEPS_FLAG,
                               why="; the Trainer would otherwise run its num_train_epochs")

    def command(self, job: TrainerJob) -> list[str]:
        self.total = job.steps
        style = " " if STEPS_FLAG in job.argv else "="
        argv = replace_flag(job.argv, STEPS_FLAG, str(job.steps), style=style)
        if job.option("tensorboard") == "1" and job.run_dir:
            # Opted in: the Trainer writes its event files into the run directory.
            self._tb_dir = os.path.abspath(f"{job.run_dir}/tensorboard")
            values, rest = _split_report(argv)
            if not _reports_tensorboard(values):
                argv = [*rest, REPORT_FLAG, "tensorboard"]
            argv = replace_flag(argv, LOGGING_FLAG, self._tb_dir, style=" ")
        return argv

    def resume_argv(self, argv: Sequence[str], resume: str) -> list[str]:
        """``--resume_from_checkpoint <checkpoint-N folder>``: the Trainer counts on from it."""
        return [*drop_flag(argv, RESUME_FLAG), RESUME_FLAG, resume]

    def resume(self, job: TrainerJob, *, target_step: int, saved_step: int,
               output_dirs: Sequence[str], cwd: Path) -> Resume | None:
        """The newest ``checkpoint-*`` folder of the output folders; the Trainer counts on
        from its step up to the same ``--max_steps``. None when the user names one."""
        if flag_value(job.argv, RESUME_FLAG) is not None or RESUME_FLAG in job.argv:
            return None
        newest = newest_folder(output_dirs, lambda p: p.name.startswith("checkpoint-"))
        if newest is None:
            return None
        return Resume(argv=tuple(self.resume_argv(job.argv, str(newest))), point=str(newest),
                      step=read_count(newest.name.removeprefix("checkpoint-")))

    def tensorboard_dir(self, job: TrainerJob) -> str | None:
        """Where the Trainer writes event files, or None when it writes none (or we can't know)."""
        if job.option("tensorboard") == "1" and job.run_dir:
            return os.path.abspath(f"{job.run_dir}/tensorboard")
        if not _reports_tensorboard(_split_report(job.argv)[0]):
            return None  # transformers 5 reports to nothing by default
        return os.environ.get(TB_ENV) or flag_value(job.argv, LOGGING_FLAG)

    def output_dirs(self, job: TrainerJob) -> list[str]:
        given = flag_value(job.argv, OUTPUT_FLAG)
        return [given] if given else []

    def environment(self) -> dict[str, str]:
        # transformers 5 takes the TensorBoard folder from the environment only.
        return {TB_ENV: self._tb_dir} if self._tb_dir else {}

    # -- the output ---------------------------------------------------------------------

    def parse(self, line: str) -> Iterable[Event]:
        try:
            return self._parse(line)
        except Exception:  # parse never raises, whatever a trainer prints (e.g. a 5000-digit count)
            return ()

    def _parse(self, line: str) -> list[Event]:
        first = line[:1]
        if first == "{":
            record = parse_log_dict(line)
            if record is not None:
                return self._on_log(record)
        elif first == " " or first.isdigit():
            bar = match_bar(line)
            if bar is not None:
                events = self._on_bar(*bar)
                rest = line[bar[2]:].lstrip()
                if rest:
                    events.extend(self._parse_text(rest))
                return events
            if line.isspace():
                self._on_clear(len(line))
                return []
        return self._parse_text(line)

    def _parse_text(self, line: str) -> list[Event]:
        at = line.find(_SAVING)
        if at >= 0:
            path = checkpoint_path(line[at + len(_SAVING):])
            if path is not None:
                found = _CHECKPOINT_STEP.search(path)
                return [Checkpoint(path=path, step=read_step(found[1]) if found else None)]
        return python_problems(line)

    # the stderr half: bar frames and clears

    def _on_clear(self, width: int) -> None:
        if self._t_width is None:
            return  # before the training bar: other bars' business
        if (width == self._t_width or width == self._p_width) and len(self._clears) < 8:
            self._clears.append(width)

    def _close_group(self) -> None:
        """The clears since the last frame were a log write, or the evaluation bar closing."""
        clears, self._clears = self._clears, []
        if not clears:
            return
        if self._p_width is not None and len(clears) == 1 and clears[0] == self._p_width:
            self._p_width = None  # closing the evaluation bar clears that bar alone
            return
        # A write clears every open bar; an evaluation bar still open redraws right after.
        self._p_width = None
        self._write_due = True

    def _on_bar(self, step: int, total: int, width: int) -> list[Event]:
        events: list[Event] = []
        if total != self.total:
            if self._t_width is None:
                if not self._mismatch_told and self.total is not None and total > 0:
                    self._mismatch_told = True
                    events.append(Problem(
                        problem="bar_total_mismatch",
                        line=f"a bare progress bar counts to {total}, not to max_steps="
                             f"{self.total}: if it is the training bar, the script ignored "
                             f"{STEPS_FLAG} and lorasup cannot count its steps"))
                return events
            self._close_group()  # another bar drawn while training: the evaluation bar
            self._p_width = width
            return events
        self._close_group()
        if step != self._t_step:
            self._t_step = step
            events.append(Step(step=step, total=total))
        self._t_width = width
        if self._write_due:
            self._write_due = False
            events.extend(self._on_write(step))
        return events

    # pairing: the k-th write mark on stderr with the k-th log dict on stdout

    def _on_write(self, step: int) -> list[Event]:
        ordinal = self._writes
        self._writes += 1
        if ordinal < self._logs:
            while self._waiting_logs and self._waiting_logs[0][0] < ordinal:
                self._waiting_logs.popleft()
            if self._waiting_logs and self._waiting_logs[0][0] == ordinal:
                return self._pair(step, self._waiting_logs.popleft()[1])
            return []
        self._waiting_steps.append((ordinal, step))
        if len(self._waiting_steps) > _MAX_WAITING:
            self._waiting_steps.popleft()
        return []

    def _on_log(self, record: dict[str, float]) -> list[Event]:
        ordinal = self._logs
        self._logs += 1
        if ordinal < self._writes:
            while self._waiting_steps and self._waiting_steps[0][0] < ordinal:
                self._waiting_steps.popleft()
            if self._waiting_steps and self._waiting_steps[0][0] == ordinal:
                return self._pair(self._waiting_steps.popleft()[1], record)
            return []
        self._waiting_logs.append((ordinal, record))
        if len(self._waiting_logs) > _MAX_WAITING:
            self._waiting_logs.popleft()
        return []

    def _pair(self, step: int, record: dict[str, float]) -> list[Event]:
        if "loss" in record:
            return [Step(step=step, total=self.total, loss=record["loss"],
                         lr=record.get("learning_rate"), epoch=_epoch(record.get("epoch")))]
        if "eval_loss" in record:
            return [Scalar(tag="eval_loss", step=step, value=record["eval_loss"])]
        return []
