"""Progress bars of tqdm, rich and Keras and dict lines (trainers/bars.py), as strings.

Frames first (what one line shows), then which bar counts the steps (BarTracker), then the
properties every parser must have: it never raises, it takes bounded time whatever a
trainer prints, and frames generated from the libraries' grammar read back to their numbers.
The real libraries' output is replayed in tests/test_bars_recordings.py.
"""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorasup.supervisor.events import Step
from lorasup.supervisor.gate import StepGate
from lorasup.supervisor.numbers import MAX_COUNT
from lorasup.trainers import bars
from lorasup.trainers.bars import BarTracker, Frame, dict_step, read_frame
from lorasup.trainers.base import TrainerJob
from lorasup.trainers.command import CommandAdapter
from tests.test_parser_properties import cut, final_values

# line: (count, total, loss, lr)
FRAMES = {
    # tqdm: description or none, it/s or s/it, postfix from set_postfix or set_postfix_str
    "Training:  40%|████      | 40/100 [00:10<00:15,  4.00it/s, loss=0.123]":
        (40, 100, 0.123, None),
    "  40%|████      | 40/100 [00:10<00:15,  4.00it/s]": (40, 100, None, None),
    "train:  13%|█▎        | 4/30 [00:00<00:00, 30.42it/s, loss: 0.2500]": (4, 30, 0.25, None),
    "Epoch 3:  50%|#####     | 5/10 [00:07<00:07,  1.50s/it, loss=nan, lr=0.0001]":
        (5, 10, math.nan, 1e-4),
    "Training:   0%|          | 0/30 [00:00<?, ?it/s]": (0, 30, None, None),
    "Training: 40it [00:10,  4.00it/s, loss=0.5]": (40, None, 0.5, None),
    "100%|██████████| 30/30 [00:03<00:00,  8.29it/s, train_loss=1e-3, val_loss=9]":
        (30, 30, 1e-3, None),
    # rich Progress with a count column, any column order; Keras 3 (same glyphs)
    "Training ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━  5/20 0:00:00 loss=0.2000":
        (5, 20, 0.2, None),
    "Epoch 1/3 ━━━━━━━╸━━━━━━━━━━━━━━━━ 40/100 0:00:10": (40, 100, None, None),
    "Training 40/100 ━━━━━━━━━━━━╺━━━━━━━━━━ 40% 0:00:10": (40, 100, None, None),
    " 4/10 ━━━━━━━━━━━━━━━━━━━━ 0s 21ms/step - loss: 2.4328": (4, 10, 2.4328, None),
    "10/10 ━━━━━━━━━━━━━━━━━━━━ 0s 9ms/step - loss: 1.8248 \b\b\b\b": (10, 10, 1.8248, None),
    # Keras 2 / tf.keras
    " 40/100 [=====>........................] - ETA: 15s - loss: 0.1234": (40, 100, 0.1234, None),
    "100/100 [==============================] - 2s 20ms/step - loss: 0.1000 - lr: 0.0010":
        (100, 100, 0.1, 1e-3),
}

NOT_FRAMES = [
    "Map: 100%|██████████| 1000/1000 [00:00<00:00, 5000.00 examples/s]",  # data, not steps
    "model.safetensors: 100%|██████████| 548M/548M [00:05<00:00, 100MB/s]",
    "Downloading: 40%|████      | 40/100 [00:10<00:15,  4.00B/s]",
    "┏━━━━━━━━━━━━┳━━━━━━━━━━━┓",                     # a rich table border
    "━━━━━━━━━━━━━━ Results ━━━━━━━━━━━━━━",            # a rule without a count
    "━━━━ 1/2/3 ━━━━",                                  # no standalone count
    "━━━━ 40/10 0:00:01",                                # a count past its total (a cut read)
    "accuracy 40/100 [====] ok",                         # not at the start: no Keras frame
    "Training: 40%|████      | 40/100",                  # no bracket: a cut frame
    "step 3 loss=0.5",                                   # a plain line (text_steps reads it)
    "x" * 5000 + "  40%|████      | 40/100 [00:10<00:15,  4.00it/s]",  # over-long
]


@pytest.mark.parametrize("line", list(FRAMES))
def test_frames(line: str) -> None:
    frame = read_frame(line)
    assert frame is not None
    count, total, loss, lr = FRAMES[line]
    assert (frame.count, frame.total) == (count, total)
    for got, want in ((frame.loss, loss), (frame.lr, lr)):
        if want is not None and math.isnan(want):
            assert got is not None and math.isnan(got)
        else:
            assert got == want


