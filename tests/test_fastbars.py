"""The bar-frame fast path gives exactly what the per-line path gives, for any chunking."""

from __future__ import annotations

import itertools
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from lorasup.supervisor.events import Step
from lorasup.supervisor.fastbars import FastBars, Frames, StepBlock, floats
from lorasup.supervisor.streams import LineSplitter
from lorasup.trainers.diffusers import DiffusersAdapter
from lorasup.trainers.kohya import KohyaAdapter

ADAPTERS = {"kohya": KohyaAdapter(), "diffusers": DiffusersAdapter()}


def frame(kind: str, step: int, total: int, value: str | None, lr: str | None) -> str:
    if kind == "kohya":
        head = f"steps:  {step * 100 // max(total, 1)}%|███▌      | {step}/{total} "
        post = f", avr_loss={value}" if value is not None else ""
        return head + f"[00:04<00:13,  1.50s/it{post}]"
    head = f"Steps:  {step * 100 // max(total, 1)}%|███▌      | {step}/{total} "
    post = (f", lr={lr}" if lr is not None else "") + (
        f", step_loss={value}" if value is not None else "")
    return head + f"[00:04<00:13,  1.23it/s{post}]"


values = st.one_of(st.none(), st.sampled_from(["1.16", "0.000123", "1.2e-05", "nan", "inf",
                                               "1e400", "007", "-0.5", "1e+03", "x"]),
                   st.floats(allow_nan=False, allow_infinity=False).map(repr))
texts = st.sampled_from(["INFO model saved.", "epoch 1/2", "saving checkpoint: out/a.safetensors",
                         "Traceback (most recent call last):", "plain log line", "",
                         "Model weights saved in out/x", "caché ✓", "steps: nothing"])
pieces = st.lists(st.one_of(
    st.tuples(st.just("frame"), st.integers(0, 30), st.integers(1, 30), values,
              st.sampled_from([None, "0.0001", "nan"])),
    st.tuples(st.just("text"), texts)), min_size=1, max_size=30)
terminators = st.lists(st.sampled_from(["\n", "\r", "\r\n", ""]), min_size=30, max_size=30)


def stream(kind: str, parts: list[tuple], ends: list[str]) -> bytes:
    out = []
    for part, end in zip(parts, ends, strict=False):
        if part[0] == "frame":
            out.append(("\r" if end == "\r" else "") + frame(kind, *part[1:]))
        else:
            out.append(part[1])
        out.append(end or "\n")
    return "".join(out).encode()


def events(kind: str, data: bytes, cuts: list[int], fast: bool) -> list[object]:
    adapter = ADAPTERS[kind]
    splitter = LineSplitter()
    scanner = FastBars(adapter.fast_bar)
    found: list[object] = []
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    for chunk in chunks:
        items = (splitter.feed_fast(chunk, adapter.needles, scanner) if fast
                 else splitter.feed(chunk, adapter.needles))
        for item in items:
            if isinstance(item, Frames):
                cols = item.columns
                vals = {name: floats(cols.get(name)) for name in ("loss", "avg_loss", "lr")}
                for i, step in enumerate(cols["step"]):
                    found.append(Step(step=int(step), total=int(cols["total"][i]),
                                      **{k: v[i] if v else None for k, v in vals.items()}))
            else:
                found.extend(adapter.parse(item))
    for line in splitter.close():
        found.extend(adapter.parse(line))
    return found


def same(a: list[object], b: list[object]) -> bool:
    """Equal events, NaN equal to NaN."""
    return json.dumps([e.to_dict() for e in a]) == json.dumps([e.to_dict() for e in b])


@given(st.sampled_from(sorted(ADAPTERS)), pieces, terminators,
       st.lists(st.integers(0, 5000), max_size=8))
@settings(max_examples=300, deadline=None)
def test_fast_path_gives_the_same_events_for_any_chunking(kind: str, parts: list[tuple],
                                                          ends: list[str],
                                                          cuts: list[int]) -> None:
    data = stream(kind, parts, ends)
    slow = events(kind, data, cuts, fast=False)
    quick = events(kind, data, cuts, fast=True)
    assert same(quick, slow)


def test_a_firehose_chunk_is_one_run_of_frames() -> None:
    adapter = ADAPTERS["kohya"]
    data = "".join(frame("kohya", s, 1000, "1.16", None) + "\n" for s in range(1, 501)).encode()
    items = LineSplitter().feed_fast(data, adapter.needles, FastBars(adapter.fast_bar))
    assert len(items) == 1 and isinstance(items[0], Frames) and len(items[0]) == 500


def test_step_block_lines_are_the_sink_s_step_lines() -> None:
    columns = {"step": [b"7", b"8"], "total": [b"10", b"10"], "avg_loss": [b"1.16", b""],
               "loss": [b"", b""], "lr": [b"", b""]}
    block = StepBlock(1.25, [7, 8], columns, {"avg_loss": [1.16, None]})
    lines = [json.loads(line) for line in block.lines.splitlines()]
    assert lines == [json.loads(Step(step=7, total=10, avg_loss=1.16).to_json(1.25)),
                     json.loads(Step(step=8, total=10).to_json(1.25))]
    same_keys = {"step": [b"1", b"2"], "total": [b"2", b"2"], "avg_loss": [b"0.5", b"1e-05"]}
    lines = StepBlock(0.5, [1, 2], same_keys, {}).lines.splitlines()
    assert [json.loads(x)["avg_loss"] for x in lines] == [0.5, 1e-05]
