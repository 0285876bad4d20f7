"""What a run left on disk: its checkpoints and model files, as absolute paths.

The engine looks once, when the trainer is gone, and records the answer in events.jsonl
(an ``artifacts`` event), so ``lorasup report RUN`` rebuilds the same list from the run
directory alone, without looking at the disk again.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import structlog

from lorasup.supervisor.events import Artifacts
from lorasup.supervisor.safefs import exists

__all__ = ["MODEL_SUFFIXES", "artifacts_event", "find_artifacts", "is_model_file"]

log = structlog.get_logger("lorasup")

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
#: training state that sits next to the weights but is no model: optimizer and scheduler
#: state, the RNG, the trainer's arguments (as the common training libraries save them)
_STATE_FILE = re.compile(
    r"^(?:optimizer|scheduler|scaler|rng_state|random_states|training_args|trainer_state)"
    r"(?:[._-].*)?\.(?:pt|pth|bin|pkl|json|safetensors)$")
#: a checkpoint folder (``checkpoint-<step>``, the common libraries' layout)
_CHECKPOINT_DIR = re.compile(r"^checkpoint-\d+$")


def is_model_file(path: Path) -> bool:
    """Weights (an adapter, a model, a LoRA), not the training state saved beside them."""
    return path.suffix in MODEL_SUFFIXES and not _STATE_FILE.match(path.name)


def _absolute(path: Path, cwd: Path) -> Path:
    return Path(os.path.normpath(path if path.is_absolute() else cwd / path))


def find_artifacts(announced: Iterable[str], output_dirs: Iterable[Path], cwd: Path,
                   since: float) -> tuple[list[str], list[str]]:
    """(checkpoints, model files) of a run, absolute. Checkpoints: those the trainer
    announced, then ``checkpoint-N`` folders made in its output folders since ``since``
    (the Trainer does not always say it saved). Model files: announced files that exist,
    then weights written under the output folders since ``since``."""
    checkpoints: dict[str, None] = {}
    models: dict[str, None] = {}
    folders = [_absolute(folder, cwd) for folder in output_dirs]
    for text in announced:
        path = _absolute(Path(text), cwd)
        checkpoints[str(path)] = None
        if not exists(path):  # ENAMETOOLONG/EACCES: "not there", never a crash
            continue
        if path.is_dir() and not any(path.is_relative_to(f) for f in folders):
            folders.append(path)  # a checkpoint folder outside the output folders
        elif path.is_file() and is_model_file(path):
            models[str(path)] = None
    found_dirs: list[tuple[int, str]] = []
    for folder in folders:
        try:
            paths = sorted(folder.rglob("*")) if exists(folder) and folder.is_dir() else []
        except OSError:
            continue
        for path in paths:
            try:
                fresh = path.stat().st_mtime >= since - 1
            except OSError:
                continue
            if not fresh:
                continue
            if _CHECKPOINT_DIR.match(path.name) and path.is_dir():
                found_dirs.append((int(path.name.split("-", 1)[1]), str(path)))
            elif is_model_file(path) and path.is_file():
                models[str(path)] = None
    for _, path_text in sorted(found_dirs):
        checkpoints.setdefault(path_text, None)
    return list(checkpoints), list(models)


def artifacts_event(announced: Iterable[str], output_dirs: Iterable[Path], cwd: Path,
                    since: float) -> Artifacts:
    """Checkpoints and model files a run left (absolute): announced ones, and new ones in
    the output folders. Never raises: a failure is recorded in the event."""
    try:
        checkpoints, models = find_artifacts(announced, output_dirs, cwd, since)
    except Exception as exc:  # a path the OS refuses (ENAMETOOLONG) is no reason to fail
        log.warning("model_files_failed", error=repr(exc))
        return Artifacts(error=f"model files could not be listed: {exc!r}"[:500])
    return Artifacts(checkpoints=tuple(checkpoints), model_files=tuple(models))
