"""The report's constants and the small pure functions on its values (JSON in, JSON out)."""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from typing import Any

from lorasup.supervisor.events import read_number
from lorasup.supervisor.summary import BUCKETS, Stats

SCHEMA = "lorasup.report/2"
EMA_ALPHA = 0.1
#: steps kept exact (open to late values) before they are folded into the summary
WINDOW = 2048

CSV_COLUMNS = ("step", "loss", "avg_loss", "ema_loss", "lr", "epoch", "t")

#: bounds that keep memory and report.json flat whatever the trainer logs
MAX_PROBLEMS = 200
MAX_NOTES = 500
MAX_SPARSE_TAGS = 100
MAX_STACK_CAPTURES = 20
MAX_STACK_PROCESSES = 64
MAX_LR_TAGS = 8
MAX_SIGNALS = 100
MAX_EPOCHS = 1000
SPARSE_POINTS = 256
#: a step number beyond this is junk, not a step
MAX_STEP = 1 << 62
#: the most points a ``history`` record may hold
BUCKETS_LIMIT = 4 * BUCKETS

#: the per-step series kept from two sources (console, TensorBoard), by column prefix
PREFIXES = ("loss", "avg", "lr")
#: the window's columns: each prefix from the console (_c) and from TensorBoard (_tb)
COLUMNS = ("loss_c", "loss_tb", "avg_c", "avg_tb", "lr_c", "lr_tb")
SERIES_LABELS = {
    "loss": "per-step loss",
    "avg_loss": "running-average loss",
    "lr": "learning rate",
}


def to_int(value: Any) -> int | None:
    """An int from a JSON value; an integral float is accepted, anything else is not."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def to_step(value: Any) -> int | None:
    step = to_int(value)
    return step if step is not None and 0 <= step < MAX_STEP else None


def to_time(value: Any) -> float | None:
    number = read_number(value)
    return number if number is not None and math.isfinite(number) else None


def iso(epoch_s: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC (``2026-12-02T07:30:17.123Z``), for people."""
    if epoch_s is None:
        return None
    try:
        moment = datetime.datetime.fromtimestamp(epoch_s, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def spell(value: float | None) -> float | str | None:
    """JSON has no NaN/inf: spell them as events.jsonl does."""
    if value is None or value - value == 0.0:
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def spell_all(values: Sequence[float | None]) -> list[float | str | None]:
    finite_sum = sum(v for v in values if v is not None)
    if finite_sum - finite_sum == 0.0:
        return list(values)
    return [spell(v) for v in values]


def merge_source(a: str | None, b: str | None) -> str | None:
    if a is None or a == b:
        return b
    if b is None:
        return a
    return "+".join(sorted({*a.split("+"), *b.split("+")}, reverse=True))


def merged(tb: list[float | None], console: list[float | None]
           ) -> tuple[list[float | None], int, int]:
    """Per-step values where TensorBoard's full precision wins over the console's, and how
    many came from each."""
    n = len(tb)
    n_tb = n - tb.count(None)
    if not n_tb:
        return console, 0, n - console.count(None)
    if n_tb == n:
        return tb, n, 0
    out = [a if a is not None else b for a, b in zip(tb, console, strict=True)]
    return out, n_tb, n - out.count(None) - n_tb


def ema(values: Sequence[float | None], state: float | None
        ) -> tuple[list[float | None], float | None]:
    """The EMA at each value, and the state after them."""
    a, b = EMA_ALPHA, 1.0 - EMA_ALPHA
    out: list[float | None] = []
    append = out.append
    for value in values:
        if value is None or value - value != 0.0:
            append(None)
            continue
        state = value if state is None else a * value + b * state
        append(state)
    return out, state


def merge_stats(into: Stats, other: Stats) -> None:
    """Chan's merge of ``other``'s mean/M2 into ``into`` (scaled to a common exponent)."""
    if not other.n:
        return
    if not into.n:
        into.n, into.e, into.mu, into.q = other.n, other.e, other.mu, other.q
        return
    e = max(into.e, other.e)
    ra, rb = math.ldexp(1.0, into.e - e), math.ldexp(1.0, other.e - e)
    mu_a, q_a, mu_b, q_b = into.mu * ra, into.q * ra * ra, other.mu * rb, other.q * rb * rb
    n = into.n + other.n
    delta = mu_b - mu_a
    into.mu = mu_a + delta * other.n / n
    into.q = q_a + q_b + delta * delta * into.n / n * other.n
    into.n, into.e = n, e
