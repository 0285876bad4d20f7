"""The report sink on its own: events.jsonl appended as batches come, report.json refreshed
while the run goes on, final files at the end."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasup.supervisor.events import Outcome, Started, Step
from lorasup.supervisor.report import ReportBuilder
from lorasup.supervisor.sink import ReportSink, _add_steps


async def until(condition, timeout: float = 10.0) -> None:
    """Wait for the sink task to catch up, with a deadline."""
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.005)


def last_event(path: Path) -> dict:
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else {}


def test_report_is_refreshed_during_the_run_and_written_at_the_end(tmp_path: Path) -> None:
    seen_during_run: list[dict] = []

    async def main() -> None:
        sink = ReportSink(tmp_path, lambda: [], refresh_seconds=0.05)
        send, receive = anyio.create_memory_object_stream(4)
        async with anyio.create_task_group() as tg:
            tg.start_soon(sink.run, receive)
            async with send:
                await send.send([(0.0, Started(run_id="r", trainer="kohya", argv=("x",), pid=1,
                                              steps_requested=3, wall_time=0.0))])
                for step in (1, 2):
                    await send.send([(float(step), Step(step=step, avg_loss=1.0 / step))])
                    # events.jsonl is flushed per batch: readable before the run ends
                    await until(lambda s=step: last_event(tmp_path / "events.jsonl")
                                .get("step") == s)
                with anyio.fail_after(10):
                    while not (tmp_path / "report.json").exists():
                        await anyio.sleep(0.01)
                        await send.send([(2.5, Step(step=2, avg_loss=0.5))])
                seen_during_run.append(json.loads((tmp_path / "report.json").read_text()))
                await send.send([(3.0, Step(step=3, avg_loss=0.25)),
                                 (3.1, Outcome(outcome="completed", exit_code=0, reason="ok"))])

    anyio.run(main)
    assert seen_during_run[0]["outcome"] is None
    assert seen_during_run[0]["steps"]["last"] == 2
    final = json.loads((tmp_path / "report.json").read_text())
    assert final["outcome"] == "completed"
    assert final["series"]["step"] == [1, 2, 3]
    assert (tmp_path / "losses.csv").is_file()
    assert (tmp_path / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


_VALUE = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                   st.floats(min_value=-10, max_value=10))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=40), _VALUE, _VALUE, _VALUE,
                          st.one_of(st.none(), st.integers(min_value=0, max_value=3))),
                min_size=1, max_size=60))
def test_a_batch_of_parsed_steps_reports_what_the_steps_one_by_one_report(
        rows: list[tuple[int, float | None, float | None, float | None, int | None]]) -> None:
    """The sink hands a batch's parsed steps to the report in one call; repeated, late and
    out-of-order steps and odd values give the same report, CSV and lines as one by one."""
    steps = [(0.5 + i * 0.25, Step(step=s, total=40, loss=loss, avg_loss=avg, lr=lr, epoch=e))
             for i, (s, loss, avg, lr, e) in enumerate(rows)]
    bulk_csv: list[bytes] = []
    single_csv: list[bytes] = []
    bulk, single = ReportBuilder(csv_out=bulk_csv.append), ReportBuilder(csv_out=single_csv.append)
    for builder in (bulk, single):
        builder.add({"t": 0.0, "kind": "started", "run_id": "r", "trainer": "native",
                     "steps_requested": 40})
    lines = _add_steps(bulk, steps)
    one_by_one = b"".join(_add_steps(single, [step]) for step in steps)
    assert lines == one_by_one
    for builder in (bulk, single):
        builder.finish_csv()
    assert bulk_csv == single_csv
    assert json.dumps(bulk.snapshot(), sort_keys=True) == json.dumps(single.snapshot(),
                                                                     sort_keys=True)