@pytest.mark.parametrize("line", NOT_FRAMES)
def test_not_frames(line: str) -> None:
    assert read_frame(line) is None


def test_text_glued_after_a_tqdm_frame_is_kept_for_the_problem_scan() -> None:
    frame = read_frame("  5%|▌   | 1/20 [00:01<00:19, 1.0it/s]Traceback (most recent call last):")
    assert frame is not None and frame.rest == "Traceback (most recent call last):"


def test_a_description_with_digits_is_the_same_bar() -> None:
    one = read_frame("Epoch 1:  50%|█████     | 4/8 [00:00<00:00,  8.30it/s]")
    two = read_frame("Epoch 2:  50%|█████     | 4/8 [00:00<00:00,  8.30it/s]")
    other = read_frame("Epochs:  33%|███▎      | 1/3 [00:00<00:01,  1.03it/s]")
    assert one is not None and two is not None and other is not None
    assert one.key == two.key != other.key


DICTS = {
    "{'loss': 2.0, 'lr': 0.0001, 'step': 1}": (1, 2.0, 1e-4, None),
    '{"loss": 0.18182, "lr": 0.0001, "step": 11}': (11, 0.18182, 1e-4, None),
    "{'train_loss': '0.5', 'learning_rate': 1e-05, 'global_step': 7, 'epoch': 2}":
        (7, 0.5, 1e-5, 2),
    '{"step": 3, "loss": NaN}': (3, math.nan, None, None),
    "  {'step': 4, 'loss': inf}  ": (4, math.inf, None, None),
}
NOT_DICTS = [
    "{'step': 3}",                          # no metric: not a training step
    "{'loss': 0.5, 'epoch': 1.0}",          # no step (a Trainer log: --trainer hf reads it)
    "{'eval': {'step': 3, 'loss': 0.5}}",   # nested
    "{'step': 1.5, 'loss': 0.5}",           # not a count
    "{'step': -3, 'loss': 0.5}",
    "{'step': '" + "9" * 40 + "', 'loss': 0.5}",
    "step: 3, loss: 0.5}",
]


@pytest.mark.parametrize("line", list(DICTS))
def test_dict_lines(line: str) -> None:
    event = dict_step(line)
    assert event is not None
    step, loss, lr, epoch = DICTS[line]
    assert (event.step, event.lr, event.epoch) == (step, lr, epoch)
    assert event.loss == loss or (math.isnan(loss) and math.isnan(event.loss or 0.0))


@pytest.mark.parametrize("line", NOT_DICTS)
def test_not_dict_lines(line: str) -> None:
    assert dict_step(line) is None


# ------------------------------------------------------------------ which bar counts steps

def tqdm(desc: str, count: int, total: int, loss: float | None = None) -> str:
    postfix = f", loss={loss}" if loss is not None else ""
    head = f"{desc}: " if desc else ""
    return (f"{head}{count * 100 // total:3d}%|###       | {count}/{total} "
            f"[00:01<00:01, 1.0it/s{postfix}]")


def steps(tracker: BarTracker, lines: list[str]) -> list[tuple[int, float | None]]:
    out = []
    for line in lines:
        frame = read_frame(line)
        assert frame is not None, line
        step = tracker.step(frame)
        if step is not None:
            out.append((step.step, step.loss))
    return out


def test_the_bar_whose_total_is_n_wins() -> None:
    lines = [tqdm("Epochs", 0, 3), tqdm("Steps", 0, 30), tqdm("Steps", 1, 30), tqdm("Epochs", 1, 3),
             tqdm("Steps", 2, 30)]
    assert steps(BarTracker(30), lines) == [(1, None), (2, None)]


def test_nested_per_epoch_bars_count_on() -> None:
    lines = [tqdm("Epochs", 0, 2)]
    for epoch in (1, 2):
        lines += [tqdm(f"Epoch {epoch}", k, 3) for k in range(4)]
        lines.append(tqdm("Epochs", epoch, 2))
    assert [s for s, _ in steps(BarTracker(6), lines)] == [1, 2, 3, 4, 5, 6]


def test_a_round_whose_last_frame_was_not_drawn_counts_as_complete() -> None:
    # rich resets a per-epoch task between two refreshes: 5/6, then 0/6 of the next epoch
    lines = ["Epochs ━━━━━━━━━━ 0/2", *[f"Steps ━━━━━━━━━━ {k}/6" for k in range(6)],
             "Epochs ━━━━━━━━━━ 1/2", *[f"Steps ━━━━━━━━━━ {k}/6" for k in range(3)]]
    assert [s for s, _ in steps(BarTracker(12), lines)] == [1, 2, 3, 4, 5, 7, 8]


