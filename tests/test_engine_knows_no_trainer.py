"""The engine names no trainer: what it must know of one, it asks the adapter (trainers/).

Every .py file under supervisor/ is searched, code, comments and docstrings alike (a
comment that says "kohya does X" is knowledge in the wrong room too), for the names of
the trainers lorasup drives and for the flags and tags only one of them uses. The word
lists leave out names that are also plain words (``native``, ``command``); ``builtin`` is
matched as a word (``builtins`` is Python's).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from lorasup.trainers import REGISTRY

SUPERVISOR = Path(__file__).resolve().parent.parent / "supervisor"

#: trainer programs and their scripts, and what only one trainer spells
NAMES = re.compile(
    r"kohya|sd[-_]scripts|train_network|sdxl_|diffusers|transformers|\bhf\b|\bbuiltin\b"
    r"|avr_loss|loss/current|epoch_average|--logging_dir|--max_train_steps|--max_steps\b"
    r"|--resume_from_checkpoint|--save_state",
    re.IGNORECASE)

#: (file, name) -> hits allowed, each with its reason
ALLOWED: dict[tuple[str, str], int] = {
    # the one choice of a default trainer (the job's default), by name
    ("defaults.py", "builtin"): 1,
}


def hits() -> Counter[tuple[str, str]]:
    found: Counter[tuple[str, str]] = Counter()
    for path in sorted(SUPERVISOR.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for match in NAMES.finditer(text):
            found[(path.relative_to(SUPERVISOR).as_posix(), match[0].lower())] += 1
    return found


def test_every_registered_trainer_is_searched_for() -> None:
    # a new adapter's name belongs in NAMES (unless it is a plain word, as these are)
    plain_words = {"native", "command"}
    for name in REGISTRY:
        assert name in plain_words or NAMES.search(name), name


def test_the_engine_names_no_trainer() -> None:
    found = hits()
    extra = {key: n for key, n in found.items() if n > ALLOWED.get(key, 0)}
    listing = "\n".join(f"supervisor/{file}: {name!r} x{n}" for (file, name), n in
                        sorted(extra.items()))
    assert not extra, f"trainer knowledge in the engine (move it to the adapter):\n{listing}"
