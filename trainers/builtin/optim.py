"""AdamW (decoupled weight decay) and global-norm gradient clipping for the adapters.

Kept as plain arrays keyed like ``LoraAdapters.params()`` so the whole optimizer state
can be saved in the resume file and restored bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def clip_grad_norm(grads: dict[str, np.ndarray], max_norm: float) -> float:
    """Scale all gradients in place so their joint L2 norm is at most ``max_norm``.

    Returns the norm before clipping (as torch's clip_grad_norm_ does); ``max_norm`` <= 0
    disables clipping. A non-finite norm is returned untouched so divergence shows.
    """
    total = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))
    if max_norm > 0 and math.isfinite(total) and total > max_norm:
        factor = max_norm / (total + 1e-6)
        for g in grads.values():
            g *= g.dtype.type(factor)
    return total


@dataclass(slots=True)
class AdamW:
    """Loshchilov & Hutter's AdamW with torch's defaults (betas 0.9/0.999, eps 1e-8)."""

    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    step_count: int = 0
    exp_avg: dict[str, np.ndarray] = field(default_factory=dict)
    exp_avg_sq: dict[str, np.ndarray] = field(default_factory=dict)

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray],
             lr: float) -> None:
        """Update ``params`` in place (the arrays the model holds) by one AdamW step."""
        self.step_count += 1
        bias1 = 1.0 - self.beta1**self.step_count
        bias2 = 1.0 - self.beta2**self.step_count
        for name, p in params.items():
            g = grads[name]
            if name not in self.exp_avg:
                self.exp_avg[name] = np.zeros_like(p)
                self.exp_avg_sq[name] = np.zeros_like(p)
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            dt = p.dtype.type
            p *= dt(1.0 - lr * self.weight_decay)
            m *= dt(self.beta1)
            m += dt(1.0 - self.beta1) * g
            v *= dt(self.beta2)
            v += dt(1.0 - self.beta2) * np.square(g)
            denom = np.sqrt(v / dt(bias2)) + dt(self.eps)
            p -= dt(lr / bias1) * (m / denom)
