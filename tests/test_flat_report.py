"""The report stays O(1) in the run's length: running statistics, buckets, a bounded
report.json, the streaming rebuild, and statistics that never overflow."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorasup.supervisor.events import Scalar, Started, Step, step_json
from lorasup.supervisor.report import (
    BUCKETS,
    EMA_ALPHA,
    WINDOW,
    ReportBuilder,
    _dumps,
    load,
    rebuild,
)
from lorasup.supervisor.summary import Buckets, Stats


def loss_of(step: int) -> float:
    return 2.0 / (1 + step / 500) + (step % 7) * 0.01


def long_run(steps: int, per_read: int = 37) -> ReportBuilder:
    """A run fed like the live sink feeds it: blocks of steps sharing one read time."""
    builder = ReportBuilder()
    builder.add(json.loads(Started(run_id="r", trainer="diffusers", argv=("x",), pid=1,
                                   steps_requested=steps, wall_time=0.0).to_json(0.0)))
    for first in range(1, steps + 1, per_read):
        block = list(range(first, min(first + per_read, steps + 1)))
        builder.add_steps(first * 0.01, block, loss=[loss_of(s) for s in block],
                          lr=[1e-4] * len(block))
    return builder


def test_a_long_run_is_bucketed_and_its_statistics_are_exact() -> None:
    steps = 20_000
    report = long_run(steps).snapshot()
    values = [loss_of(s) for s in range(1, steps + 1)]
    loss = report["loss"]
    assert loss["count"] == steps and loss["nonfinite"] == 0
    assert loss["mean"] == pytest.approx(statistics.fmean(values), rel=1e-12)
    assert loss["std"] == pytest.approx(statistics.stdev(values), rel=1e-9)
    assert loss["min"] == min(values) and loss["min_step"] == values.index(min(values)) + 1
    assert loss["max"] == max(values) and loss["max_step"] == values.index(max(values)) + 1
    assert loss["first"] == values[0] and loss["final"] == values[-1]
    series = report["series"]
    sampling = series["sampling"]
    assert sampling["method"] == "buckets" and sampling["bucket_steps"] == 16
    assert len(series["step"]) == sampling["points"] <= BUCKETS
    assert series["step"][-1] == steps and report["steps"]["last"] == steps
    assert report["steps"]["first"] == 1 and report["steps"]["recorded"] == steps
    # each point: the bucket's last value and its finite min/max
    width = sampling["bucket_steps"]
    for i in (0, 7, len(series["step"]) - 1):
        last = series["step"][i]
        bucket = values[(last - 1) // width * width:last]
        assert series["loss"][i] == values[last - 1]
        assert series["envelope"]["loss"]["min"][i] == min(bucket)
        assert series["envelope"]["loss"]["max"][i] == max(bucket)
    # the EMA of the whole run, in step order
    ema = None
    for v in values:
        ema = v if ema is None else EMA_ALPHA * v + (1 - EMA_ALPHA) * ema
    assert series["ema_loss"][-1] == pytest.approx(ema, rel=1e-12)
    json.dumps(report, allow_nan=False)


def test_runs_up_to_the_bucket_count_keep_every_step() -> None:
    report = long_run(BUCKETS).snapshot()
    assert report["series"]["sampling"]["method"] == "every_step"
    assert report["series"]["step"] == list(range(1, BUCKETS + 1))
    assert report["series"]["loss"] == [loss_of(s) for s in range(1, BUCKETS + 1)]
    bucketed = long_run(BUCKETS + 1).snapshot()
    assert bucketed["series"]["sampling"]["method"] == "buckets"


def test_report_json_stays_small_however_long_the_run() -> None:
    builder = long_run(300_000, per_read=800)
    for tag in ("lr/unet", "lr/te1", "lr/te2"):
        for step in range(299_000, 300_001, 10):
            builder.add({"t": 3000.0, "kind": "scalar", "tag": tag, "step": step,
                         "value": 1e-4, "source": "tensorboard"})
    for step in range(1, 300_001, 50):
        builder.add({"t": 1.0, "kind": "scalar", "tag": "grad_norm", "step": step,
                     "value": step * 1.5, "source": "tensorboard"})
    report = builder.snapshot()
    size = len(_dumps(report))
    assert size < 1_000_000, size
    other = report["series"]["other"]["grad_norm"]
    assert len(other["step"]) <= 256 and other["step"][-1] == 299_951
    assert other["sampling"]["method"] == "buckets"


def test_two_huge_finite_losses_do_not_overflow() -> None:
    builder = ReportBuilder()
    for step, value in enumerate([1e308, 1e308], start=1):
        builder.add(json.loads(Step(step=step, loss=value).to_json(float(step))))
    loss = builder.snapshot()["loss"]
    assert loss["mean"] == 1e308 and loss["std"] == 0.0
    stats = Stats()
    stats.add_column([1, 2, 3, 4], [1.7e308, -1.7e308, 1.7e308, 5.0])
    assert math.isfinite(stats.mean)  # type: ignore[arg-type]
    assert stats.std == pytest.approx(statistics.stdev([x / 2**1000 for x in
                                       [1.7e308, -1.7e308, 1.7e308, 5.0]]) * 2**1000)


@given(st.lists(st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
                min_size=1, max_size=60), st.integers(1, 5))
@settings(max_examples=150, deadline=None)
def test_stats_match_a_plain_computation(values: list[float | None], blocks: int) -> None:
    stats = Stats()
    steps = list(range(1, len(values) + 1))
    size = max(1, len(values) // blocks)
    for i in range(0, len(values), size):
        stats.add_column(steps[i:i + size], values[i:i + size])
    reported = [v for v in values if v is not None]
    finite = [v for v in reported if math.isfinite(v)]
    assert stats.count == len(reported) and stats.nonfinite == len(reported) - len(finite)
    if finite:
        assert stats.min == min(finite) and stats.max == max(finite)
        scaled = [v / 2**600 for v in finite]  # fmean of the scaled values cannot overflow
        # A streaming mean is exact to a few ulps of the largest value, not of the mean:
        # 6.1e-05, 7.6e-19, -6.1e-05 cancel to a mean of 2.5e-19 known only to ~1e-20.
        assert stats.mean / 2**600 == pytest.approx(
            statistics.fmean(scaled), rel=1e-6, abs=1e-300 + 1e-12 * max(map(abs, scaled)))
    else:
        assert stats.mean is None and stats.min is None


def test_two_steps_in_one_read_never_make_a_zero_pace() -> None:
    builder = ReportBuilder()
    builder.add_steps(1.0, [1, 2])
    builder.add_steps(3.0, [3, 4])
    builder.add_steps(4.0, [5])
    series = builder.snapshot()["series"]
    assert series["s_per_step"] == [None, None, None, 1.0, 1.0]


def test_a_value_older_than_the_window_is_counted_not_applied() -> None:
    builder = long_run(3 * WINDOW, per_read=100)
    builder.add({"t": 99.0, "kind": "scalar", "tag": "train_loss", "step": 3,
                 "value": 42.0, "source": "tensorboard"})
    report = builder.snapshot()
    assert report["loss"]["max"] != 42.0
    assert any("already summarised" in note for note in report["notes"])


def test_tensorboard_values_within_the_window_win_in_a_long_run() -> None:
    builder = long_run(3 * WINDOW, per_read=100)
    last = 3 * WINDOW
    builder.add(json.loads(Scalar(tag="train_loss", step=last, value=0.123,
                                  source="tensorboard").to_json(99.0)))
    report = builder.snapshot()
    assert report["loss"]["final"] == 0.123
    assert report["series"]["sources"]["loss"] == "tensorboard+console"


def test_buckets_double_and_keep_min_max_last() -> None:
    buckets = Buckets(count=4)
    steps = list(range(1, 10))
    segments = buckets.segments(steps)
    buckets.add_rows(segments, steps, [None] * 9, [None] * 9)
    buckets.add_column("x", segments, [float(s) for s in steps])
    assert buckets.width == 4
    low, high, last = buckets.series["x"]
    assert (low[:3], high[:3], last[:3]) == ([1.0, 5.0, 9.0], [4.0, 8.0, 9.0], [4.0, 8.0, 9.0])
    assert buckets.step[:3] == [4, 8, 9]


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def test_rebuild_streams_and_survives_junk(tmp_path: Path) -> None:
    lines = [Started(run_id="r", trainer="kohya", argv=("x",), pid=1, steps_requested=5000,
                     wall_time=0.0).to_json(0.0).encode() + b"\n"]
    lines += [Step(step=s, total=5000, avg_loss=1.0 + s % 3).to_json(s * 0.01).encode() + b"\n"
              for s in range(1, 5001)]
    lines.insert(100, b"\xff\xfe not json\n")
    lines.insert(200, b'{"t":1,"kind":"step","step":1' + b"9" * 5000 + b'}\n')
    lines.insert(300, b'{"t":1,"kind":"step","step":12,"loss":1e400}\n')
    lines.insert(400, b'{"t":"x","kind":"scalar","tag":"loss","step":-5,"value":"inf"}\n')
    lines.insert(500, b"[1, 2]\n")
    lines.append(b'{"t":99,"kind":"outcome","outcome":"completed","exit_co')  # cut off
    write_lines(tmp_path / "events.jsonl", lines)
    report = rebuild(tmp_path)
    assert report["steps"]["recorded"] == 5000 and report["steps"]["last"] == 5000
    assert report["series"]["sampling"]["method"] == "buckets"
    assert report["loss"]["basis"] == "loss"  # the 1e400 line is a (non-finite) loss
    assert report["loss"]["nonfinite"] == 1
    # undecodable, a 5000-digit number, not an object, the cut-off last line
    assert any("4 line(s) skipped" in n for n in report["notes"]), report["notes"]
    assert any("could not be interpreted" in n for n in report["notes"])
    with (tmp_path / "losses.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert len(rows) == 5001 and rows[1][0] == "1" and rows[-1][0] == "5000"
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert not list(tmp_path.glob(".*.tmp"))


@given(st.binary(max_size=3000))
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_bytes_make_a_report(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"t":0,"kind":"step","step":1,"loss":0.5}\n' + data)
    report = load(tmp_path).snapshot()
    json.dumps(report, allow_nan=False)


@given(st.lists(st.dictionaries(
    st.sampled_from(["t", "kind", "step", "loss", "avg_loss", "lr", "epoch", "tag", "value",
                     "source", "total", "message", "pids", "path"]),
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
              st.text(max_size=5), st.sampled_from(["step", "scalar", "epoch", "inf", "nan"]),
              st.lists(st.integers(), max_size=3))), max_size=40))
@settings(max_examples=150, deadline=None)
def test_any_records_never_raise(records: list[dict]) -> None:
    builder = ReportBuilder()
    for record in records:
        builder.add(record)
    json.dumps(builder.snapshot(), allow_nan=False)


def test_absurd_times_in_step_lines_are_no_times(tmp_path: Path) -> None:
    (tmp_path / "events.jsonl").write_bytes(
        b'{"t":1e400,"kind":"step","step":1,"loss":1e400}\n'
        b'{"t":-1e400,"kind":"step","step":2,"loss":0.5}\n'
        b'{"t":3,"kind":"step","step":99999999999999999999999,"loss":0.5}\n')
    report = load(tmp_path).snapshot()
    json.dumps(report, allow_nan=False)
    assert report["series"]["t"] == [None, None]
    assert report["timing"]["duration_s"] == 3.0
    assert report["loss"]["nonfinite"] == 1 and report["steps"]["recorded"] == 2


def test_status_and_report_commands_survive_huge_losses_and_junk(tmp_path: Path) -> None:
    import subprocess

    from support import child_env, lorasup_argv

    (tmp_path / "events.jsonl").write_bytes(
        b'{"t":0,"kind":"started","run_id":"r","trainer":"command","argv":["x"],"pid":1,'
        b'"steps_requested":3,"wall_time":0}\n'
        b'{"t":1,"kind":"step","step":1,"loss":1e308}\n'
        b'{"t":2,"kind":"step","step":2,"loss":1e308}\n'
        b'\x00\xff junk\n{"t":3,"kind":"step","step":3,"loss":1' + b"0" * 5000 + b'}\n'
        b'{"t":4,"kind":"outcome","outcome":"completed","exit_code":0,"reason":"ok"}\n'
        b'{"t":5,"kind":"no')
    for command in ("status", "report"):
        proc = subprocess.run(lorasup_argv(command, str(tmp_path)), capture_output=True,
                              text=True, timeout=60, env=child_env())
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        data = json.loads(proc.stdout.splitlines()[-1])
        assert data["outcome"] == "completed" and data["steps"]["recorded"] == 2
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["loss"]["mean"] == 1e308 and report["loss"]["std"] == 0.0


_FIELD = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                   st.floats(min_value=-3, max_value=3))


@given(st.lists(st.one_of(
    st.builds(lambda s, loss, avg, lr, e: Step(step=s, total=50, loss=loss, avg_loss=avg, lr=lr,
                                               epoch=e),
              st.integers(min_value=0, max_value=60), _FIELD, _FIELD, _FIELD,
              st.one_of(st.none(), st.integers(min_value=1, max_value=3))),
    st.builds(lambda s, v: Scalar(tag="train/loss", step=s, value=v),
              st.integers(min_value=0, max_value=60), _FIELD.filter(lambda v: v is not None)),
), max_size=80), st.integers(min_value=0, max_value=5), st.booleans())
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_the_bulk_reader_reads_what_line_by_line_json_reads(tmp_path: Path, events: list,
                                                            resumed: int, ordered: bool) -> None:
    """``lorasup report``'s bulk reader of the sink's own step lines gives the report that
    json.loads of every line gives: repeats, late steps, steps outside the range, odd
    values, other records between them."""
    lines = [Started(run_id="r", trainer="kohya", argv=("x",), pid=1, steps_requested=40,
                     wall_time=0.0).to_json(0.0)]
    if resumed:
        lines.append(json.dumps({"t": 0.01, "kind": "resumed", "step": resumed}))
    if ordered:  # long runs of increasing steps: what the bulk reader takes at once
        events = sorted(events, key=lambda event: event.step)
    for i, event in enumerate(events):
        t = round(0.1 + i * 0.05, 6)
        lines.append(step_json(t, event) if type(event) is Step else event.to_json(t))
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")
    by_line = ReportBuilder()
    for line in lines:
        by_line.add(json.loads(line))
    assert _dumps(load(tmp_path).snapshot()) == _dumps(by_line.snapshot())
