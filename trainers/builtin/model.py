"""The frozen base denoiser and its low-rank adapters, with hand-derived backprop.

Base network (frozen, same weights in every run): an MLP on a flattened 32×32 RGB image
x_t and the timestep t,

    h1  = silu(W_in·x_t + W_time·emb(t) + b_in)
    h2  = silu(W_mid·h1 + b_mid)
    out = skip(t)·x_t + W_out·h2 + b_out           (predicted noise)

``skip(t)`` is the Bayes-optimal linear noise predictor under a generic Gaussian image
prior (std ``data_std``), so the base is a plausible, if dataset-agnostic, denoiser and
what the adapters have to learn is what *this* dataset's images look like. Each of
``W_in``, ``W_mid``, ``W_out`` gets a LoRA: W + (alpha/r)·B·A, A (r×in) random, B (out×r)
zero, so training starts exactly at the base network. Only A and B are trained.

The adapter path is evaluated as (x·Aᵀ)·Bᵀ, never by forming B·A: cheaper, same math.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .noise import EMBED_DIM, NoiseSchedule

#: the base network is "pretrained": its weights never depend on the user's --seed
BASE_SEED = 20240229
#: bump when the base network changes: saved states from another base cannot resume
BASE_VERSION = "builtin-mlp-v1"
IMAGE_SIZE = 32
CHANNELS = 3
PIXELS = IMAGE_SIZE * IMAGE_SIZE * CHANNELS
HIDDEN = 256
#: the image prior the skip coefficient assumes (pixels scaled to [-1, 1])
DATA_STD = 0.5
#: the adapted layers, in forward order; also the kohya key stems (lora_unet_<layer>)
LAYERS = ("in_proj", "mid_proj", "out_proj")


def layer_shapes(hidden: int = HIDDEN) -> dict[str, tuple[int, int]]:
    """(out, in) of every adapted layer, as torch's nn.Linear stores its weight."""
    return {"in_proj": (hidden, PIXELS), "mid_proj": (hidden, hidden),
            "out_proj": (PIXELS, hidden)}


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """tanh form: no overflow warning for large |z|, unlike 1/(1+exp(-z))."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


@dataclass(frozen=True, slots=True)
class BaseModel:
    """The frozen weights: ``weight[layer]`` is (out×in) as in torch's nn.Linear."""

    weight: dict[str, np.ndarray]
    bias: dict[str, np.ndarray]
    time_weight: np.ndarray  # (HIDDEN, EMBED_DIM)
    skip: np.ndarray  # (T,) per-timestep input→output skip coefficient
    embedding: np.ndarray  # (T, EMBED_DIM)

    @classmethod
    def build(
        cls, schedule: NoiseSchedule, dtype: np.dtype | type = np.float32, hidden: int = HIDDEN
    ) -> BaseModel:
        """Deterministic weights from BASE_SEED (drawn in float64, then cast)."""
        rng = np.random.default_rng(BASE_SEED)

        def normal(shape: tuple[int, int], std: float) -> np.ndarray:
            return (rng.standard_normal(shape) * std).astype(dtype)

        shapes = layer_shapes(hidden)
        weight = {
            "in_proj": normal(shapes["in_proj"], 1.0 / np.sqrt(PIXELS)),
            "mid_proj": normal(shapes["mid_proj"], np.sqrt(2.0 / hidden)),
            # small: a random full-rank output map would be noise the adapters can't undo
            "out_proj": normal(shapes["out_proj"], 0.1 / np.sqrt(hidden)),
        }
        bias = {
            "in_proj": np.zeros(hidden, dtype),
            "mid_proj": np.zeros(hidden, dtype),
            "out_proj": np.zeros(PIXELS, dtype),
        }
        time_weight = normal((hidden, EMBED_DIM), 1.0 / np.sqrt(EMBED_DIM))
        signal = schedule.signal.astype(np.float64)
        noise = schedule.noise.astype(np.float64)
        skip = noise / (signal**2 * DATA_STD**2 + noise**2)
        return cls(weight, bias, time_weight, skip.astype(dtype),
                   schedule.embedding.astype(dtype))

    @property
    def dtype(self) -> np.dtype:
        return self.time_weight.dtype

    def shape(self, layer: str) -> tuple[int, int]:
        out_features, in_features = self.weight[layer].shape
        return int(out_features), int(in_features)