def test_an_evaluation_bar_inside_training_is_not_read() -> None:
    lines = [tqdm("", k, 100) for k in range(1, 4)]
    lines += [tqdm("Evaluating", k, 50) for k in range(0, 51)]
    lines += [tqdm("", 4, 100)]
    assert [s for s, _ in steps(BarTracker(40), lines)] == [1, 2, 3, 4]


def test_a_loading_bar_before_training_gives_way() -> None:
    lines = [tqdm("Loading", 1, 2), tqdm("Loading", 2, 2)]
    lines += [tqdm("Training", k, 100) for k in range(0, 6)]
    assert [s for s, _ in steps(BarTracker(40), lines)] == [1, 2, 3, 4, 5]


def test_a_bar_that_jumps_from_zero_past_n_is_not_the_training() -> None:
    lines = [tqdm("Map", 0, 500), tqdm("Map", 500, 500)]
    lines += [tqdm("Training", k, 100) for k in range(0, 3)]
    assert [s for s, _ in steps(BarTracker(40), lines)] == [1, 2]


def test_a_postfix_set_before_tqdm_counts_belongs_to_the_next_count() -> None:
    # for x in tqdm(...): ...; bar.set_postfix(loss=...): the value of step k+1 is first
    # drawn with count k, then again with k+1
    lines = [tqdm("T", 0, 5), tqdm("T", 0, 5, 1.0), tqdm("T", 1, 5, 1.0), tqdm("T", 1, 5, 0.5),
             tqdm("T", 2, 5, 0.5), tqdm("T", 2, 5, 0.25), tqdm("T", 3, 5, 0.25)]
    assert steps(BarTracker(5), lines) == [(1, 1.0), (2, 0.5), (3, 0.25)]


def test_a_postfix_set_after_the_count_is_the_later_frame() -> None:
    # bar.update(1); bar.set_postfix(loss=...): the first frame of step k shows step k-1's
    lines = [tqdm("T", 0, 5), tqdm("T", 1, 5), tqdm("T", 1, 5, 1.0), tqdm("T", 2, 5, 1.0),
             tqdm("T", 2, 5, 0.5)]
    gate = StepGate(5, stop_at_limit=True, on_stop=lambda _r: None, on_limit=lambda: None)
    final = {}
    for step in (s for s in map(BarTracker(5).step, map(read_frame, lines)) if s):
        admitted = gate.admit(step)
        if isinstance(admitted, Step):
            final[admitted.step] = admitted.loss
    assert final == {1: 1.0, 2: 0.5}


def test_steps_count_from_a_resume_point() -> None:
    adapter = CommandAdapter()
    adapter.command(TrainerJob(steps=10, argv=("x",), run_dir="/tmp/r"))
    assert [e.kind for e in adapter.parse('{"lorasup":1,"kind":"resume","step":100}')] == [
        "resumed"]
    got = [e.step for k in (100, 101, 102) for e in adapter.parse(tqdm("T", k, 1000))
           if isinstance(e, Step)]
    assert got == [101, 102]  # N = 10 counts from 100: 101..110 are in range


def test_bars_beyond_the_memory_bound_are_ignored() -> None:
    tracker = BarTracker(10)
    for i in range(bars.MAX_BARS + 5):
        tracker.step(Frame(key=f"bar{i}", count=0, total=5))
    assert len(tracker._bars) == bars.MAX_BARS


def test_the_command_adapter_reads_a_tqdm_bar_and_not_the_other_bars_words() -> None:
    adapter = CommandAdapter()
    adapter.command(TrainerJob(steps=10, argv=("x",), run_dir="/tmp/r"))
    events = list(adapter.parse(tqdm("Training", 3, 10, 0.5)))
    assert events == [Step(step=3, total=10, loss=0.5)]
    # a frame of another bar is no step, even with a step word before it
    assert list(adapter.parse(tqdm("Step 1", 7, 50))) == []


def test_the_command_adapter_needles_let_every_frame_through() -> None:
    adapter = CommandAdapter()
    for line in [*FRAMES, *DICTS]:
        assert any(needle in line for needle in adapter.needles), line


# ----------------------------------------------------------------------------- properties

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
PARSERS = [bars.tqdm_frame, bars.rich_frame, bars.keras_frame, read_frame]
ALPHABET = st.sampled_from(list("0123456789 /|%[]{}:=,.-━╸╺>it/s'\"steplosr\b\r"))


