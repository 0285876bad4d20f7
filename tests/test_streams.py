"""The line splitter, without any process: terminators, provisional redraws, caps, decoding."""

from __future__ import annotations

from lorasup.supervisor.streams import LineSplitter, clean


def feed_all(splitter: LineSplitter, *chunks: bytes) -> list[str]:
    lines: list[str] = []
    for chunk in chunks:
        lines.extend(splitter.feed(chunk))
    return lines


def test_splits_on_lf_cr_and_crlf() -> None:
    s = LineSplitter()
    assert feed_all(s, b"a\nb\rc\r\nd\n") == ["a", "b", "c", "d"]


def test_crlf_split_across_chunks_is_one_terminator() -> None:
    s = LineSplitter()
    assert feed_all(s, b"one\r", b"\ntwo\n") == ["one", "two"]


def test_tqdm_frame_at_chunk_end_is_seen_at_once_and_only_once() -> None:
    s = LineSplitter()
    assert s.feed(b"\rsteps: 1/3") == ["steps: 1/3"]
    # The next frame terminates the first: it must not come back a second time.
    assert s.feed(b"\rsteps: 2/3") == ["steps: 2/3"]
    assert s.close() == []


def test_provisional_frame_that_grows_is_seen_again_whole() -> None:
    s = LineSplitter()
    assert s.feed(b"\rsteps: 1/3 [") == ["steps: 1/3 ["]
    assert s.feed(b"avr_loss=1.1]\n") == ["steps: 1/3 [avr_loss=1.1]"]


def test_text_after_newline_waits_for_its_terminator() -> None:
    s = LineSplitter()
    assert s.feed(b"saving checkpoint: out/a") == []
    assert s.feed(b"b.safetensors\n") == ["saving checkpoint: out/ab.safetensors"]


def test_utf8_character_split_across_reads_survives() -> None:
    s = LineSplitter()
    data = "学習開始\n".encode()
    assert feed_all(s, data[:2], data[2:5], data[5:]) == ["学習開始"]


def test_invalid_utf8_becomes_replacement_character() -> None:
    s = LineSplitter()
    assert s.feed(b"bad \xff\xfe bytes\n") == ["bad \ufffd\ufffd bytes"]


def test_ansi_and_nul_are_stripped() -> None:
    assert clean("\x1b[31mred\x1b[0m a\x00b \x1b]0;title\x07x") == "red ab x"


def test_long_line_is_capped_and_counted() -> None:
    s = LineSplitter(max_line=100)
    lines = feed_all(s, b"x" * 70, b"x" * 70, b"y" * 1000, b"\nnext\n")
    assert lines == ["x" * 100, "next"]
    assert s.dropped_chars == 1040
    assert s.truncated_lines == 1


def test_ten_megabytes_without_newline_stay_bounded() -> None:
    s = LineSplitter()
    for _ in range(160):
        s.feed(b"z" * 65536)
    assert len(s._partial) <= 64 * 1024
    assert s.close() == ["z" * 64 * 1024]


def test_close_flushes_unterminated_tail() -> None:
    s = LineSplitter()
    assert s.feed(b"last words") == []
    assert s.close() == ["last words"]


def test_cr_only_progress_each_redraw_is_a_line() -> None:
    s = LineSplitter()
    lines = feed_all(s, b"\r10%", b"\r20%\r30%", b"\r40%")
    assert lines == ["10%", "20%", "30%", "40%"]


def test_fast_step_json_matches_the_generic_form() -> None:
    import json

    from lorasup.supervisor.events import Step, step_json

    for event in [Step(step=3), Step(step=4, total=9, loss=0.125, avg_loss=float("nan"),
                                      lr=1e-4, epoch=2), Step(step=5, loss=float("-inf"))]:
        assert json.loads(step_json(1.5, event)) == json.loads(event.to_json(1.5))


NEEDLES = ("steps:", "saving checkpoint: ")


