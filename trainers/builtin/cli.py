"""Command line of the builtin trainer: options, dataset choice, new vs. continued run.

Exit codes: 0 done and saved; 1 dataset or resume problem (nothing trained or written);
2 bad options (argparse); 130 / 143 stopped by SIGINT / SIGTERM after saving.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import protocol
from .checkpoint import check_state, load_state
from .dataset import load_dataset
from .inputs import (
    DEMO_DATASET,
    DatasetError,
    StateError,
    dataset_root,
    output_dir_problem,
    state_path,
)
from .model import BASE_VERSION
from .options import DEFAULT_DATASET, DEFAULTS, build_parser, name_problem
from .stop import STOP, StopFlag
from .train import Plan, Settings, say, train


def fail(problem: str, message: str) -> int:
    """A one-line message for people on stderr, a problem line for lorasup, exit 1."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    protocol.problem(problem, message)
    return 1


def choose_dataset(option: str | None) -> Path:
    """An explicit --dataset is used as given; the default falls back to the demo set."""
    root, demo = dataset_root(option, Path(), DEFAULT_DATASET)
    if demo:
        print(f"no {DEFAULT_DATASET}/ here and no --dataset given: training on the built-in "
              f"demo dataset ({DEMO_DATASET})", file=sys.stderr, flush=True)
    return root


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
    bad_name = name_problem(args.name)
    if bad_name:
        build_parser().error(bad_name)

    output_dir = Path(args.output_dir)
    problem = output_dir_problem(output_dir)
    if problem:
        return fail("output", problem)
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
