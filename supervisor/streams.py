"""Bytes from a trainer's pipe → decoded, cleaned lines, without ever waiting for a newline.

Trainers redraw progress bars with a bare ``\\r`` and flush each frame with no terminator
after it. A splitter that waits for the next terminator sees every frame one frame late,
so the fragment a chunk ends with is handed out *provisionally* when it follows a ``\\r``
(it is a redraw); when the same line is later terminated it is handed out again only if
it grew. Lines are capped so a trainer that never prints a newline cannot grow memory.
"""

from __future__ import annotations

import codecs
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorasup.supervisor.fastbars import FastBars

#: the default cap on one line, in characters; the excess is dropped and counted
MAX_LINE = 64 * 1024

_TERMINATORS = re.compile(r"\r\n|\r|\n")
# CSI sequences, OSC sequences (ended by BEL or ST), and two-byte escapes.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]")


def clean(line: str) -> str:
    """Strip ANSI escapes and NUL bytes (cheap when there are none)."""
    if "\x1b" in line:
        line = _ANSI.sub("", line)
    if "\x00" in line:
        line = line.replace("\x00", "")
    return line


class LineSplitter:
    """Incremental splitter for one stream: ``feed(chunk)`` returns the lines it completes.

    Splits on ``\\n``, ``\\r`` and ``\\r\\n`` (a ``\\r`` ending one chunk may be the first
    half of a ``\\r\\n``). Decodes UTF-8 incrementally with replacement, so a character
    split across two reads survives and invalid bytes become U+FFFD.
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._decode = self._decoder.decode
        self._needle_bytes: tuple[bytes, ...] | None = None
        self._max_line = max_line
        self._partial = ""
        self._partial_after_cr = False
        self._emitted = 0
        self._pending_cr = False
        #: characters dropped because a line exceeded ``max_line``
        self.dropped_chars = 0
        #: lines that were cut at ``max_line``
        self.truncated_lines = 0

    def feed(self, data: bytes, needles: tuple[str, ...] = ()) -> list[str]:
        """The lines this chunk completes (and a provisional redraw at its end).

        ``needles``: substrings without which no line means anything to the reader. A
        chunk (with the unfinished line before it) that holds none of them is not split
        into lines at all, only accounted for: the common case of a chatty trainer costs
        a few substring searches per read instead of work per line.
        """
        text = self._decode(data)
        if needles and text:
            candidate = self._partial + text if self._partial else text
            if "\x1b" not in candidate and not any(n in candidate for n in needles):
                self._skip(text)
                return []
        return self._split(text)

    def feed_fast(self, data: bytes, needles: tuple[str, ...], fast: FastBars) -> list[Any]:
        """Like :meth:`feed`, but the complete lines of the chunk are scanned in one pass:
        runs of bar frames come back as :class:`~lorasup.supervisor.fastbars.Frames`,
        every other line as a ``str`` (as :meth:`feed` gives it).

        The unfinished line before the chunk and the unterminated tail after its last
        terminator still go through :meth:`feed`, so provisional frames behave the same.
        """
        if b"\x1b" in data or b"\x00" in data:
            return self.feed(data, needles)  # escapes to strip: the careful path
        if needles:
            if self._needle_bytes is None:
                self._needle_bytes = tuple(n.encode() for n in needles)
            if not any(n in data for n in self._needle_bytes):
                return self.feed(data, needles)
        items: list[Any] = []
        if self._partial or self._pending_cr or self._decoder.getstate()[0]:
            # finish the line in progress the ordinary way
            cr, lf = data.find(b"\r"), data.find(b"\n")
            first = cr if lf < 0 or 0 <= cr < lf else lf
            if first < 0:
                return self.feed(data, needles)
            end = first + 1
            if data[first] == 13 and end < len(data) and data[end] == 10:
                end += 1
            if end >= len(data):
                return self.feed(data, needles)
            items.extend(self.feed(data[:end]))
            self._pending_cr = False  # data[end] is no \n: the \r was a whole terminator
            data = data[end:]
        last = max(data.rfind(b"\n"), data.rfind(b"\r"))
        if last < 0:
            items.extend(self.feed(data, needles))
            return items
        for item in fast.scan(data[:last + 1]):
            if type(item) is bytes:
                item = self._cap(item.decode("utf-8", "replace"))
            items.append(item)
        tail = data[last + 1:]
        self._partial, self._emitted = "", 0
        self._partial_after_cr = data[last] == 13
        self._pending_cr = self._partial_after_cr and not tail
        if tail:
            items.extend(self.feed(tail, needles))
        return items

    def _skip(self, text: str) -> None:
        """Advance the line state over ``text`` without producing its lines."""
        text = self._after_pending_cr(text)
        if not text:
            return
        last = max(text.rfind("\n"), text.rfind("\r"))
        if last < 0:
            self._grow(text)
            return
        self._partial = ""
        self._emitted = 0
        self._partial_after_cr = text[last] == "\r"
        if last == len(text) - 1:
            self._pending_cr = self._partial_after_cr
        else:
            self._grow(text[last + 1:])

    def close(self) -> list[str]:
        """End of stream: whatever is left is a line."""
        lines = self._split(self._decode(b"", True))
        if self._partial and len(self._partial) > self._emitted:
            lines.append(clean(self._partial))
        self._partial = ""
        self._emitted = 0
        return lines

    def _after_pending_cr(self, text: str) -> str:
        """``text`` without the \n that completes a \r\n begun by the previous chunk."""
        if self._pending_cr:
            self._pending_cr = False
            if text[0] == "\n":
                # The \r was half of a \r\n: what follows is a new line, not a redraw.
                self._partial_after_cr = False
                return text[1:]
        return text

    def _cap(self, text: str) -> str:
        if len(text) > self._max_line:
            self.dropped_chars += len(text) - self._max_line
            self.truncated_lines += 1
            return text[: self._max_line]
        return text

    def _split(self, text: str) -> list[str]:
        if not text:
            return []
        text = self._after_pending_cr(text)
        if not text:
            return []
        pieces = _TERMINATORS.split(text)
        lines: list[str] = []
        if len(pieces) == 1:
            self._grow(text)
        else:
            first = pieces[0]
            partial = self._partial
            if len(partial) >= self._max_line:
                self.dropped_chars += len(first)
            else:
                partial = self._cap(partial + first) if partial else self._cap(first)
            if partial and len(partial) > self._emitted:
                lines.append(clean(partial))
            for piece in pieces[1:-1]:
                if piece:
                    lines.append(clean(self._cap(piece)))
            tail = pieces[-1]
            self._partial = ""
            self._emitted = 0
            if text[-1] == "\r":
                self._pending_cr = True
                self._partial_after_cr = True
            else:
                # The terminator right before the tail decides whether it is a redraw.
                self._partial_after_cr = text[len(text) - len(tail) - 1] == "\r"
                self._grow(tail)
        if self._partial_after_cr and len(self._partial) > self._emitted:
            lines.append(clean(self._partial))
            self._emitted = len(self._partial)
        return lines

    def _grow(self, text: str) -> None:
        if len(self._partial) >= self._max_line:
            self.dropped_chars += len(text)
        elif len(self._partial) + len(text) > self._max_line:
            self._partial = self._cap(self._partial + text)
        else:
            self._partial += text
