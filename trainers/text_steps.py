"""Steps in the output of programs lorasup knows nothing about (``--trainer command``).

Two sources, both read by the command adapter:

- **plain progress lines** that hand-written training loops print: ``step 3/100``,
  ``Step 3 of 100``, ``steps: 3/100``, ``iter 3``, ``Iteration 3, loss: 0.5``,
  ``Epoch 1, Step 3/100, Loss: 0.5``. Conservative on purpose, because a false step can stop
  a run: the step word must open the line (after leading blanks, ``[tags]``, an ISO or
  accelerate-style timestamp, an ``INFO``/``DEBUG`` log header, or an ``Epoch k`` part); the
  number must end at a separator (not ``step 2026-11-27``, ``step 12:30``, ``step 1.5``);
  the plural ``steps``/``iters`` only with a total (``steps: 3/100``), since ``Total steps:
  1000`` is a count, not progress; words after the step with no value among them make a
  list of stages (``Step 1: Loading the model``), not progress. ``loss``/``train_loss`` and
  ``lr``/``learning_rate`` values after the step are read as well (``val_loss``,
  ``eval_loss`` are not the training loss).
- **the user's regular expressions**, a job file's ``[parse]`` table (see ``compile_table``).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

from lorasup.supervisor.events import Step
from lorasup.supervisor.numbers import read_count, read_float, read_step
from lorasup.trainers.base import UsageError

#: substrings one of which is in every plain progress line (the reader may skip the rest)
NEEDLES = ("step", "Step", "STEP", "iter", "Iter", "ITER")

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?i:nan|inf(?:inity)?)"
# Possessive quantifiers (*+, ++) and bounded repeats: no input can make these backtrack
# for long, whatever a trainer prints.
_HEADER = (
    r"^\s*+"
    r"(?:(?:\d{4}-\d\d-\d\d|\d\d/\d\d/\d{4})[ T]\d\d:\d\d:\d\d(?:[.,]\d++)?"
    r"(?:Z|[+-]\d\d:?\d\d)?\s*+"
    r"(?:[-|:]\s*+)?)?"
    r"(?:\[[^\]\n]{0,80}\]\s*+){0,4}"
    r"(?:(?:INFO|DEBUG)(?:\s*+[:|-]\s*+|\s++)(?:[\w.]{1,80}\s*+[:|-]\s*+)?)?"
    r"(?:\[[^\]\n]{0,80}\]\s*+){0,4}"
)
_EPOCH_PART = (
    r"(?:\[?\s*+(?:[Ee]poch|EPOCH)\s*+[:=#]?\s*+\[?\s*+(?P<epoch>\d++)(?:\s*+/\s*+\d++)?(?:\s*+\])?"
    r"\s*+[,;|:-]?\s*+)?"
)
_STEP_PART = (
    r"\[?\s*+(?:[Ss]tep|STEP|[Ii]teration|ITERATION|[Ii]ter|ITER)(?P<plural>[sS])?"
    r"\s*+[:=#]?\s*+\[?\s*+(?P<step>\d++)"
    r"(?:\s*+(?:/|\bof\b)\s*+(?P<total>\d++))?(?:\s*+\])?"
    r"(?=$|[\s,;|)\]]|[:.](?!\d))"
)
_PLAIN = re.compile(_HEADER + _EPOCH_PART + _STEP_PART)
_LOSS = re.compile(r"(?<![\w.])(?:train[_ ])?(?:[Ll]oss|LOSS)\s*+[:=]?\s*+(?P<v>" + _NUMBER + ")")
#: a ``name: number`` or ``name=number`` pair: what a metrics part of a line looks like
_METRIC = re.compile(r"[A-Za-z_][\w.]{0,40}\s*+[:=]\s*+[-+]?(?:\d|\.\d|nan|inf)", re.I)
_LR = re.compile(r"(?<![\w.])(?:lr|LR|[Ll]earning[_ ]rate)\s*+[:=]?\s*+(?P<v>" + _NUMBER + ")")


def plain_step(line: str) -> Step | None:
    """The step a plain progress line shows, with the values it prints after it."""
    match = _PLAIN.match(line)
    if match is None:
        return None
    step = read_step(match["step"])
    total = read_count(match["total"]) if match["total"] is not None else None
    if step is None or (match["plural"] is not None and total is None):
        return None
    rest = line[match.end():]
    loss = _LOSS.search(rest)
    lr = _LR.search(rest)
    if loss is None and lr is None and _is_prose(rest):
        return None  # "Step 1: Loading the model" lists stages, it does not count steps
    return Step(step=step, total=total,
                loss=read_float(loss["v"]) if loss else None,
                lr=read_float(lr["v"]) if lr else None,
                epoch=read_count(match["epoch"]) if match["epoch"] is not None else None)


def _is_prose(rest: str) -> bool:
    """Words after the step and no metric among them."""
    text = rest.lstrip(" \t,;:|.-)]")
    return bool(text) and text[0].isalpha() and _METRIC.search(text) is None


# --------------------------------------------------------------------- the [parse] table

#: the keys of a ``[parse]`` table, each the name of the group its regex must have
PARSE_KEYS = ("step", "total", "loss", "avg_loss", "lr", "epoch")
_COUNTS = frozenset({"step", "total", "epoch"})


@dataclass(frozen=True, slots=True)
class ParseTable:
    """The user's regular expressions, compiled and checked.

    ``step`` finds step lines (its ``step`` group, and optional ``total``, ``loss``,
    ``avg_loss``, ``lr``, ``epoch`` groups in the same match); each other key's regex is
    searched in a line that shows a step and, where it matches, sets that value (it wins
    over a value the step regex or lorasup's own forms read).
    """

    step: re.Pattern[str] | None
    values: tuple[tuple[str, re.Pattern[str]], ...]

    def match_step(self, line: str) -> Step | None:
        if self.step is None:
            return None
        match = self.step.search(line)
        if match is None:
            return None
        step = read_step(match["step"])
        if step is None:
            return None
        groups = match.groupdict()
        return _with_values(Step(step=step), groups)

    def fill(self, event: Step, line: str) -> Step:
        """``event`` with the values of the per-value regexes that match ``line``."""
        found: dict[str, str | None] = {}
        for key, pattern in self.values:
            match = pattern.search(line)
            if match is not None:
                found[key] = match[key]
        return _with_values(event, found) if found else event


def _with_values(event: Step, groups: Mapping[str, str | None]) -> Step:
    changes: dict[str, object] = {}
    for key in PARSE_KEYS[1:]:
        text = groups.get(key)
        if text is None:
            continue
        value = read_count(text) if key in _COUNTS else read_float(text)
        if value is not None:
            changes[key] = value
    return replace(event, **changes) if changes else event


def compile_table(table: Mapping[str, object]) -> ParseTable:
    """Check and compile a ``[parse]`` table; a UsageError names the key that is wrong."""
    step: re.Pattern[str] | None = None
    values: list[tuple[str, re.Pattern[str]]] = []
    for key, text in table.items():
        if key not in PARSE_KEYS:
            close = difflib.get_close_matches(str(key), PARSE_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"[parse] has no key {key!r}{hint}; "
                             f"known: {', '.join(PARSE_KEYS)}")
        if not isinstance(text, str) or not text:
            raise UsageError(f"[parse] {key}: give a regular expression as a non-empty string")
        try:
            pattern = re.compile(text)
        except (re.error, OverflowError, RecursionError) as exc:
            raise UsageError(f"[parse] {key}: not a valid regular expression: {exc}") from None
        if key not in pattern.groupindex:
            raise UsageError(f"[parse] {key}: the regular expression needs a (?P<{key}>...) "
                             f"group around the {key}")
        if key == "step":
            step = pattern
        else:
            values.append((key, pattern))
    return ParseTable(step=step, values=tuple(values))