def _check_frame(frame: Frame | None) -> None:
    if frame is None:
        return
    assert 0 <= frame.count <= MAX_COUNT
    assert frame.total is None or 0 <= frame.total <= MAX_COUNT
    for value in (frame.loss, frame.lr):
        assert value is None or isinstance(value, float)


@given(st.one_of(st.text(max_size=300), st.text(ALPHABET, max_size=300)))
@SETTINGS
def test_no_parser_raises_on_any_text(line: str) -> None:
    for parse in PARSERS:
        _check_frame(parse(line))
    event = dict_step(line)
    assert event is None or 0 <= event.step <= MAX_COUNT
    tracker = BarTracker(20)
    frame = read_frame(line)
    if frame is not None:
        tracker.step(frame)


@given(frames=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 30),
                                 st.one_of(st.none(), st.integers(0, 30))), max_size=80),
       limit=st.one_of(st.none(), st.integers(1, 30)))
@SETTINGS
def test_the_tracker_never_gives_a_step_past_n_from_a_bar_never_read_below_it(
        frames: list[tuple[str, int, int | None]], limit: int | None) -> None:
    tracker = BarTracker(limit)
    read_low: set[str] = set()
    for key, count, total in frames:
        step = tracker.step(Frame(key=key, count=count, total=total))
        if step is None:
            continue
        assert step.step >= 1
        if limit is not None:
            assert step.step <= limit or key in read_low
            if step.step <= limit:
                read_low.add(key)


ADVERSARIAL = [
    "%|" * 5000,
    "|" + "x" * 3000 + "|" * 3000,
    "%|" + "|" * 2000 + " 1/" + "1" * 2000,
    "━" * 2000 + " 1/" * 1000,
    "1/1 " * 1000 + "━" * 100,
    " 1/2 [" + "=" * 3000,
    "{" + "'step': 1, " * 400 + "'loss': 1}",
    "{" + "'" * 4000 + "}",
    "it [" * 1000 + "1" * 1000 + "it [",
    "loss=" * 800 + "1e" * 800,
    "Training:  40%|" + "█" * 1000 + "| 40/100 [" + "0" * 1000,
]


@pytest.mark.parametrize("line", ADVERSARIAL)
def test_bounded_time_on_adversarial_lines(line: str) -> None:
    began = time.perf_counter()
    for _ in range(10):
        for parse in PARSERS:
            parse(line)
        dict_step(line)
    # generous for a loaded machine; catastrophic backtracking takes seconds to hours
    assert time.perf_counter() - began < 2.0


DESC = st.one_of(st.just(""), st.text(st.sampled_from(list("abcdefgh ABC_-12")), min_size=1,
                                      max_size=20).filter(lambda d: d.strip(" :") == d))
LOSS = st.floats(min_value=1e-6, max_value=1e6).map(lambda v: float(f"{v:.4g}"))


@given(desc=DESC, count=st.integers(0, 10**6), extra=st.integers(0, 10**6), loss=LOSS,
       slow=st.booleans(), style=st.sampled_from(["=", ": "]))
@SETTINGS
def test_tqdm_frames_round_trip(desc: str, count: int, extra: int, loss: float, slow: bool,
                                style: str) -> None:
    total = count + extra or 1
    count = min(count, total)
    rate = "1.50s/it" if slow else "4.00it/s"
    head = f"{desc}: " if desc else ""
    line = (f"{head}{count * 100 // total:3d}%|{'█' * (count * 10 // total):<10}| "
            f"{count}/{total} [00:10<00:15, {rate}, loss{style}{loss}]")
    frame = read_frame(line)
    assert frame is not None
    assert (frame.count, frame.total, frame.loss) == (count, total, loss)


@given(desc=DESC, count=st.integers(0, 10**6), extra=st.integers(0, 10**6), loss=LOSS,
       order=st.booleans())
@SETTINGS
def test_rich_and_keras3_frames_round_trip(desc: str, count: int, extra: int, loss: float,
                                           order: bool) -> None:
    total = count + extra or 1
    count = min(count, total)
    width = len(str(total))
    bar = "━" * 20
    if order:  # rich: description, bar, count, time
        line = f"{desc} {bar} {count:>{width}}/{total} 0:00:10 loss={loss}"
    else:  # Keras 3
        line = f"{count:>{width}}/{total} {bar} 1s 10ms/step - loss: {loss}"
    frame = read_frame(line)
    assert frame is not None
    assert (frame.count, frame.total, frame.loss) == (count, total, loss)


