"""The terminal echo (supervisor/console.py): its protocol-line filter under any split into
reads, the redraw of a bar after a status line, and the bounded queue in front of a
terminal that does not keep up (a real pipe nobody reads)."""

from __future__ import annotations

import os
import threading
import time

from hypothesis import given
from hypothesis import strategies as st

from lorasup.supervisor.console import TerminalEcho, _Hide, _redraw

PREFIX = b'{"lorasup":1'


def _by_lines(data: bytes) -> bytes:
    """The filter's meaning, on the whole output at once."""
    return b"".join(line for line in data.splitlines(keepends=True)
                    if not line.startswith(PREFIX))


LINES = st.lists(st.one_of(
    st.just(b'{"lorasup":1,"kind":"step","step":3}\n'),
    st.just(b'{"lorasup":1'), st.just(b'{"lo'), st.just(b"{\n"),
    st.binary(max_size=30)), max_size=12)


@given(LINES, st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_protocol_lines_are_left_out_however_the_reads_cut_them(
        parts: list[bytes], cuts: list[int]) -> None:
    data = b"".join(parts)
    hide = _Hide(PREFIX)
    out = b""
    start = 0
    for cut in sorted(min(c, len(data)) for c in cuts):
        out += hide.feed(data[start:cut])
        start = cut
    out += hide.feed(data[start:]) + hide.close()
    assert out == _by_lines(data)


def test_the_redraw_is_the_last_frame_with_the_cursor_where_it_was() -> None:
    assert _redraw(b"\rsteps 1/5\rsteps 2/5") == b"steps 2/5"
    assert _redraw(b"steps 2/5\r") == b"steps 2/5\r"  # a bar drawn, then \r: cursor at 0
    assert _redraw(b"half a line") == b"half a line"


def test_a_status_line_goes_between_the_trainers_writes_on_a_line_of_its_own() -> None:
    read, write = os.pipe()
    echo = TerminalEcho(write, terminal=True)
    shown = b""
    try:
        echo.feed(1, b"\rsteps 1/5\rsteps 2/5")
        while not shown.endswith(b"steps 2/5"):  # on the terminal: the bar mid-line
            shown += os.read(read, 65536)
        echo.interject(lambda: os.write(write, b"[info] progress\n"))
        echo.feed(1, b"\rsteps 3/5")
        echo.close()  # what is queued goes out, and the line is ended
    finally:
        os.close(write)
    while data := os.read(read, 65536):
        shown += data
    os.close(read)
    assert shown == (b"\rsteps 1/5\rsteps 2/5"
                     b"\r\x1b[K[info] progress\n"  # the bar cleared, the status line
                     b"steps 2/5"  # the bar again, below it
                     b"\rsteps 3/5\n")


def test_a_terminal_that_does_not_keep_up_costs_dropped_bytes_never_a_wait() -> None:
    read, write = os.pipe()  # nobody reads until the end: the writer thread blocks
    echo = TerminalEcho(write, terminal=False, limit=64 * 1024)
    chunk = b"x" * 4096 + b"\n"
    began = time.monotonic()
    for _ in range(200):  # ~800 KiB: more than the pipe and the queue hold together
        echo.feed(0, chunk)
    assert time.monotonic() - began < 2.0  # feeding never waited for the reader
    assert echo.dropped > 0
    received = bytearray()

    def drain() -> None:
        while data := os.read(read, 65536):
            received.extend(data)

    reader = threading.Thread(target=drain)
    reader.start()
    echo.close(timeout=30)
    os.close(write)
    reader.join(30)
    os.close(read)
    text = bytes(received)
    assert b"bytes of the trainer's output not shown (the terminal was too slow)" in text
    assert text.count(chunk) < 200  # some were dropped, and said so
    assert text.endswith(b"trainer.log has all]\n")
