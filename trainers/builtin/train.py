"""The training loop: data order, noise, forward/backward, AdamW, saves, graceful stop.

Every random draw comes from a generator seeded by (seed, stream, index): adapter init
from (seed, 0), the shuffle of epoch e from (seed, 1, e), the timesteps and noise of
step s from (seed, 2, s). A run resumed at step k therefore draws exactly what the
uninterrupted run drew at step k+1, without serialising any generator.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import protocol
from .checkpoint import TrainState, backup_existing, save_lora, save_state
from .dataset import Dataset, epoch_order
from .inputs import lora_path, state_path
from .model import BASE_VERSION, IMAGE_SIZE, PIXELS, BaseModel, LoraAdapters, loss_and_grads
from .noise import NoiseSchedule, add_noise, linear_schedule
from .optim import AdamW, clip_grad_norm
from .progress import ProgressBar
from .schedule import learning_rate
from .stop import StopFlag

#: float32 throughout (model, adapters, optimizer moments, saved tensors)
DTYPE = np.float32


@dataclass(frozen=True, slots=True)
class Settings:
    """The hyperparameters that define a run (saved with its state, restored on --continue)."""

    seed: int
    lr: float
    rank: int
    alpha: float
    batch_size: int
    scheduler: str
    warmup_steps: int
    max_grad_norm: float
    weight_decay: float
    noise_draws: int  # noisy versions of each image per step

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Plan:
    """One invocation: what to train, from where, up to which step, and where to write."""

    settings: Settings
    dataset: Dataset
    output_dir: Path
    name: str
    start_step: int  # steps already done (0 for a new run)
    final_step: int  # the last step this invocation runs
    save_every: int = 0
    keep_backup: bool = True  # move an earlier run's LoRA aside at the first save
    progress: bool = True


def step_noise(seed: int, step: int, samples: int, schedule: NoiseSchedule
               ) -> tuple[np.ndarray, np.ndarray]:
    """Timesteps and Gaussian noise for the ``samples`` noisy images of 1-based ``step``.

    Timesteps are low-discrepancy (Kingma et al. 2021, "Variational Diffusion Models"):
    one uniform offset u, then t_j = T·((u + j/samples) mod 1), shuffled over the samples.
    Each t is still uniform, but every step covers the whole schedule, so the loss of a
    step no longer swings by 100× with whether a low-t sample happened to be drawn, and
    the curve shows learning rather than timestep luck.
    """
    rng = np.random.default_rng([seed, 2, step])
    offsets = (rng.random() + np.arange(samples) / samples) % 1.0
    t = np.minimum((offsets * schedule.timesteps).astype(np.int64), schedule.timesteps - 1)
    t = t[rng.permutation(samples)]
    eps = rng.standard_normal((samples, PIXELS), dtype=DTYPE)
    return t, eps


def lora_metadata(plan: Plan, step: int) -> dict[str, str]:
    """kohya's ``ss_*`` keys where one exists, ``lorasup_*`` otherwise; all strings."""
    s, ds = plan.settings, plan.dataset
    dirs = {c.folder.name: {"n_repeats": c.repeats, "img_count": len(c.images)}
            for c in ds.concepts}
    return {
        "ss_network_module": "lorasup.builtin",
        "ss_network_dim": str(s.rank),
        "ss_network_alpha": repr(float(s.alpha)),
        "ss_learning_rate": repr(float(s.lr)),
        "ss_lr_scheduler": s.scheduler,
        "ss_lr_warmup_steps": str(s.warmup_steps),
        "ss_max_grad_norm": repr(float(s.max_grad_norm)),
        "ss_seed": str(s.seed),
        "ss_steps": str(step),
        "ss_max_train_steps": str(plan.final_step),
        "ss_batch_size_per_device": str(s.batch_size),
        "ss_num_train_images": str(ds.entries),
        "ss_num_epochs": str(math.ceil(plan.final_step / ds.steps_per_epoch(s.batch_size))),
        "ss_resolution": f"({IMAGE_SIZE}, {IMAGE_SIZE})",
        "ss_dataset_dirs": json.dumps(dirs, sort_keys=True),
        "lorasup_base_model": BASE_VERSION,
        "lorasup_optimizer": f"AdamW(weight_decay={s.weight_decay})",
        "lorasup_dataset_fingerprint": ds.fingerprint,
    }


def say(message: str) -> None:
    """One human line on stderr."""
    print(message, file=sys.stderr, flush=True)


