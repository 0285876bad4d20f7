"""Where the time of a run went: start-up, training, finish (``timing.*`` of the report).

From the ``t`` of four records: ``started``, the first and the last new step in the
requested range, and ``exited``; O(1) state.
"""

from __future__ import annotations

from typing import Any


class Phases:
    """The four moments, and the phases between them (see the report's conventions)."""

    __slots__ = ("exited_t", "first_step_t", "last_step_t", "started_t", "top_step")

    def __init__(self) -> None:
        self.started_t: float | None = None
        self.exited_t: float | None = None
        self.first_step_t: float | None = None
        self.last_step_t: float | None = None
        #: the highest step recorded in the requested range
        self.top_step: int | None = None

    def step(self, step: int, t: float | None, lo: int, requested: int | None) -> None:
        """When the first and the last new step (in the requested range) were seen."""
        if t is None or step <= lo or (requested is not None and step > lo + requested):
            return
        if self.first_step_t is None:
            self.first_step_t = t
        if self.top_step is None or step > self.top_step:
            self.top_step = step
            self.last_step_t = t

    def as_json(self) -> dict[str, Any]:
        """timing.startup_s/training_s/finish_s/trainer_s, and why any is missing."""
        start, first, last, end = (self.started_t, self.first_step_t, self.last_step_t,
                                   self.exited_t)
        no_step = "no step was recorded"
        no_exit = ("the trainer's exit is not in events.jsonl (still running, or lorasup "
                   "was killed)")
        no_start = "the start of the trainer is not in events.jsonl"
        phases: dict[str, float | None] = {
            "startup_s": first - start if first is not None and start is not None else None,
            "training_s": last - first if last is not None and first is not None else None,
            "finish_s": end - last if end is not None and last is not None else None,
            "trainer_s": end - start if end is not None and start is not None else None,
        }
        if None not in phases.values():
            # The same span, summed in this order, so that the three add up exactly.
            phases["trainer_s"] = phases["startup_s"] + phases["training_s"] + phases["finish_s"]
        why = {"startup_s": no_start if start is None else no_step,
               "training_s": no_step,
               "finish_s": no_step if last is None else no_exit,
               "trainer_s": no_start if start is None else no_exit}
        missing = [name for name, value in phases.items() if value is None]
        return {**phases, "missing": missing, "explanation": {name: why[name] for name in missing}}
