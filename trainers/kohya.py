"""kohya-ss sd-scripts: ``train_network.py`` and its ``sdxl_``/``flux_``/``sd3_`` variants.

What its output looks like (from real recordings, see tests/data/kohya and the shared
recordings README):

- stderr: a tqdm bar ``steps:  25%|██▌       | 3/12 [00:04<00:13,  1.50s/it, avr_loss=1.16]``
  redrawn with ``\\r``, two frames per step (the first still shows the previous
  ``avr_loss``); ``avr_loss`` is tqdm's 3-significant-digit running mean; other bars
  (``read caption:``, ``Loading pipeline components...:``, unlabeled caching bars) are
  not training steps.
- stderr: rich log records (``INFO     model saved.   train_network.py:1729``), wrapped at
  the terminal width unless COLUMNS says otherwise; they may follow a bar frame with no
  newline in between.
- stdout: ``epoch 1/1`` and ``saving checkpoint: <path>``.
- an empty or missing dataset logs ``ERROR No data found`` and exits 0 without a step.

The console never shows the per-step loss or the learning rate (they go to TensorBoard).
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import MappingProxyType

from lorasup.supervisor.events import Checkpoint, Epoch, Event, Finished, Step
from lorasup.supervisor.fastbars import NUMBER
from lorasup.supervisor.numbers import read_count
from lorasup.trainers.base import (
    PYTHON_PROBLEM_NEEDLES,
    PYTHON_PROBLEMS,
    AdapterBase,
    ProblemPattern,
    Resume,
    TrainerJob,
    UsageError,
    checkpoint_path,
    drop_flag,
    flag_value,
    newest_folder,
    parse_bar_line,
    postfix_value,
    python_problems,
    replace_flag,
    steps_from_flag,
    tqdm_frame,
)

_BAR = re.compile(r"steps:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)\s+\[([^\]]*)\]")
#: the fast path's whole-line frame (supervisor/fastbars.py); anything else takes parse()
FAST_BAR = re.compile(
    rb"steps: +\d{1,3}%\|[^|\r\n]*\| *(?P<step>0|[1-9]\d{0,17})/(?P<total>0|[1-9]\d{0,17})"
    rb" +\[[^\],\r\n]*,[^\],\r\n]*(?:, avr_loss=(?P<avg_loss>" + NUMBER + rb"))?\]")
_EPOCH = re.compile(r"^epoch (\d+)/(\d+)\s*$")
_CHECKPOINT = re.compile(r"^saving checkpoint: (.+?)\s*$")

KOHYA_PROBLEMS: tuple[ProblemPattern, ...] = (
    ProblemPattern("no_data", "No data found"),
    *PYTHON_PROBLEMS,
)

STEPS_FLAG = "--max_train_steps"
LOGGING_FLAG = "--logging_dir"
OUTPUT_FLAG = "--output_dir"
#: kohya computes the step count from this flag when given, ignoring --max_train_steps
EPOCHS_FLAG = "--max_train_epochs"


def parse_bar(line: str) -> tuple[Step, str] | None:
    """The ``steps:`` bar frame in a line, and whatever text was glued after it."""
    frame = tqdm_frame(line, "steps:", _BAR)
    if frame is None:
        return None
    step, total, info, rest = frame
    return Step(step=step, total=total, avg_loss=postfix_value(info, "avr_loss=")), rest


#: kohya's TensorBoard tags (with --logging_dir): the per-step loss, its running average,
#: the per-epoch mean (logged with step = the epoch number); ``lr/<group>`` per group
SCALAR_TAGS = MappingProxyType({"loss/current": "loss", "loss/average": "avg_loss",
                                "loss/epoch_average": "epoch_loss"})
#: the series kohya's console leaves out, and where they are instead
MISSING_HINTS = MappingProxyType({
    "loss": "kohya's console shows only its running average (avr_loss); the per-step loss "
            "is in its TensorBoard files (loss/current, needs --logging_dir)",
    "lr": "kohya's console shows no learning rate; it is in its TensorBoard files (lr/*, "
          "needs --logging_dir)",
})
RESUME_FLAG = "--resume"
#: kohya saves a resumable state folder (``<name>-<step>-state``) only with this
SAVE_STATE_FLAG = "--save_state"


class KohyaAdapter(AdapterBase):
    name = "kohya"
    stops_by_itself = True
    # SIGINT raises KeyboardInterrupt (finally blocks and atexit run); SIGTERM ends Python
    # at once. Neither makes kohya save: it saves only at its own end.
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    redraw_prefix = "steps:"
    fast_bar = FAST_BAR
    scalar_tags = SCALAR_TAGS
    missing_hints = MISSING_HINTS
    needles = ("steps:", "epoch ", "saving checkpoint: ", "model saved.",
               *PYTHON_PROBLEM_NEEDLES)

    def resolve_steps(self, steps: int | None, argv: Sequence[str]) -> int:
        if not argv:
            raise UsageError(
                "--trainer kohya needs the trainer command after '--' "
                "(e.g. -- accelerate launch train_network.py ...)"
            )
        return steps_from_flag(steps, argv, STEPS_FLAG,
                               why="; kohya would silently default to 1600 steps")

    def command(self, job: TrainerJob) -> list[str]:
        argv = replace_flag(drop_flag(job.argv, EPOCHS_FLAG), STEPS_FLAG, str(job.steps))
        if flag_value(argv, LOGGING_FLAG) is None and job.run_dir:
            # kohya writes its per-step loss and lr only to TensorBoard: make it write them.
            argv.append(f"{LOGGING_FLAG}={self.tensorboard_dir(job)}")
        return argv

    def resume_argv(self, argv: Sequence[str], resume: str) -> list[str]:
        """``--resume=<state folder>`` (kohya saves one with ``--save_state``)."""
        return [*drop_flag(argv, RESUME_FLAG), f"{RESUME_FLAG}={resume}"]

    def resume(self, job: TrainerJob, *, target_step: int, saved_step: int,
               output_dirs: Sequence[str], cwd: Path) -> Resume | None:
        """With ``--save_state``, the newest ``*-state`` folder of the output folders
        (``--resume``); kohya counts on from it. None without one, or when the user
        already gives ``--resume``."""
        if SAVE_STATE_FLAG not in job.argv or any(a.startswith(RESUME_FLAG) for a in job.argv):
            return None
        newest = newest_folder(output_dirs, lambda p: p.name.endswith("-state"))
        if newest is None:
            return None
        return Resume(argv=tuple(self.resume_argv(job.argv, str(newest))), point=str(newest))

    def missing_hint(self, series: str, argv: Sequence[str] | None) -> str | None:
        """The hint, or, when a --logging_dir was given (lorasup injects one), that the
        TensorBoard files were looked for there and held none of the series."""
        hint = self.missing_hints.get(series)
        logging_dir = flag_value(argv or (), LOGGING_FLAG)
        if hint is None or logging_dir is None:
            return hint
        what = {"loss": "loss/current", "lr": "lr/*"}.get(series, series)
        return hint.split("(", 1)[0].rstrip() + f" ({what}); none was read from {logging_dir}"

    def tensorboard_dir(self, job: TrainerJob) -> str | None:
        """Where kohya's event files will be: the user's --logging_dir, else ours."""
        return flag_value(job.argv, LOGGING_FLAG) or f"{job.run_dir}/tensorboard"

    def output_dirs(self, job: TrainerJob) -> list[str]:
        given = flag_value(job.argv, OUTPUT_FLAG)
        return [given] if given else []

    def environment(self) -> dict[str, str]:
        # Wide enough that rich does not wrap log records; tqdm bars are unaffected.
        return {"COLUMNS": "200"}

    def parse(self, line: str) -> Iterable[Event]:
        return parse_bar_line(line, parse_bar, self._parse_text)

    def _parse_text(self, line: str) -> list[Event]:
        if line.startswith("epoch "):
            match = _EPOCH.match(line)
            epoch = read_count(match[1]) if match is not None else None
            if epoch is not None:
                return [Epoch(epoch=epoch, total=read_count(match[2]))]
        if line.startswith("saving checkpoint: "):
            match = _CHECKPOINT.match(line)
            path = checkpoint_path(match[1]) if match is not None else None
            if path is not None:
                return [Checkpoint(path=path)]
        events: list[Event] = []
        if "model saved." in line:
            events.append(Finished(marker="model saved."))
        events.extend(python_problems(line, KOHYA_PROBLEMS))
        return events
