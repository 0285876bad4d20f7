"""Properties of every adapter's ``parse``: whatever a trainer prints, nothing raises, and what
comes out is sane; the steps read do not depend on how the pipe cut the bytes into reads.

Every adapter in the registry gets: arbitrary text lines; arbitrary bytes fed through the
real ``LineSplitter`` in arbitrary chunks (with the adapter's needles, as the engine does);
and the real line shapes of the recordings (tests/data, /work/shared/recordings) with
arbitrary numbers put in them: thousands of digits, ``1e400``, ``Infinity``, ``nan``,
negative, zero, any float. Events must then carry floats (finite, NaN or ±inf) or None,
counts in 0..MAX_COUNT or None, and serialize to JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorasup.supervisor.events import (
    Checkpoint,
    Epoch,
    Event,
    Problem,
    Rejected,
    Resumed,
    Scalar,
    Step,
    step_json,
)
from lorasup.supervisor.gate import StepGate
from lorasup.supervisor.numbers import MAX_COUNT, read_count, read_float, read_step
from lorasup.supervisor.streams import LineSplitter
from lorasup.trainers import REGISTRY, get_adapter
from lorasup.trainers.base import TrainerJob

ADAPTERS = sorted(REGISTRY)
#: N for every adapter here (hf's training bar is the bare bar counting to N)
N = 20
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def make(name: str):
    adapter = get_adapter(name)
    adapter.command(TrainerJob(steps=N, argv=("python", "train.py"), run_dir="/tmp/run"))
    # hf's parse wraps its parser in a last-resort ``except Exception``: test the parser
    # itself, so that a raise is found here instead of being swallowed there.
    inner = getattr(adapter, "_parse", None)
    if inner is not None:
        adapter.parse = inner
    return adapter


# ------------------------------------------------------------------------- sanity checks


def _count(value: object, *, optional: bool = True) -> None:
    if value is None and optional:
        return
    assert type(value) is int and 0 <= value <= MAX_COUNT, value


def _float(value: object) -> None:
    assert value is None or type(value) is float, value


def check(events: Iterable[Event]) -> list[Event]:
    """Each event is a known kind with sane values and a JSON form."""
    out = list(events)
    for event in out:
        if isinstance(event, Step):
            _count(event.step, optional=False)
            _count(event.total)
            _count(event.epoch)
            for value in (event.loss, event.avg_loss, event.lr):
                _float(value)
            json.loads(step_json(1.0, event))
        elif isinstance(event, Resumed | Rejected):
            _count(event.step, optional=False)
        elif isinstance(event, Epoch):
            _count(event.epoch, optional=False)
            _count(event.total)
        elif isinstance(event, Checkpoint):
            assert isinstance(event.path, str) and event.path and "\x00" not in event.path
            raw = event.path.encode("utf-8", "surrogateescape")
            assert len(raw) <= 4096 and max(map(len, raw.split(b"/"))) <= 255
            _count(event.step)
        elif isinstance(event, Scalar):
            _count(event.step, optional=False)
            assert type(event.value) is float
        elif isinstance(event, Problem):
            assert isinstance(event.line, str) and len(event.line) <= 500
        json.loads(event.to_json(1.0))
    return out


def feed(adapter, splitter: LineSplitter, chunks: Iterable[bytes]) -> list[Event]:
    needles = tuple(getattr(adapter, "needles", ()))
    events: list[Event] = []
    for chunk in chunks:
        for line in splitter.feed(chunk, needles):
            if line:
                events.extend(check(adapter.parse(line)))
    for line in splitter.close():
        if line:
            events.extend(check(adapter.parse(line)))
    return events


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split at the given offsets (taken modulo its length, sorted)."""
    if not data:
        return [data]
    points = sorted({c % len(data) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in pairwise(points)]


# ------------------------------------------------------------------------------ numbers

HUGE_DIGITS = st.integers(4300, 6000).map(lambda n: "9" * n)
NUMBER_WORDS = st.sampled_from([
    "1e400", "-1e400", "1e-400", "Infinity", "-Infinity", "inf", "-inf", "nan", "NaN", "-nan",
    "0", "-0", "-5", "-1", "1_000", "0x10", "", "1e", ".", "²", "١٢", "1" * 400, "-" + "1" * 400,
    "3.0", "1e12", "1000000000001", "99999999999999",
])
NUMBERS = st.one_of(
    NUMBER_WORDS,
    HUGE_DIGITS,
    st.integers(-10, 10**14).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(alphabet="0123456789.eE+-_nafiINFty", max_size=12),
)


@given(st.one_of(NUMBERS, st.integers().map(lambda n: n), st.floats(), st.none(), st.booleans(),
                 st.lists(st.integers(), max_size=2)))
@SETTINGS
def test_number_readers_never_raise_and_stay_in_range(value: object) -> None:
    number = read_float(value)
    assert number is None or type(number) is float
    for count in (read_count(value), read_step(value)):
        assert count is None or (type(count) is int and 0 <= count <= MAX_COUNT)


def test_number_readers_on_the_inputs_that_crashed() -> None:
    assert read_float(10**400) == math.inf
    assert read_float(-(10**400)) == -math.inf
    assert read_float("1e400") == math.inf
    assert math.isnan(read_float("nan"))
    assert read_float("Infinity") == math.inf
    assert read_float("9" * 5000) == math.inf and read_float("-" + "9" * 5000) == -math.inf
    assert read_float(True) is None
    assert read_step("9" * 5000) is None
    assert read_step(10**400) is None
    assert read_step(-5) is None and read_step("-5") is None
    assert read_step(MAX_COUNT + 1) is None and read_step(MAX_COUNT) == MAX_COUNT
    assert read_step(3.0) == 3 and read_step(3.5) is None and read_step(math.inf) is None
    assert read_step("²") is None and read_step("١٢") is None
    assert read_step(" 12 ") == 12 and read_step(True) is None


# ------------------------------------------------------------- the line shapes of trainers


def _templates(k: str, n: str, x: str, y: str, z: str) -> list[str]:
    """Real line shapes (kohya, diffusers, hf, native protocol, plain lines) with numbers in."""
    return [
        f"steps:  50%|█████     | {k}/{n} [00:01<00:01,  1.50s/it, avr_loss={x}]",
        f"steps: 100%|██████████| {k}/{n} [00:19<00:00,  1.63s/it, avr_loss={x}]"
        "2026-11-27 21:44:30 INFO     model saved.                  train_network.py:1729",
        f"epoch {k}/{n}",
        f"saving checkpoint: out/normal/test_lora-{k}.safetensors",
        f"saving checkpoint: out/{x}{y}.safetensors",
        f"Steps:  20%|██        | {k}/{n} [00:01<00:06,  1.23it/s, lr={x}, step_loss={y}]",
        f"Model weights saved in ../out/checkpoint-{k}",
        f"  5%|▌         | {k}/{n} [00:07<02:31,  7.97s/it]",
        f"{k}%|██████████| {k}/{n} [00:39<00:00,  1.78s/it]",
        f"{' ' * 40}",
        f"{{'loss': '{x}', 'grad_norm': '{y}', 'learning_rate': '{z}', 'epoch': '{k}'}}",
        f"{{'loss': {x}, 'grad_norm': {y}, 'learning_rate': {z}, 'epoch': {k}}}",
        f"{{'eval_loss': {x}, 'epoch': {y}}}",
        f"{{'train_runtime': '{x}', 'train_loss': '{y}', 'epoch': '{z}'}}",
        f"[transformers] Saving model checkpoint to out/checkpoint-{k}",
        f'{{"lorasup":1,"kind":"step","step":{k},"total":{n},"loss":{x},"lr":{y},"epoch":{z}}}',
        f'{{"lorasup":1,"kind":"step","step":"{k}","loss":"{x}","avg_loss":"{y}"}}',
        f'{{"lorasup":1,"kind":"resume","step":{k}}}',
        f'{{"lorasup":1,"kind":"epoch","epoch":{k},"total":{n}}}',
        f'{{"lorasup":1,"kind":"checkpoint","path":"out/{x}.safetensors","step":{k}}}',
        f'{{"lorasup":1,"kind":"problem","problem":{x},"line":{y}}}',
        f"step {k}/{n} loss={x} lr={y}",
        f"iter {k} loss={x}",
        f"Epoch {z}, Step {k}/{n}, Loss: {x}",
        f"Step {k} of {n} | loss: {x} | lr: {y}",
        f"RuntimeError: CUDA out of memory at step {k}",
        # generic bars and dict lines (trainers/bars.py)
        f"Training:  40%|████      | {k}/{n} [00:10<00:15,  {x}it/s, loss={y}, lr={z}]",
        f"train: {k}it [00:10,  {x}s/it, loss: {y}]",
        f"Training ━━━━━━━━━━━━━━━━━━━━ {k}/{n} 0:00:10 loss={x}",
        f"{k}/{n} ━━━━━━━━━━━━━━━━━━━━ 1s 10ms/step - loss: {x}\b\b\b",
        f"{k}/{n} [=====>........] - ETA: 15s - loss: {x} - lr: {y}",
        f"{{'loss': {x}, 'lr': {y}, 'step': {k}, 'epoch': {z}}}",
        f'{{"loss": "{x}", "step": "{k}"}}',
    ]


TEMPLATE_LINES = st.builds(_templates, NUMBERS, NUMBERS, NUMBERS, NUMBERS, NUMBERS).flatmap(
    lambda lines: st.lists(st.sampled_from(lines), min_size=1, max_size=12))
SEPARATORS = st.sampled_from(["\n", "\r", "\r\n", "\r\r\n", ""])


@pytest.mark.parametrize("name", ADAPTERS)
@given(lines=st.lists(st.text(max_size=200), max_size=20))
@SETTINGS
def test_any_text_line(name: str, lines: list[str]) -> None:
    adapter = make(name)
    for line in lines:
        check(adapter.parse(line))


@pytest.mark.parametrize("name", ADAPTERS)
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 4000), max_size=12))
@SETTINGS
def test_any_bytes_in_any_chunks(name: str, data: bytes, cuts: list[int]) -> None:
    feed(make(name), LineSplitter(max_line=512), cut(data, cuts))