def restore(state: TrainState, settings: Settings) -> tuple[LoraAdapters, AdamW]:
    """Adapters and optimizer from a saved state (shapes checked by check_state)."""
    lora = LoraAdapters(rank=settings.rank, alpha=settings.alpha)
    lora.set_params({k: v.astype(DTYPE, copy=True) for k, v in state.params.items()})
    optimizer = AdamW(weight_decay=settings.weight_decay, step_count=state.optimizer_steps,
                      exp_avg={k: v.astype(DTYPE, copy=True) for k, v in state.exp_avg.items()},
                      exp_avg_sq={k: v.astype(DTYPE, copy=True)
                                  for k, v in state.exp_avg_sq.items()})
    return lora, optimizer


def train(plan: Plan, stop: StopFlag, state: TrainState | None = None) -> int:
    """Run steps start+1 .. final, speaking the protocol; returns the exit code."""
    settings, dataset = plan.settings, plan.dataset
    schedule = linear_schedule(dtype=DTYPE)
    base = BaseModel.build(schedule, dtype=DTYPE)
    if state is None:
        lora = LoraAdapters.init(base, settings.rank, settings.alpha,
                                 np.random.default_rng([settings.seed, 0]))
        optimizer = AdamW(weight_decay=settings.weight_decay)
        epoch_sum, epoch_count = 0.0, 0
    else:
        lora, optimizer = restore(state, settings)
        epoch_sum, epoch_count = state.epoch_loss_sum, state.epoch_loss_count
        protocol.emit("resume", step=plan.start_step)

    batch = settings.batch_size
    per_epoch = dataset.steps_per_epoch(batch)
    epochs = math.ceil(plan.final_step / per_epoch)
    lora_file = lora_path(plan.output_dir, plan.name)
    state_file = state_path(plan.output_dir, plan.name)
    pending_backup = plan.keep_backup

    def save(step: int) -> None:
        nonlocal pending_backup
        if pending_backup:
            moved = backup_existing(lora_file)
            if moved is not None:
                say(f"kept the earlier LoRA as {moved}")
            pending_backup = False
        save_lora(lora_file, lora, lora_metadata(plan, step))
        save_state(state_file, TrainState(
            step=step, settings={**settings.to_json(), "base": BASE_VERSION,
                                 "dataset_fingerprint": dataset.fingerprint},
            params=lora.params(), exp_avg=optimizer.exp_avg,
            exp_avg_sq=optimizer.exp_avg_sq, optimizer_steps=optimizer.step_count,
            epoch_loss_sum=epoch_sum, epoch_loss_count=epoch_count))
        protocol.emit("checkpoint", path=str(lora_file), step=step)

    bar = ProgressBar(plan.start_step + 1, plan.final_step, enabled=plan.progress)
    order: np.ndarray | None = None
    order_epoch = 0
    done = plan.start_step
    for step in range(plan.start_step + 1, plan.final_step + 1):
        if stop.requested:
            break
        epoch, position = divmod(step - 1, per_epoch)
        epoch += 1
        if position == 0:
            protocol.emit("epoch", epoch=epoch, total=epochs)
            epoch_sum, epoch_count = 0.0, 0
        if order is None or order_epoch != epoch:
            order, order_epoch = epoch_order(dataset, settings.seed, epoch), epoch
        images = order[position * batch:(position + 1) * batch]
        x0 = dataset.pixels[np.repeat(images, settings.noise_draws)]
        t, eps = step_noise(settings.seed, step, x0.shape[0], schedule)
        loss, grads = loss_and_grads(base, lora, add_noise(schedule, x0, t, eps), t, eps)
        clip_grad_norm(grads, settings.max_grad_norm)
        lr = learning_rate(step, base_lr=settings.lr, total_steps=plan.final_step,
                           scheduler=settings.scheduler, warmup_steps=settings.warmup_steps)
        optimizer.step(lora.params(), grads, lr)
        epoch_sum += loss
        epoch_count += 1
        average = epoch_sum / epoch_count
        protocol.step(step, plan.final_step, loss, average, lr, epoch)
        bar.update(step, loss, average)
        done = step
        if plan.save_every and step % plan.save_every == 0 and step != plan.final_step:
            save(step)
    bar.close()

    if done < plan.final_step:  # stopped by a signal between steps
        if done > plan.start_step:
            save(done)
            say(f"stopped by {stop.name} after step {done}; saved {lora_file}")
        else:
            say(f"stopped by {stop.name} before any step; nothing saved")
        return stop.exit_code
    save(done)
    protocol.emit("finished", marker="saved")
    say(f"saved {lora_file} (step {done})")
    return 0
