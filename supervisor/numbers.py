"""The one tolerant reader for every number a trainer prints.

Trainer output is untrusted text: a bar may count to a 5000-digit number (``int()`` refuses
more than 4300 digits), a JSON line may say ``1e400`` or a 400-digit integer (``float()`` of
such an int overflows), a log may spell ``Infinity``. Every adapter reads numbers through
these functions, so no such input can raise inside lorasup, and every event carries a
float (finite, NaN or ±inf) or a bounded non-negative int, or nothing.
"""

from __future__ import annotations

import math
from typing import Any

#: the largest step, epoch or total a trainer can mean; beyond it the text is not a count
MAX_COUNT = 10**12
_MAX_COUNT_DIGITS = len(str(MAX_COUNT))


def read_float(value: Any) -> float | None:
    """A float from a number or numeric text; None for anything else, never an exception.

    Numbers too large for a float become ±inf (a loss of ``1e400`` has diverged); ``nan``,
    ``inf`` and ``Infinity`` in any case are read as such. Bools are not numbers.
    """
    kind = type(value)
    if kind is float:
        return value
    if kind is str:
        # float() reads any digit count (no 4300-digit limit) in linear time; beyond the
        # float range it gives ±inf, which is what such a number means
        try:
            return float(value)
        except ValueError:
            return None
    if kind is bool or value is None:
        return None
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if isinstance(value, float):
        return float(value)
    return None


def read_count(value: Any, *, maximum: int = MAX_COUNT) -> int | None:
    """A count (step, total, epoch) from an int, an integral float or ASCII digits.

    None for negative, fractional, absurdly large (> ``maximum``) or non-numeric values:
    such a thing is not a step, and guessing would put a value on the wrong one.
    """
    kind = type(value)
    if kind is str:
        text = value.strip()
        if not text or len(text) > _MAX_COUNT_DIGITS or not (text.isascii() and text.isdigit()):
            return None
        number = int(text)
    elif kind is int:
        number = value
    elif kind is bool or value is None:
        return None
    elif isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer() or abs(value) > maximum:
            return None
        number = int(value)
    elif isinstance(value, int):
        number = int(value)
    else:
        return None
    return number if 0 <= number <= maximum else None


def read_step(value: Any) -> int | None:
    """A step number: a non-negative count no larger than ``MAX_COUNT``, else None."""
    return read_count(value)