def test_chunks_without_needles_are_skipped_but_keep_the_line_state() -> None:
    s = LineSplitter()
    assert s.feed(b"chatter 1\nchatter 2\nsaving che", NEEDLES) == []
    # The needle spans the chunk boundary: the line is still found whole.
    assert s.feed(b"ckpoint: out/a.safetensors\nmore chatter\n", NEEDLES) == [
        "saving checkpoint: out/a.safetensors", "more chatter"]
    assert s.feed(b"x\r", NEEDLES) == []
    assert s.feed(b"\nsteps: 1/2", NEEDLES) == []  # \r\n split across reads; no redraw
    assert s.feed(b"\n", NEEDLES) == ["steps: 1/2"]


def test_skipping_gives_the_same_lines_that_matter_as_splitting_everything() -> None:
    import random

    rng = random.Random(7)
    pieces = [b"INFO chatter %d\n" % i for i in range(300)]
    pieces += [b"\rsteps: %d/9 [x]" % i for i in range(1, 10)]
    pieces += [b"saving checkpoint: out/%d\r\n" % i for i in range(5)]
    rng.shuffle(pieces)
    data = b"".join(pieces)
    cuts = sorted(rng.sample(range(1, len(data)), 60))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    plain, skipping = LineSplitter(), LineSplitter()
    everything = [line for c in chunks for line in plain.feed(c)] + plain.close()
    found = [line for c in chunks for line in skipping.feed(c, NEEDLES)] + skipping.close()
    wanted = [line for line in everything if any(n in line for n in NEEDLES)]
    assert [line for line in found if any(n in line for n in NEEDLES)] == wanted


def test_gate_records_late_values_without_counting_the_step_again() -> None:
    from lorasup.supervisor.events import Step
    from lorasup.supervisor.gate import StepGate

    stops: list[str] = []
    gate = StepGate(5, stop_at_limit=False, on_stop=stops.append, on_limit=lambda: None)
    assert gate.admit(Step(step=0)) is None  # the bar before training
    assert gate.admit(Step(step=1)) is not None
    assert gate.admit(Step(step=3)) is not None
    assert gate.admit(Step(step=2)) is None  # an old frame with nothing new
    late = Step(step=2, loss=0.5)
    assert gate.admit(late) is late  # its loss arrived late: recorded, last stays 3
    assert gate.last == 3
    assert gate.admit(Step(step=3, avg_loss=float("nan"))) is not None
    assert gate.admit(Step(step=3, avg_loss=float("nan"))) is None  # a NaN redraw
    # (3 straight to 6 would jump over N, which reaches it: tests/test_gate_jump.py)
    assert gate.admit(Step(step=5)) is not None
    assert gate.admit(Step(step=6)).kind == "rejected"
    assert stops == ["overshoot"] and gate.rejected == 1


def test_a_frame_redrawn_at_the_same_step_by_the_next_line_is_dropped() -> None:
    from lorasup.supervisor.redraw import drop_redrawn as _drop_redrawn

    lines = [
        "steps:  8%|▊         | 1/12 [00:01<00:18,  1.69s/it]",
        "steps:  8%|▊         | 1/12 [00:01<00:18,  1.69s/it, avr_loss=1.18]",
        "steps: 17%|█▋        | 2/12 [00:03<00:15,  1.57s/it, avr_loss=1.18]",
        "steps: 17%|█▋        | 2/12 [00:03<00:15,  1.57s/it, avr_loss=1.16]model saved.",
        "steps: 17%|█▋        | 2/12 [00:03<00:15,  1.57s/it, avr_loss=1.16]",
        "epoch 1/1",
        "steps: 25%|██▌       | 3/12 [00:04<00:13,  1.50s/it, avr_loss=1.16]",
    ]
    kept = _drop_redrawn(lines, "steps:")
    # Frame 1 is redrawn by the next line; the glued record survives; the last is kept.
    assert kept == lines[1:]
