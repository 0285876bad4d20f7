"""Learning-rate schedules: constant or cosine, each with an optional linear warmup.

Step numbers are 1-based (the step about to be taken), as in the protocol lines, so the
lr printed on a step line is the one that step used.
"""

from __future__ import annotations

import math

SCHEDULERS = ("constant", "cosine")


def learning_rate(step: int, *, base_lr: float, total_steps: int, scheduler: str = "constant",
                  warmup_steps: int = 0) -> float:
    """The lr for 1-based ``step`` of ``total_steps``.

    Warmup ramps linearly from base_lr/warmup to base_lr over the first ``warmup_steps``
    steps; cosine then decays from base_lr to 0 at ``total_steps`` (reaching 0 only after
    the last step has used a small positive lr).
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose from {', '.join(SCHEDULERS)}")
    if warmup_steps > 0 and step <= warmup_steps:
        return base_lr * step / warmup_steps
    if scheduler == "constant":
        return base_lr
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps - 1) / decay_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
