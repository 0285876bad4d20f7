"""Command line of the builtin trainer: options, dataset choice, new vs. continued run.

Exit codes: 0 done and saved; 1 dataset or resume problem (nothing trained or written);
2 bad options (argparse); 130 / 143 stopped by SIGINT / SIGTERM after saving.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import protocol
from .checkpoint import StateError, check_state, load_state, state_path
from .dataset import DEMO_DATASET, DatasetError, load_dataset
from .model import BASE_VERSION
from .stop import STOP, StopFlag
from .train import Plan, Settings, say, train

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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be 0 or a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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


def fail(problem: str, message: str) -> int:
    """A one-line message for people on stderr, a problem line for lorasup, exit 1."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    protocol.problem(problem, message)
    return 1


def choose_dataset(option: str | None) -> Path:
    """An explicit --dataset is used as given; the default falls back to the demo set."""
    if option is not None:
        return Path(option)
    default = Path(DEFAULT_DATASET)
    if default.exists():
        return default
    print(f"no {DEFAULT_DATASET}/ here and no --dataset given: training on the built-in "
          f"demo dataset ({DEMO_DATASET})", file=sys.stderr, flush=True)
    return DEMO_DATASET


def resolve_settings(args: argparse.Namespace, saved: dict[str, Any] | None) -> Settings:
    """Explicit options win; otherwise the saved run's values (on --continue) or DEFAULTS.

    Rank and alpha shape the saved adapters, so on --continue an explicit different
    value is an error rather than a silent restart.
    """

    def pick(key: str) -> Any:
        given = getattr(args, key)
        if saved is not None and key in ("rank", "alpha") and given is not None \
                and float(given) != float(saved[key]):
            raise ValueError(f"--{key.replace('_', '-')} {given} differs from the saved run's "
                             f"{saved[key]}; use --new to start over with it")
        if given is not None:
            return given
        if saved is not None and key in saved:
            return saved[key]
        return DEFAULTS[key]

    rank = int(pick("rank"))
    alpha = pick("alpha")
    return Settings(seed=int(pick("seed")), lr=float(pick("lr")), rank=rank,
                    alpha=float(rank if alpha is None else alpha),
                    batch_size=int(pick("batch_size")), scheduler=str(pick("scheduler")),
                    warmup_steps=int(pick("warmup_steps")),
                    max_grad_norm=float(pick("max_grad_norm")),
                    weight_decay=float(pick("weight_decay")),
                    noise_draws=int(pick("noise_draws")))


def main(argv: Sequence[str] | None = None, stop: StopFlag = STOP) -> int:
    args = build_parser().parse_args(argv)
    if not args.name or "/" in args.name or "\\" in args.name or args.name in (".", ".."):
        build_parser().error(f"--name must be a plain file stem, got {args.name!r}")

    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        return fail("output", f"--output-dir {output_dir} exists and is not a folder")
    state = None
    if args.mode == "continue":
        try:
            state = load_state(state_path(output_dir, args.name))
        except StateError as exc:
            return fail("resume", f"{exc} (run without --continue to start a new LoRA)")
        if state.settings.get("base") != BASE_VERSION:
            return fail("resume", f"{state_path(output_dir, args.name)} was trained on base "
                                  f"{state.settings.get('base')!r}, this trainer has "
                                  f"{BASE_VERSION!r}")
    try:
        settings = resolve_settings(args, state.settings if state else None)
        if state is not None:
            check_state(state, settings.rank)
    except (ValueError, StateError) as exc:
        return fail("resume", str(exc))

    try:
        dataset = load_dataset(choose_dataset(args.dataset))
    except DatasetError as exc:
        return fail("dataset", str(exc))
    for warning in dataset.warnings:
        say(f"warning: {warning}")
    if state is not None and state.settings.get("dataset_fingerprint") != dataset.fingerprint:
        say(f"warning: dataset {dataset.root} changed since step {state.step} was saved")

    start = state.step if state is not None else 0
    plan = Plan(settings=settings, dataset=dataset, output_dir=output_dir, name=args.name,
                start_step=start, final_step=start + args.steps, save_every=args.save_every,
                keep_backup=state is None, progress=not args.no_progress)
    per_epoch = dataset.steps_per_epoch(settings.batch_size)
    say(f"builtin trainer: {dataset.image_count} images, {dataset.entries} per epoch with "
        f"repeats, batch {settings.batch_size} -> {per_epoch} steps/epoch; steps "
        f"{start + 1}..{plan.final_step}; rank {settings.rank}, alpha {settings.alpha:g}, "
        f"lr {settings.lr:g} ({settings.scheduler}), seed {settings.seed}")
    return train(plan, stop, state)
