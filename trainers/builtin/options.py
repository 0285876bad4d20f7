"""The builtin trainer's command line: its flags, their defaults and checks.

Kept free of numpy and of the training code, so that lorasup's pre-flight can read a
builtin command line exactly as the trainer will, without the trainer's imports.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

DEFAULT_DATASET = "lora_train_set"
DEFAULT_OUTPUT_DIR = "lora_output"
DEFAULT_NAME = "lorasup_lora"
#: run settings; on --continue the saved run's values replace these (see resolve_settings)
DEFAULTS: dict[str, Any] = {
    "seed": 42,
    "lr": 2e-3,  # AdamW on a 3-layer LoRA: the loss falls clearly within 200 steps
    "rank": 4,
    "alpha": None,  # None: alpha = rank, so the adapter scale alpha/rank is 1
    "batch_size": 4,
    "scheduler": "constant",
    "warmup_steps": 0,
    "max_grad_norm": 1.0,  # kohya's default; 0 turns clipping off
    "weight_decay": 0.01,  # torch AdamW's default
    "noise_draws": 4,  # 4 images × 4 draws = 16 timesteps per step, spread over the schedule
}


def _number(text: str, kind: type[int] | type[float]) -> float:
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text, float)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text, float)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be 0 or a positive number, got {text}")
    return value


def name_problem(name: str) -> str | None:
    """Why ``--name`` cannot be a file stem in the output folder, or None."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        return f"--name must be a plain file stem, got {name!r}"
    return None


def build_parser(
        parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser,
) -> argparse.ArgumentParser:
    """The trainer's flags; ``parser_class`` lets the pre-flight turn errors into exceptions."""
    parser = parser_class(
        prog="python -m lorasup.trainers.builtin", allow_abbrev=False,
        description="lorasup's builtin LoRA trainer: a small numpy diffusion denoiser with "
                    "low-rank adapters, trained on a kohya-layout image folder.")
    parser.add_argument("--steps", type=_positive_int, required=True,
                        help="optimizer steps to run (with --continue: steps to add)")
    parser.add_argument("--dataset", default=None,
                        help=f"kohya dataset folder of <repeats>_<name>/ subfolders (default "
                             f"{DEFAULT_DATASET}; if that is missing, the built-in demo set)")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                        help=f"where the LoRA and its resume state go (default "
                             f"{DEFAULT_OUTPUT_DIR})")
    parser.add_argument("--name", default=DEFAULT_NAME,
                        help=f"file stem: <name>.safetensors, <name>-state.npz "
                             f"(default {DEFAULT_NAME})")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--new", dest="mode", action="store_const", const="new",
                      help="start fresh (default); an existing LoRA is kept as a .bak copy")
    mode.add_argument("--continue", dest="mode", action="store_const", const="continue",
                      help="resume from <name>-state.npz and run --steps more steps; the "
                           "saved seed, lr, batch size etc. are reused unless given again "
                           "(rank and alpha must match)")
    parser.add_argument("--seed", type=_non_negative_int, default=None,
                        help=f"seed of adapter init, data order and noise "
                             f"(default {DEFAULTS['seed']})")
    parser.add_argument("--lr", type=_positive_float, default=None,
                        help=f"peak learning rate (default {DEFAULTS['lr']})")
    parser.add_argument("--rank", type=_positive_int, default=None,
                        help=f"LoRA rank r (default {DEFAULTS['rank']})")
    parser.add_argument("--alpha", type=_positive_float, default=None,
                        help="LoRA alpha; the update is scaled by alpha/rank (default: rank)")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help=f"images per step (default {DEFAULTS['batch_size']})")
    parser.add_argument("--scheduler", choices=("constant", "cosine"), default=None,
                        help="learning-rate schedule after warmup (default constant); "
                             "cosine decays to 0 at the run's last step")
    parser.add_argument("--warmup-steps", type=_non_negative_int, default=None,
                        help="linear warmup steps (default 0)")
    parser.add_argument("--max-grad-norm", type=_non_negative_float, default=None,
                        help=f"clip the global gradient norm to this; 0 disables "
                             f"(default {DEFAULTS['max_grad_norm']})")
    parser.add_argument("--weight-decay", type=_non_negative_float, default=None,
                        help=f"AdamW decoupled weight decay (default {DEFAULTS['weight_decay']})")
    parser.add_argument("--noise-draws", type=_positive_int, default=None,
                        help=f"noisy versions (timesteps) of each image per step "
                             f"(default {DEFAULTS['noise_draws']})")
    parser.add_argument("--save-every", type=_non_negative_int, default=0,
                        help="also save every N steps (default 0: only at the end)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar on stderr (protocol lines still go to stdout)")
    return parser
