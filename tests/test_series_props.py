"""The series' bulk path (serve/curves.py ``_steps``: one regex pass, time and lr read only
where a bucket needs them) folds exactly what the line-by-line path folds, for any step
history: gaps, repeated and out-of-order steps, NaN/inf losses, loss or avg_loss, lr on all,
some or none of the steps (some of them NaN), epochs or none, other records in between, and
blocks cut anywhere."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasup.supervisor.events import Step, step_json
from lorasup.supervisor.serve import curves
from lorasup.supervisor.serve.curves import CurveCache, Curves

STARTED = '{"t":0.0,"kind":"started","wall_time":1700000000.0}\n'

numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                    st.floats(allow_nan=False, allow_infinity=False))
rows = st.lists(st.tuples(
    st.sampled_from([0, 1, 1, 1, 2, 5]),             # gap to the previous step (0: repeat)
    numbers,                                         # the loss
    st.booleans(),                                   # written as avg_loss instead
    st.one_of(st.floats(1e-7, 1e-2), st.just(math.nan), st.none()),  # lr
    st.sampled_from([0.0, 0.0, 0.01, 1.5]),          # time since the previous record
), min_size=1, max_size=400)


def history(draw: list[tuple[int, Any, bool, Any, float]], lr_mode: str, epochs: bool,
            others: int, backwards: int, lossless: int) -> str:
    out, step, t = [STARTED], 0, 0.0
    for i, (gap, loss, avg, lr, dt) in enumerate(draw):
        if lossless and i % lossless == 1:
            loss = None  # a step record without a loss (the line path's business)
        step += gap
        t += dt
        shown = step - backwards if backwards and i == len(draw) // 2 else step
        lr_value = {"all": lr if lr is not None else 1e-4, "none": None, "some": lr}[lr_mode]
        out.append(step_json(t, Step(
            step=max(shown, 0), total=len(draw) * 3 if i % 3 else None,
            loss=None if avg else loss, avg_loss=loss if avg else None, lr=lr_value,
            epoch=step // 7 + 1 if epochs else None)) + "\n")
        if others and i % others == 0:
            out.append(json.dumps({"t": t, "kind": "checkpoint", "step": step,
                                   "path": f"c{i}"}, separators=(",", ":")) + "\n")
    return "".join(out)


def folded(path: Path, bulk: bool, block: int) -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(curves, "READ_BLOCK", block)
        cache = CurveCache()
        if not bulk:
            patch.setattr(Curves, "_steps",
                          lambda self, attempt, segment, lines=None: self._slowly(
                              attempt, segment))
        return cache.series(1, [path.parent], 500)


def close(a: Any, b: Any) -> bool:
    """Means: a bucket's sum is added up in another order by each path."""
    return len(a) == len(b) and all(
        x == y or (x is not None and y is not None
                   and math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-300))
        for x, y in zip(a, b, strict=True))


@settings(max_examples=200, deadline=None)
@given(rows, st.sampled_from(["all", "none", "some"]), st.booleans(),
       st.sampled_from([0, 0, 3, 40]), st.sampled_from([0, 0, 0, 3]),
       st.sampled_from([0, 0, 0, 50]), st.sampled_from([1024, 4096, curves.READ_BLOCK]))
def test_property_bulk_path_folds_what_the_line_path_folds(
        tmp_path_factory: pytest.TempPathFactory, draw: list[Any], lr_mode: str,
        epochs: bool, others: int, backwards: int, lossless: int, block: int) -> None:
    path = tmp_path_factory.mktemp("s") / "events.jsonl"
    path.write_text(history(draw, lr_mode, epochs, others, backwards, lossless),
                    encoding="utf-8")
    fast, slow = folded(path, True, block), folded(path, False, block)
    # s_per_step is the one field folded differently on purpose: the bulk path takes one
    # pace per bucket (its time over its steps), the line path one per step record
    fast.pop("s_per_step", None)
    slow.pop("s_per_step", None)
    assert fast.keys() == slow.keys()
    assert close(fast.pop("mean"), slow.pop("mean"))
    if "epochs" in fast:
        assert close(fast["epochs"].pop("mean"), slow["epochs"].pop("mean"))
    for key in fast:  # everything else exactly: steps, counts, extremes, lr, t, markers
        assert fast[key] == slow[key], (key, fast[key], slow[key])
    losses = [loss for i, (_, loss, _, _, _) in enumerate(draw)
              if not (lossless and i % lossless == 1)]
    assert sum(fast["count"]) == len(losses)
    assert sum(fast["nonfinite"]) == sum(not math.isfinite(v) for v in losses)