@pytest.mark.parametrize("name", ADAPTERS)
@given(lines=TEMPLATE_LINES, seps=st.lists(SEPARATORS, min_size=12, max_size=12),
       cuts=st.lists(st.integers(0, 10**6), max_size=10))
@SETTINGS
def test_real_line_shapes_with_any_numbers(name: str, lines: list[str], seps: list[str],
                                           cuts: list[int]) -> None:
    data = "".join(line + sep for line, sep in zip(lines, seps, strict=False)).encode()
    feed(make(name), LineSplitter(), cut(data, cuts))
    adapter = make(name)
    for line in lines:  # and each line whole, as a single read would give it
        check(adapter.parse(line))


# --------------------------------------------------------------------- chunking invariance

VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(lambda v: f"{v:.4g}"),
    st.sampled_from(["nan", "inf", "1e400", "Infinity", "0", "1.08", "0.0001", "9" * 30]),
)


def _kohya(k: int, values: list[str]) -> str:
    previous = values[k - 2] if k > 1 else "nan"
    frame = "\rsteps:  {p:>3}%|#####     | {k}/{n} [00:01<00:01,  1.50s/it, avr_loss={v}]"
    out = frame.format(p=k * 100 // N, k=k, n=N, v=previous)
    out += frame.format(p=k * 100 // N, k=k, n=N, v=values[k - 1])
    return out + ("2026-11-27 21:44:30 INFO     model saved." if k == N else "")


def _diffusers(k: int, values: list[str]) -> str:
    frame = "\rSteps:  {p:>3}%|##        | {k}/{n} [00:01<00:06,  1.23it/s, lr={lr}, step_loss={v}]"
    return frame.format(p=k * 100 // N, k=k, n=N, lr="0.0001", v=values[k - 1])


def _native(k: int, values: list[str]) -> str:
    return (f'{{"lorasup":1,"kind":"step","step":{k},"total":{N},'
            f'"loss":"{values[k - 1]}","lr":1e-4,"epoch":1}}\n')


def _plain(k: int, values: list[str]) -> str:
    return f"\rstep {k}/{N} loss={values[k - 1]} lr=0.0001"


def _hf_bars(k: int, values: list[str]) -> str:
    return f"\r{k * 100 // N:>3}%|####      | {k}/{N} [00:07<02:31,  7.97s/it]"


#: adapter → how its trainer draws step k (the steps are 1, 2, ... as a trainer counts them)
STREAMS = {
    "kohya": _kohya, "diffusers": _diffusers, "native": _native, "builtin": _native,
    "command": _plain, "hf": _hf_bars,
}


def final_values(name: str, chunks: list[bytes]) -> dict[int, tuple]:
    """step → the values of the last Step the real gate admitted for it."""
    adapter = make(name)
    gate = StepGate(N, stop_at_limit=False, on_stop=lambda _reason: None,
                    on_limit=lambda: None)
    final: dict[int, tuple] = {}
    for event in feed(adapter, LineSplitter(), chunks):
        if isinstance(event, Step):
            admitted = gate.admit(event)
            if isinstance(admitted, Step):
                final[admitted.step] = tuple(
                    repr(v) for v in (admitted.total, admitted.loss, admitted.avg_loss,
                                      admitted.lr, admitted.epoch))
    return final


def test_every_adapter_has_a_chunking_stream() -> None:
    assert set(STREAMS) == set(ADAPTERS)


@pytest.mark.parametrize("name", ADAPTERS)
@given(values=st.lists(VALUES, min_size=N, max_size=N), steps=st.integers(1, N),
       cuts=st.lists(st.integers(0, 10**6), min_size=1, max_size=30))
@SETTINGS
def test_steps_and_their_final_values_do_not_depend_on_chunking(
        name: str, values: list[str], steps: int, cuts: list[int]) -> None:
    """The invariant, given the splitter's provisional frames (streams.py).

    A read that ends after a ``\\r`` hands out the unfinished line provisionally, and the
    finished line again only when it grew; so one chunking sees prefixes of lines that
    another does not, and a prefix may parse (``step 12 loss=0.5`` of ``... loss=0.53``).
    What holds for a trainer that counts its steps 1, 2, 3, ... and prints values after the
    step number: the set of steps the gate admits, and for each the values of the last Step
    admitted for it, are the same for every chunking of the same bytes. (A prefix cut inside
    the step number shows an earlier step and no values: the gate drops it; a prefix cut in
    a value is followed by the whole line, which the gate admits last. Bars and protocol
    lines are closed by ``]``/``}``, so no prefix of them parses at all.)
    """
    data = "".join(STREAMS[name](k, values) for k in range(1, steps + 1)).encode()
    whole = final_values(name, [data])
    assert sorted(whole) == list(range(1, steps + 1))
    assert final_values(name, cut(data, cuts)) == whole
    assert final_values(name, [data[i:i + 1] for i in range(len(data))]) == whole


def _hf_streams(steps: int, values: list[str], log_every: int) -> tuple[bytes, bytes]:
    """The Trainer's two pipes: bars and write marks on stderr, log dicts on stdout."""
    err, out = [], []
    for k in range(1, steps + 1):
        frame = f"{k * 100 // N:>3}%|####      | {k}/{N} [00:07<02:31,  7.97s/it]"
        err.append("\r" + frame)
        if k % log_every == 0:
            # tqdm.write: clear the bar, write the dict to stdout, redraw the bar
            err.append("\r" + " " * len(frame) + "\r" + frame)
            out.append(f"{{'loss': '{values[k - 1]}', 'grad_norm': '1.0', "
                       f"'learning_rate': '0.001', 'epoch': '{k / N:.4g}'}}\n")
    return "".join(err).encode(), "".join(out).encode()


@given(values=st.lists(VALUES, min_size=N, max_size=N), steps=st.integers(1, N),
       log_every=st.integers(1, 4), cuts_err=st.lists(st.integers(0, 10**6), max_size=20),
       cuts_out=st.lists(st.integers(0, 10**6), max_size=10),
       order=st.lists(st.booleans(), min_size=40, max_size=40))
@SETTINGS
def test_hf_steps_and_losses_do_not_depend_on_chunking_or_read_order(
        values: list[str], steps: int, log_every: int, cuts_err: list[int],
        cuts_out: list[int], order: list[bool]) -> None:
    """hf pairs the k-th write mark on stderr with the k-th dict on stdout, whichever pipe is
    read first: the steps and their final values are the same for any chunking of either
    pipe and any interleaving of the reads of the two."""
    err, out = _hf_streams(steps, values, log_every)

    def run(err_chunks: list[bytes], out_chunks: list[bytes], picks: list[bool]) -> dict:
        adapter = make("hf")
        gate = StepGate(N, stop_at_limit=False, on_stop=lambda _r: None, on_limit=lambda: None)
        splitters = {"err": LineSplitter(), "out": LineSplitter()}
        queues = {"err": list(err_chunks), "out": list(out_chunks)}
        final: dict[int, tuple] = {}

        def take(lines: list[str]) -> None:
            for line in lines:
                for event in check(adapter.parse(line)) if line else ():
                    admitted = gate.admit(event) if isinstance(event, Step) else None
                    if isinstance(admitted, Step):
                        final[admitted.step] = (repr(admitted.loss), repr(admitted.lr),
                                                admitted.epoch)

        picks = list(picks)
        while queues["err"] or queues["out"]:
            pick = picks.pop() if picks else True
            name = "err" if (pick and queues["err"]) or not queues["out"] else "out"
            take(splitters[name].feed(queues[name].pop(0), adapter.needles))
        for name in ("err", "out"):
            take(splitters[name].close())
        return final

    whole = run([err], [out], [True])
    assert sorted(whole) == list(range(1, steps + 1))
    logged = [k for k in whole if whole[k][0] != "None"]
    assert logged == [k for k in range(1, steps + 1) if k % log_every == 0]
    assert run(cut(err, cuts_err), cut(out, cuts_out), order) == whole
    assert run(cut(err, cuts_err), cut(out, cuts_out), [not b for b in order]) == whole


@pytest.mark.parametrize(("name", "line"), [
    ("kohya", "saving checkpoint: out/{}"),
    ("diffusers", "Model weights saved in out/checkpoint-3/{}"),
    ("hf", "[transformers] Saving model checkpoint to out/{}/checkpoint-3"),
    ("native", '{{"lorasup":1,"kind":"checkpoint","path":"out/{}","step":3}}'),
    ("command", '{{"lorasup":1,"kind":"checkpoint","path":"out/{}","step":3}}'),
])
def test_a_path_no_file_system_takes_is_no_checkpoint(name: str, line: str) -> None:
    """A checkpoint path longer than NAME_MAX/PATH_MAX would make the report's look-up fail
    (ENAMETOOLONG) at the end of the run: it is not taken as a checkpoint at all."""
    for too_long in ("x" * 256, "/".join(["y" * 200] * 21)):
        events = check(make(name).parse(line.format(too_long)))
        assert not [e for e in events if isinstance(e, Checkpoint)]
    [event] = [e for e in make(name).parse(line.format("x" * 255))
               if isinstance(e, Checkpoint)]
    assert "x" * 255 in event.path
