"""Writing the LoRA file and the resume state, atomically.

The LoRA goes out through ``safetensors`` with kohya-style keys. Its header is then
re-serialised with sorted keys: the safetensors writer keeps metadata in a hash map whose
order changes between processes, and the same seed must give byte-identical files.

The resume state is one ``.npz`` (adapters, AdamW moments, run settings as JSON), so it
is replaced in a single ``os.replace`` and can never be half old, half new. The random
number generators need no saved state: every draw comes from a generator seeded by
(seed, stream, epoch or step), see ``dataset.epoch_order`` and ``train.step_noise``.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .inputs import StateError
from .model import LAYERS, LoraAdapters, layer_shapes

STATE_FORMAT = "lorasup-builtin-state/1"


def _write_atomic(path: Path, data: bytes) -> None:
    """tmp file in the same folder, fsync, rename: a reader sees the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def kohya_tensors(lora: LoraAdapters) -> dict[str, np.ndarray]:
    """``lora_unet_<layer>.lora_down.weight`` = A, ``.lora_up.weight`` = B, ``.alpha``."""
    tensors: dict[str, np.ndarray] = {}
    for layer in LAYERS:
        stem = f"lora_unet_{layer}"
        down = lora.down[layer]
        tensors[f"{stem}.lora_down.weight"] = np.ascontiguousarray(down)
        tensors[f"{stem}.lora_up.weight"] = np.ascontiguousarray(lora.up[layer])
        tensors[f"{stem}.alpha"] = np.asarray(lora.alpha, dtype=down.dtype)
    return tensors


def canonical_safetensors(raw: bytes) -> bytes:
    """The same file with its JSON header's keys sorted (tensor bytes untouched)."""
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # keep the tensor data 8-byte aligned
    return len(text).to_bytes(8, "little") + text + raw[8 + length:]


def save_lora(path: Path, lora: LoraAdapters, metadata: Mapping[str, str]) -> None:
    from safetensors.numpy import save

    raw = save(kohya_tensors(lora), metadata=dict(metadata))
    _write_atomic(path, canonical_safetensors(raw))


def backup_path(path: Path) -> Path:
    """``<name>.<YYYYmmdd-HHMMSS>.bak.safetensors`` from the file's own mtime, made unique."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    stem = path.name.removesuffix(".safetensors")
    candidate = path.with_name(f"{stem}.{stamp}.bak.safetensors")
    counter = 1
    while candidate.exists():
        candidate = path.with_name(f"{stem}.{stamp}-{counter}.bak.safetensors")
        counter += 1
    return candidate


def backup_existing(path: Path) -> Path | None:
    """Move an earlier run's LoRA aside (never overwrite a user's result); its new path."""
    if not path.exists():
        return None
    target = backup_path(path)
    os.replace(path, target)
    return target


@dataclass(slots=True)
class TrainState:
    """Everything needed to continue a run exactly where it stopped."""

    step: int
    settings: dict[str, Any]  # seed, rank, alpha, lr, batch size, ... and dataset fingerprint
    params: dict[str, np.ndarray]
    exp_avg: dict[str, np.ndarray]
    exp_avg_sq: dict[str, np.ndarray]
    optimizer_steps: int
    epoch_loss_sum: float = 0.0  # running sums of the current epoch, for avg_loss
    epoch_loss_count: int = 0


def save_state(path: Path, state: TrainState) -> None:
    meta = {
        "format": STATE_FORMAT,
        "step": state.step,
        "settings": state.settings,
        "optimizer_steps": state.optimizer_steps,
        "epoch_loss_sum": state.epoch_loss_sum,
        "epoch_loss_count": state.epoch_loss_count,
    }
    arrays: dict[str, np.ndarray] = {"meta": np.frombuffer(
        json.dumps(meta, sort_keys=True).encode("utf-8"), dtype=np.uint8)}
    for prefix, group in (("param", state.params), ("exp_avg", state.exp_avg),
                          ("exp_avg_sq", state.exp_avg_sq)):
        for name, value in group.items():
            arrays[f"{prefix}/{name}"] = value
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # numeric arrays only: nothing is pickled
    _write_atomic(path, buffer.getvalue())


def load_state(path: Path) -> TrainState:
    """Read a state written by ``save_state``, or raise StateError naming the file."""
    if not path.is_file():
        raise StateError(f"no saved state to continue from: {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes().decode("utf-8"))
            groups: dict[str, dict[str, np.ndarray]] = {
                "param": {}, "exp_avg": {}, "exp_avg_sq": {}}
            for key in data.files:
                prefix, _, name = key.partition("/")
                if prefix in groups:
                    groups[prefix][name] = data[key]
        if meta.get("format") != STATE_FORMAT:
            raise StateError(f"{path} is not a lorasup builtin state ({meta.get('format')!r})")
        return TrainState(
            step=int(meta["step"]), settings=dict(meta["settings"]), params=groups["param"],
            exp_avg=groups["exp_avg"], exp_avg_sq=groups["exp_avg_sq"],
            optimizer_steps=int(meta["optimizer_steps"]),
            epoch_loss_sum=float(meta["epoch_loss_sum"]),
            epoch_loss_count=int(meta["epoch_loss_count"]),
        )
    except StateError:
        raise
    except Exception as exc:  # a truncated or foreign file: same answer for the user
        raise StateError(f"cannot read saved state {path}: {exc}") from exc


def check_state(state: TrainState, rank: int) -> None:
    """Every adapter and moment present with the shape this model and rank need."""
    for layer, (out_features, in_features) in layer_shapes().items():
        for name, shape in ((f"{layer}.down", (rank, in_features)),
                            (f"{layer}.up", (out_features, rank))):
            for group in (state.params, state.exp_avg, state.exp_avg_sq):
                got = group.get(name)
                if got is None or got.shape != shape:
                    raise StateError(f"saved state has {name} of shape "
                                     f"{None if got is None else got.shape}, expected {shape}")
