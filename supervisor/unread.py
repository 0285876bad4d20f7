"""What a trainer printed while lorasup read no step from it: the "why" of a 0-step run.

A run that ends with no step read (a format lorasup does not know) must say why in one
line: how many lines the trainer printed, that none showed a step, and the first few of
them, so that the user sees at once what to teach lorasup with a ``[parse]`` table. Kept
cheap: counting terminators is a C loop per read, and lines are sampled from the first
few KiB of each stream only.
"""

from __future__ import annotations

import re

from lorasup.supervisor.redact import redact_text
from lorasup.supervisor.streams import clean

#: lines shown in the reason
SHOWN = 3
#: characters shown of each
SHOWN_CHARS = 100
#: bytes of each stream's start sampled for the lines shown
SAMPLE_BYTES = 16 * 1024

_TERMINATORS = re.compile(r"\r\n|\r|\n")

#: where the README says how to teach lorasup a format
PARSE_DOC = "README.md#any-program---trainer-command"


class StreamSample:
    """One stream's line count and its first bytes."""

    def __init__(self) -> None:
        self.lines = 0
        self._head = bytearray()

    def feed(self, chunk: bytes) -> None:
        # a \r\n is one terminator (one split across two reads is counted twice: harmless)
        self.lines += chunk.count(b"\n") + chunk.count(b"\r") - chunk.count(b"\r\n")
        room = SAMPLE_BYTES - len(self._head)
        if room > 0:
            self._head += chunk[:room]

    def first_lines(self) -> list[str]:
        text = self._head.decode("utf-8", "replace")
        lines = [clean(line).strip() for line in _TERMINATORS.split(text)]
        return [line for line in lines if line]


class Unread:
    """The samples of a run's streams, and the sentence they make."""

    def __init__(self) -> None:
        self.streams: list[StreamSample] = []

    def stream(self) -> StreamSample:
        sample = StreamSample()
        self.streams.append(sample)
        return sample

    @property
    def lines(self) -> int:
        return sum(s.lines for s in self.streams)

    def explain(self, *, parse_hint: bool) -> str:
        """``no step in 523 lines of output (0 matched); the first: '...', ...; ...``"""
        first: list[str] = []
        for sample in self.streams:
            first.extend(sample.first_lines()[:SHOWN])
        # masked before cutting: a token cut in half may no longer look like one
        shown = ", ".join(repr(_cut(redact_text(line))) for line in first[:SHOWN])
        text = f"no step read in {self.lines} line(s) of output (0 matched)"
        if shown:
            text += f"; the first: {shown}"
        if parse_hint:
            text += (f"; a [parse] table in a job file teaches lorasup the format "
                     f"(see {PARSE_DOC})")
        return text


def _cut(line: str) -> str:
    return line if len(line) <= SHOWN_CHARS else line[:SHOWN_CHARS - 1] + "…"