@dataclass(slots=True)
class LoraAdapters:
    """The trainable part: ``down[layer]`` = A (r×in), ``up[layer]`` = B (out×r)."""

    rank: int
    alpha: float
    down: dict[str, np.ndarray] = field(default_factory=dict)
    up: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def init(
        cls, base: BaseModel, rank: int, alpha: float, rng: np.random.Generator
    ) -> LoraAdapters:
        """A ~ U(±1/sqrt(in)) (peft's kaiming-uniform bound), B = 0: the base is unchanged."""
        lora = cls(rank=rank, alpha=alpha)
        for layer in LAYERS:
            out_features, in_features = base.shape(layer)
            bound = 1.0 / np.sqrt(in_features)
            lora.down[layer] = rng.uniform(-bound, bound, (rank, in_features)).astype(base.dtype)
            lora.up[layer] = np.zeros((out_features, rank), base.dtype)
        return lora

    def params(self) -> dict[str, np.ndarray]:
        """Every trainable array by a stable name (``<layer>.down`` / ``<layer>.up``)."""
        out: dict[str, np.ndarray] = {}
        for layer in LAYERS:
            out[f"{layer}.down"] = self.down[layer]
            out[f"{layer}.up"] = self.up[layer]
        return out

    def set_params(self, params: dict[str, np.ndarray]) -> None:
        for layer in LAYERS:
            self.down[layer] = params[f"{layer}.down"]
            self.up[layer] = params[f"{layer}.up"]


def _linear(base: BaseModel, lora: LoraAdapters, layer: str, x: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """x·(W + s·B·A)ᵀ + b, and the rank-r activation x·Aᵀ that backprop needs."""
    low = x @ lora.down[layer].T
    y = x @ base.weight[layer].T + (lora.scale * low) @ lora.up[layer].T + base.bias[layer]
    return y, low


def loss_and_grads(
    base: BaseModel, lora: LoraAdapters, x_t: np.ndarray, t: np.ndarray, eps: np.ndarray,
    *, need_grads: bool = True,
) -> tuple[float, dict[str, np.ndarray]]:
    """Mean squared error of the predicted noise and its gradient w.r.t. every A and B.

    x_t, eps: (N, PIXELS); t: (N,) integer timesteps. Gradients are keyed like
    ``LoraAdapters.params()``.
    """
    s = lora.scale
    z1, low1 = _linear(base, lora, "in_proj", x_t)
    z1 += base.embedding[t] @ base.time_weight.T
    sig1 = _sigmoid(z1)
    h1 = z1 * sig1
    z2, low2 = _linear(base, lora, "mid_proj", h1)
    sig2 = _sigmoid(z2)
    h2 = z2 * sig2
    y, low3 = _linear(base, lora, "out_proj", h2)
    y += base.skip[t][:, None] * x_t
    diff = y - eps
    loss = float(np.mean(np.square(diff, dtype=np.float64)))
    if not need_grads:
        return loss, {}

    grads: dict[str, np.ndarray] = {}
    g = diff * (2.0 / diff.size)  # dL/dy
    for layer, x_in, low, z, sig in (
        ("out_proj", h2, low3, z2, sig2),
        ("mid_proj", h1, low2, z1, sig1),
        ("in_proj", x_t, low1, None, None),
    ):
        a, b = lora.down[layer], lora.up[layer]
        grads[f"{layer}.up"] = s * (g.T @ low)  # (out, r)
        g_low = s * (g @ b)  # (N, r): gradient at x·Aᵀ
        grads[f"{layer}.down"] = g_low.T @ x_in  # (r, in)
        if z is None:
            break  # nothing below the first layer is trained
        g_x = g @ base.weight[layer] + g_low @ a  # dL/d(layer input)
        g = g_x * (sig * (1.0 + z * (1.0 - sig)))  # silu'(z) = σ(z)(1 + z(1 - σ(z)))
    return loss, grads
