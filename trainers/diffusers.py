"""diffusers example training scripts (``train_text_to_image_lora.py`` and its siblings).

What their output looks like (from real recordings, see the shared recordings README):

- everything on stderr; a tqdm bar ``Steps:  20%|██        | 2/10 [00:01<00:06,  1.23it/s,
  lr=0.0001, step_loss=1.16]`` redrawn with ``\\r``, two frames per step (the first still
  shows the previous step's values); ``step_loss`` is the per-step loss (3 significant
  digits), ``lr`` the learning rate;
- python logging lines, possibly glued to a bar frame with no newline in between;
- ``Model weights saved in <path>`` at each checkpoint (``checkpoint-N/``) and at the end.

The full-precision ``train_loss`` goes to TensorBoard under ``<output_dir>/<logging_dir>``
(``logs`` by default) when ``--report_to`` includes tensorboard, the example's default.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterable, Sequence
from types import MappingProxyType

from lorasup.supervisor.events import Checkpoint, Event, Finished, Step
from lorasup.supervisor.fastbars import NUMBER
from lorasup.trainers.base import (
    PYTHON_PROBLEM_NEEDLES,
    AdapterBase,
    TrainerJob,
    UsageError,
    checkpoint_path,
    flag_value,
    parse_bar_line,
    postfix_value,
    python_problems,
    replace_flag,
    steps_from_flag,
    tqdm_frame,
)

_BAR = re.compile(r"Steps:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)\s+\[([^\]]*)\]")
#: the fast path's whole-line frame (supervisor/fastbars.py); anything else takes parse()
FAST_BAR = re.compile(
    rb"Steps: +\d{1,3}%\|[^|\r\n]*\| *(?P<step>0|[1-9]\d{0,17})/(?P<total>0|[1-9]\d{0,17})"
    rb" +\[[^\],\r\n]*,[^\],\r\n]*(?:, lr=(?P<lr>" + NUMBER + rb"))?"
    rb"(?:, step_loss=(?P<loss>" + NUMBER + rb"))?\]")
_SAVED = "Model weights saved in "

STEPS_FLAG = "--max_train_steps"
OUTPUT_FLAG = "--output_dir"
LOGGING_FLAG = "--logging_dir"
REPORT_FLAG = "--report_to"


def parse_bar(line: str) -> tuple[Step, str] | None:
    """The ``Steps:`` bar frame in a line, and whatever text was glued after it."""
    frame = tqdm_frame(line, "Steps:", _BAR)
    if frame is None:
        return None
    step, total, info, rest = frame
    return Step(step=step, total=total, loss=postfix_value(info, "step_loss="),
                lr=postfix_value(info, "lr=")), rest


class DiffusersAdapter(AdapterBase):
    name = "diffusers"
    stops_by_itself = True
    # SIGINT raises KeyboardInterrupt (finally blocks run); SIGTERM ends Python at once.
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    redraw_prefix = "Steps:"
    fast_bar = FAST_BAR
    #: ``accelerator.log({"train_loss": ...})`` each step; some scripts log ``lr`` too
    scalar_tags = MappingProxyType({"train_loss": "loss", "lr": "lr"})
    needles = ("Steps:", _SAVED, *PYTHON_PROBLEM_NEEDLES)

    def resolve_steps(self, steps: int | None, argv: Sequence[str]) -> int:
        if not argv:
            raise UsageError("--trainer diffusers needs the training script after '--' "
                             "(e.g. -- accelerate launch train_text_to_image_lora.py ...)")
        return steps_from_flag(steps, argv, STEPS_FLAG)

    def command(self, job: TrainerJob) -> list[str]:
        argv = replace_flag(job.argv, STEPS_FLAG, str(job.steps))
        if job.option("tensorboard") == "1" and job.run_dir:
            # Opted in: make the script write its event files into the run directory
            # (diffusers joins output_dir with logging_dir; an absolute path wins).
            argv = replace_flag(argv, REPORT_FLAG, "tensorboard")
            argv = replace_flag(argv, LOGGING_FLAG, os.path.abspath(f"{job.run_dir}/tensorboard"))
        return argv

    def tensorboard_dir(self, job: TrainerJob) -> str | None:
        """Where the script writes event files, or None when it writes none."""
        if job.option("tensorboard") == "1" and job.run_dir:
            return os.path.abspath(f"{job.run_dir}/tensorboard")
        report_to = flag_value(job.argv, REPORT_FLAG) or "tensorboard"
        if "tensorboard" not in report_to and report_to != "all":
            return None
        logging_dir = flag_value(job.argv, LOGGING_FLAG) or "logs"
        output_dir = flag_value(job.argv, OUTPUT_FLAG)
        if output_dir is None:
            return None
        return os.path.join(output_dir, logging_dir)

    def output_dirs(self, job: TrainerJob) -> list[str]:
        given = flag_value(job.argv, OUTPUT_FLAG)
        return [given] if given else []

    def environment(self) -> dict[str, str]:
        return {}

    def parse(self, line: str) -> Iterable[Event]:
        return parse_bar_line(line, parse_bar, self._parse_text)

    def _parse_text(self, line: str) -> list[Event]:
        if line.startswith(_SAVED):
            said = line[len(_SAVED):]
            path = checkpoint_path(said)
            events: list[Event] = [Checkpoint(path=path)] if path is not None else []
            if "/checkpoint-" not in said:
                events.append(Finished(marker="model weights saved"))
            return events
        return python_problems(line)
