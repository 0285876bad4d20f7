"""The exact-step gate: steps 1..N are recorded, nothing beyond, and reaching N is noticed
the moment its line is parsed.

Trainers redraw the same step several times (a tqdm bar may draw two frames per step, and a
provisional line may come back whole); the gate passes a step again only when it carries
new values, so a step is never counted twice.

Bars skip numbers (tqdm with ``miniters``, a postfix set with ``refresh=False``, Keras'
redraw interval): the output may go from 37 to 41 with N = 40. The first step past the last
one that lands beyond N counts as reaching N: the stop is asked for there, with a note
saying where it came and why; step 41 is not recorded (the record never holds a step past
N), and steps up to 37 are what the run shows.
"""

from __future__ import annotations

from collections.abc import Callable

from lorasup.supervisor.events import Note, Rejected, Step


def _same(a: Step, b: Step | None) -> bool:
    """Equal values, NaN equal to NaN (a redraw of a diverged frame is still a redraw)."""
    if b is None:
        return False
    for x, y in ((a.total, b.total), (a.loss, b.loss), (a.avg_loss, b.avg_loss),
                 (a.lr, b.lr), (a.epoch, b.epoch)):
        if x != y and not (x != x and y != y):
            return False
    return True


class StepGate:
    """Admits step events up to ``limit`` steps past the resume point; reports the rest."""

    def __init__(self, limit: int, *, stop_at_limit: bool,
                 on_stop: Callable[[str], None], on_limit: Callable[[], None]) -> None:
        self.limit = limit
        self.offset = 0
        self.last = 0
        self.rejected = 0
        self._max_rejected = 0
        self._previous: Step | None = None
        self._stop_at_limit = stop_at_limit
        self._on_stop = on_stop
        self._on_limit = on_limit
        self.reached = False
        #: (last step, first step seen past N) when the output jumped over N
        self.jumped: tuple[int, int] | None = None

    @property
    def final_step(self) -> int:
        return self.offset + self.limit

    def resume(self, step: int) -> None:
        """The trainer continues after ``step``: the N steps count from there."""
        if self.last == 0:
            self.offset = step
            self.last = step

    def admit(self, event: Step) -> Step | Rejected | Note | None:
        """The event to record, a Rejected for a step past N, a Note when the output jumped
        over N, or None for a mere redraw."""
        step = event.step
        if step > self.final_step:
            if not self.reached and self.last > self.offset:
                return self._jump(step)
            self._on_stop("overshoot")
            if step > self._max_rejected:
                self._max_rejected = step
                self.rejected += 1
                return Rejected(step=step)
            return None
        if step <= self.offset:
            # Step 0 is a bar before training, steps up to a resume point are history.
            return None
        if step < self.last:
            # A value that arrives late for a step already counted (e.g. a buffered stdout
            # behind the progress bar): recorded, never counted again.
            has_values = (event.loss is not None or event.avg_loss is not None
                          or event.lr is not None)
            return event if has_values else None
        if step == self.last and _same(event, self._previous):
            return None
        self._previous = event
        if step > self.last:
            self.last = step
            if step == self.final_step:
                self.reached = True
                self._on_limit()
                if self._stop_at_limit or self.plans_more(event):
                    self._on_stop("step_limit")
        return event

    def _jump(self, step: int) -> Note:
        """The output went from a step below N straight past it: N counts as reached.

        Only after a step was admitted: a first step beyond N (a bar of something else,
        a trainer that resumed without saying so) is an overshoot, not progress.
        """
        self.jumped = (self.last, step)
        self.reached = True
        self._max_rejected = step  # its redraws are not steps past N either
        self._on_limit()
        self._on_stop("step_limit")
        return Note(message=f"stopped at step {step}: the output jumped from {self.last} to "
                            f"{step}, past the limit of {self.final_step} (steps after "
                            f"{self.last} are not in the record)")

    def plans_more(self, event: Step) -> bool:
        """The trainer's own progress total says it will run past N (it ignored the limit)."""
        return event.total is not None and event.total > self.final_step
