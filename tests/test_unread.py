"""The sentence a run with no step read ends with (supervisor/unread.py)."""

from __future__ import annotations

from lorasup.supervisor.unread import SAMPLE_BYTES, Unread


def test_lines_are_counted_across_terminators_and_the_first_are_shown() -> None:
    unread = Unread()
    out, err = unread.stream(), unread.stream()
    out.feed(b"\x1b[1mLoading\x1b[0m data\r\n\n")
    out.feed(b"  0%|   | 0/3\r 33%|#  | 1/3\r")
    err.feed(b"warning: x\n")
    assert unread.lines == 5
    text = unread.explain(parse_hint=False)
    assert text == ("no step read in 5 line(s) of output (0 matched); the first: "
                    "'Loading data', '0%|   | 0/3', '33%|#  | 1/3'")
    assert "[parse]" in unread.explain(parse_hint=True)


def test_a_token_is_masked_before_the_line_is_cut() -> None:
    unread = Unread()
    sample = unread.stream()
    token = "hf_" + "a1B2c3D4e5" * 4
    # cut first, the line would show "hf_a1B2c", too short to look like a token
    sample.feed(("x" * 90 + " " + token + " " + "z" * 60 + "\n").encode())
    text = unread.explain(parse_hint=False)
    assert "hf_" not in text and "***" in text and text.endswith("…'")


def test_nothing_printed_and_memory_stays_bounded() -> None:
    unread = Unread()
    sample = unread.stream()
    assert unread.explain(parse_hint=False) == "no step read in 0 line(s) of output (0 matched)"
    for _ in range(100):
        sample.feed(b"y" * 4096 + b"\n")
    assert len(sample._head) == SAMPLE_BYTES and unread.lines == 100
