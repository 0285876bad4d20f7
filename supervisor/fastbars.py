"""The fast path for progress bars: a read's complete bar-frame lines in one regex pass.

A trainer that prints a bar frame per step can print a million of them. Decoding each
line, matching it, building a ``Step`` and a JSON line for it costs microseconds a step,
which is more than the trainer spends. So an adapter may offer ``fast_bar``: a compiled
bytes pattern that matches one whole frame line (no terminator) with named groups
``step`` and ``total`` and optionally ``loss``, ``avg_loss``, ``lr``, whose values it
accepts only as plain JSON numbers (anything else — ``nan``, ``inf``, odd digits, other
postfix keys — is no match). :func:`scan` then splits the complete lines of a read into
runs of frames (columns of bytes, no per-step objects) and the other lines, which take
the ordinary per-line path. :class:`StepBlock` carries a run of admitted steps to the sink
with its ``events.jsonl`` lines already formatted, in one bytes ``%`` operation.
"""

from __future__ import annotations

import re
from itertools import chain
from typing import Any

#: a value a fast pattern may accept: a JSON number whose float is finite (no nan/inf,
#: no more than 20 digits either side of the point, a two-digit exponent)
NUMBER = rb"-?(?:0|[1-9]\d{0,19})(?:\.\d{1,20})?(?:[eE][-+]?\d{1,2})?"

_NAMES = ("step", "total", "loss", "avg_loss", "lr")


class Frames:
    """A run of consecutive bar frames of one read: one bytes column per value."""

    __slots__ = ("columns",)

    def __init__(self, columns: dict[str, list[bytes]]) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns["step"])


class FastBars:
    """The per-read scanner for one adapter's ``fast_bar`` pattern."""

    def __init__(self, frame: re.Pattern[bytes]) -> None:
        # one unit per line: the terminators before it, then a frame or any other line
        self._line = re.compile(rb"[\r\n]*(?:(?:" + frame.pattern + rb")(?=[\r\n])|([^\r\n]+))",
                                frame.flags)
        index = self._line.groupindex
        self._index = {name: index[name] - 1 for name in _NAMES if name in index}
        self._other = self._line.groups - 1

    def scan(self, body: bytes) -> list[Any]:
        """The lines of ``body`` (complete lines only): Frames runs and other lines (bytes)."""
        found = self._line.findall(body)
        if not found:
            return []
        cols = list(zip(*found, strict=True))
        other = cols[self._other]
        if other.count(b"") == len(other):
            return [Frames({name: list(cols[i]) for name, i in self._index.items()})]
        items: list[Any] = []
        start = 0
        for i, line in enumerate(other):
            if line:
                if i > start:
                    items.append(Frames({name: list(cols[k][start:i])
                                         for name, k in self._index.items()}))
                items.append(line)
                start = i + 1
        if start < len(other):
            items.append(Frames({name: list(cols[k][start:]) for name, k in self._index.items()}))
        return items


class StepBlock:
    """Admitted steps of one read (strictly increasing, finite values), for the sink.

    Not an ``Event`` dataclass: a block stands for many ``step`` lines of events.jsonl.
    """

    __slots__ = ("avg_loss", "lines", "loss", "lr", "steps", "t")
    kind = "steps"

    def __init__(self, t: float, steps: list[int], columns: dict[str, list[bytes]],
                 values: dict[str, list[float | None] | None]) -> None:
        self.t = t
        self.steps = steps
        self.loss = values.get("loss")
        self.avg_loss = values.get("avg_loss")
        self.lr = values.get("lr")
        self.lines = format_lines(t, columns)

    def feed(self, builder: Any) -> None:
        builder.add_steps(self.t, self.steps, self.loss, self.avg_loss, self.lr)


def format_lines(t: float, columns: dict[str, list[bytes]]) -> bytes:
    """``events.jsonl`` step lines, as ``step_json`` writes them, from the frames' bytes."""
    head = b'{"t":%b,"kind":"step","step":%%b' % repr(t).encode()
    steps = columns["step"]
    n = len(steps)
    keys = [name for name in ("total", "loss", "avg_loss", "lr")
            if name in columns and columns[name].count(b"") != n]
    if all(b"" not in columns[name] for name in keys):
        line = head + b"".join(b',"%b":%%b' % name.encode() for name in keys) + b"}\n"
        values = chain.from_iterable(zip(steps, *(columns[name] for name in keys), strict=True))
        return (line * n) % tuple(values)
    out = []
    for i in range(n):
        parts = [head % steps[i]]
        for name in keys:
            value = columns[name][i]
            if value:
                parts.append(b',"%b":%b' % (name.encode(), value))
        parts.append(b"}\n")
        out.append(b"".join(parts))
    return b"".join(out)


def floats(column: list[bytes] | None) -> list[float | None] | None:
    """Floats of a bytes column (b"" = not reported); None when nothing was reported."""
    if column is None or column.count(b"") == len(column):
        return None
    if b"" not in column:
        return list(map(float, column))
    return [float(x) if x else None for x in column]