@given(count=st.integers(0, 10**6), extra=st.integers(0, 10**6), loss=LOSS)
@SETTINGS
def test_keras2_frames_round_trip(count: int, extra: int, loss: float) -> None:
    total = count + extra or 1
    count = min(count, total)
    done = count * 30 // total
    bar = "=" * max(done - 1, 0) + (">" if done else "") + "." * (30 - done)
    line = f"{count:>{len(str(total))}}/{total} [{bar}] - ETA: 15s - loss: {loss}"
    frame = read_frame(line)
    assert frame is not None
    assert (frame.count, frame.total, frame.loss) == (count, total, loss)


@given(step=st.integers(0, MAX_COUNT), loss=LOSS, json_form=st.booleans())
@SETTINGS
def test_dict_lines_round_trip(step: int, loss: float, json_form: bool) -> None:
    q = '"' if json_form else "'"
    event = dict_step(f"{{{q}loss{q}: {loss}, {q}step{q}: {step}}}")
    assert event is not None and (event.step, event.loss) == (step, loss)


# ------------------------------------------------------------- chunking, as the engine reads

N = 20  # tests.test_parser_properties builds its adapters with this N


def _tqdm_iterable(steps: int, values: list[str]) -> str:
    """``for x in tqdm(...): ...; bar.set_postfix(loss=...)``: each value is drawn first
    with the count before its step."""
    out = "\rT:   0%|          | 0/20 [00:00<?, ?it/s]"
    for k in range(1, steps + 1):
        for count in (k - 1, k):
            out += (f"\rT: {k * 5:3d}%|#         | {count}/20 [00:01<00:01, 1.0it/s, "
                    f"loss={values[k - 1]}]")
    return out


def _rich(steps: int, values: list[str]) -> str:
    return "".join(f"\r\x1b[2KTraining \x1b[91m━━━━\x1b[0m\x1b[90m━━━━\x1b[0m \x1b[32m{k:>2}/20"
                   f"\x1b[0m \x1b[33m0:00:01\x1b[0m loss={values[k - 1]}"
                   for k in range(1, steps + 1))


def _keras3(steps: int, values: list[str]) -> str:
    return "".join("\b" * 40 + f"\r{k:>2}/20 ━━━━━━━━━━ 0s 3ms/step - loss: {values[k - 1]}"
                   for k in range(1, steps + 1))


@pytest.mark.parametrize("stream", [_tqdm_iterable, _rich, _keras3])
@given(values=st.lists(st.sampled_from(["0.5", "1.25", "nan", "1e400", "0.0001", "7"]),
                       min_size=N, max_size=N),
       steps=st.integers(1, N), cuts=st.lists(st.integers(0, 10**6), min_size=1, max_size=30))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_steps_and_losses_do_not_depend_on_chunking(stream, values: list[str], steps: int,
                                                    cuts: list[int]) -> None:
    data = stream(steps, values).encode()
    whole = final_values("command", [data])
    assert sorted(whole) == list(range(1, steps + 1))
    for k, (_total, loss, *_rest) in whole.items():
        assert loss == repr(float(values[k - 1]))  # each step has its own loss
    assert final_values("command", cut(data, cuts)) == whole


def test_a_parse_table_reads_the_update_then_postfix_order_with_an_initial_postfix() -> None:
    """The order the tracker cannot tell from the iterable one: a [parse] step regex takes
    the last frame of each count, which is right for it."""
    adapter = CommandAdapter()
    adapter.command(TrainerJob(steps=5, argv=("x",), run_dir="/tmp/r", parse=(
        ("step", r"\| (?P<step>\d+)/\d+ \["), ("loss", r"loss=(?P<loss>[\d.]+)"))))
    lines = [tqdm("T", 0, 5), tqdm("T", 0, 5, 9.0), tqdm("T", 1, 5, 9.0), tqdm("T", 1, 5, 1.0),
             tqdm("T", 2, 5, 1.0), tqdm("T", 2, 5, 0.5)]
    gate = StepGate(5, stop_at_limit=True, on_stop=lambda _r: None, on_limit=lambda: None)
    final = {}
    for line in lines:
        for event in adapter.parse(line):
            admitted = gate.admit(event) if isinstance(event, Step) else None
            if isinstance(admitted, Step):
                final[admitted.step] = admitted.loss
    assert final == {1: 1.0, 2: 0.5}
