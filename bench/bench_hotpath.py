"""Where a firehose step's CPU goes inside lorasup, stage by stage, with no pipes or disk.

    python bench/bench_hotpath.py [--steps 1000000]

The firehose's bytes (``bench/firehose.py``'s lines: one kohya frame per step) are made in
memory, cut into 64 KiB reads, and pushed through the engine's own code one stage at a
time: splitting and scanning (``LineSplitter.feed_fast`` with kohya's ``fast_bar``), the
step blocks (``int``/``float`` of the columns and the events.jsonl lines), and the report
builder (window, fold into the O(1) summary, losses.csv text). Printed: microseconds per
step for each stage, then the floors no pure-Python rewrite of a stage gets under: the
bare frame regex alone, ``repr`` of a float with 17 digits, ``%.8g`` of one. Compare with
the writer alone (``python bench/firehose.py --steps N 2>/dev/null``: about 2 us a line on
the 2-core box), which lorasup has to keep up with on the other core.
"""

from __future__ import annotations

import argparse
import time

from lorasup.supervisor.fastbars import FastBars, Frames, StepBlock, floats
from lorasup.supervisor.report import ReportBuilder
from lorasup.supervisor.streams import LineSplitter
from lorasup.trainers.kohya import FAST_BAR, KohyaAdapter

READ = 64 * 1024


def firehose(steps: int) -> bytes:
    width = len(str(steps))
    return b"".join(
        f"steps:  50%|█████     | {step:>{width}}/{steps} "
        f"[00:10<00:10,  1.50s/it, avr_loss={1.0 + (step % 97) / 1000:.3f}]\n".encode()
        for step in range(1, steps + 1))


def per_step(seconds: float, steps: int) -> str:
    return f"{seconds / steps * 1e6:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1_000_000)
    args = parser.parse_args()
    n = args.steps
    data = firehose(n)
    reads = [data[i:i + READ] for i in range(0, len(data), READ)]
    needles = tuple(KohyaAdapter.needles)
    rows: list[tuple[str, str]] = []

    splitter, fast = LineSplitter(), FastBars(FAST_BAR)
    start = time.perf_counter()
    items = [splitter.feed_fast(chunk, needles, fast) for chunk in reads]
    rows.append(("split + scan (one regex per read)", per_step(time.perf_counter() - start, n)))

    start = time.perf_counter()
    blocks = []
    for t, found in enumerate(items):
        for item in found:
            if type(item) is Frames:
                columns = item.columns
                values = {name: floats(columns.get(name)) for name in ("loss", "avg_loss", "lr")}
                blocks.append(StepBlock(t * 1e-3, list(map(int, columns["step"])), columns,
                                        values))
    rows.append(("step blocks (int/float, events.jsonl lines)",
                 per_step(time.perf_counter() - start, n)))

    csv_bytes = 0

    def csv_out(text: bytes) -> None:
        nonlocal csv_bytes
        csv_bytes += len(text)

    builder = ReportBuilder(csv_out=csv_out)
    start = time.perf_counter()
    for block in blocks:
        block.feed(builder)
    builder.finish_csv()
    rows.append(("report builder (window, fold, losses.csv text)",
                 per_step(time.perf_counter() - start, n)))
    total = sum(float(value) for _, value in rows)
    rows.append(("**all stages**", f"{total:.2f}"))

    body = data[: data.rfind(b"\n", 0, 8 * READ) + 1]
    lines = body.count(b"\n")
    start = time.perf_counter()
    for _ in range(5):
        FAST_BAR.findall(body)
    rows.append(("floor: the bare frame regex (findall)",
                 per_step((time.perf_counter() - start) / 5, lines)))
    values = [0.1 + i * 1e-9 / 3 for i in range(100_000)]
    start = time.perf_counter()
    list(map(repr, values))
    rows.append(("floor: repr of a 17-digit float", per_step(time.perf_counter() - start,
                                                            len(values))))
    start = time.perf_counter()
    ("%.8g," * len(values)) % tuple(values)
    rows.append(("floor: %.8g of a float (the EMA column)",
                 per_step(time.perf_counter() - start, len(values))))

    print(f"{n:,} steps, {len(reads):,} reads of 64 KiB, losses.csv {csv_bytes / 1e6:.1f} MB")
    print("| stage | us per step |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
