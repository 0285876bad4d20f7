"""Progress for people: a ``progress`` log entry at a sane rate, the service manager's
status line, and the live line on a terminal.

The reader calls :meth:`Progress.step` for admitted steps; nothing here blocks for long
(a terminal that went away only ends the live line).
"""

from __future__ import annotations

import sys

import structlog

from lorasup.supervisor.events import Step
from lorasup.supervisor.gate import StepGate
from lorasup.supervisor.notify import Notifier

log = structlog.get_logger("lorasup")

#: a progress log entry at most this often (and once at the last step)
PROGRESS_LOG_SECONDS = 30.0
#: the live terminal line at most this often
TTY_SECONDS = 0.1


class Progress:
    """The run's progress, told in the log, to systemd and on a terminal."""

    def __init__(self, gate: StepGate, steps: int, notifier: Notifier, *, tty: bool) -> None:
        self.gate = gate
        self.steps = steps
        self.notifier = notifier
        self.tty = tty
        self._next_log = 0.0
        self._final_logged = False
        self._last_tty = 0.0

    def due(self, step: int, t: float) -> bool:
        """Whether a step at ``t`` is worth telling (cheap: called for every new step)."""
        return t >= self._next_log or self.tty or step == self.gate.final_step

    def step(self, step: Step, t: float) -> None:
        """Progress in the logs at a sane rate, and a live line on a terminal."""
        final = self.gate.final_step
        last = step.step == final and not self._final_logged
        if t >= self._next_log or last:
            self._next_log = t + PROGRESS_LOG_SECONDS
            self._final_logged = self._final_logged or last
            values = {k: v for k, v in (("loss", step.loss), ("avg_loss", step.avg_loss),
                                        ("lr", step.lr), ("epoch", step.epoch)) if v is not None}
            log.info("progress", step=step.step, of=final, t=round(t, 1), **values)
            self.notifier.status(f"step {step.step}/{final}")
        if self.tty and (t - self._last_tty >= TTY_SECONDS or step.step == final):
            self._last_tty = t
            done = step.step - self.gate.offset
            rate = done / t if t > 0 else 0.0
            eta = (self.steps - done) / rate if rate > 0 else float("inf")
            loss = step.loss if step.loss is not None else step.avg_loss
            loss_text = f"{loss:.4g}" if loss is not None else "-"
            self.write(f"\r\x1b[Kstep {step.step}/{final}  loss {loss_text}  "
                       f"{rate:.2f} it/s  ETA {eta:.0f}s")

    def write(self, text: str) -> None:
        """The live progress line; a terminal that went away only ends the live line."""
        if not self.tty:
            return
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except (OSError, ValueError):
            self.tty = False
