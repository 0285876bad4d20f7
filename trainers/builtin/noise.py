"""The DDPM forward process: a linear beta schedule and a sinusoidal timestep embedding.

The trainer only needs the closed-form marginal q(x_t | x_0) = N(sqrt(abar_t) x_0,
(1 - abar_t) I), so the schedule is kept as the two per-timestep coefficients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: DDPM's original choice (Ho et al. 2020): 1000 steps, beta linear from 1e-4 to 0.02
TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02
#: width of the sinusoidal timestep embedding fed to the first layer
EMBED_DIM = 32


@dataclass(frozen=True, slots=True)
class NoiseSchedule:
    """Per-timestep coefficients of the noisy sample x_t = signal·x_0 + noise·eps."""

    signal: np.ndarray  # sqrt(abar_t), shape (T,)
    noise: np.ndarray  # sqrt(1 - abar_t), shape (T,)
    embedding: np.ndarray  # sinusoidal embedding of every t, shape (T, EMBED_DIM)

    @property
    def timesteps(self) -> int:
        return int(self.signal.shape[0])


def linear_schedule(
    timesteps: int = TIMESTEPS, dtype: np.dtype | type = np.float32
) -> NoiseSchedule:
    """Compute the schedule in float64 (the cumulative product is long), store in ``dtype``."""
    betas = np.linspace(BETA_START, BETA_END, timesteps, dtype=np.float64)
    alpha_bar = np.cumprod(1.0 - betas)
    return NoiseSchedule(
        signal=np.sqrt(alpha_bar).astype(dtype),
        noise=np.sqrt(1.0 - alpha_bar).astype(dtype),
        embedding=timestep_embedding(np.arange(timesteps)).astype(dtype),
    )


def timestep_embedding(t: np.ndarray, dim: int = EMBED_DIM) -> np.ndarray:
    """Transformer-style sin/cos features of t at geometrically spaced frequencies."""
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half, dtype=np.float64) / half)
    angles = np.asarray(t, dtype=np.float64)[:, None] * freqs[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def add_noise(
    schedule: NoiseSchedule, x0: np.ndarray, t: np.ndarray, eps: np.ndarray
) -> np.ndarray:
    """Sample x_t from q(x_t | x_0) with the given noise (the denoiser's target)."""
    return schedule.signal[t][:, None] * x0 + schedule.noise[t][:, None] * eps
