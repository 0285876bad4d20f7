"""Benchmark ``GET /jobs/<id>/series``'s fold: a 1,000,000-step ``events.jsonl``.

    python bench/bench_series.py [--steps 1000000] [--rounds 5] [--points 2000]

Writes the same file as ``tests/test_dashboard_series.py``'s million-step test (a
``started`` record, then one step record a line as ``events.step_json`` writes it, one NaN
loss) to a temporary directory, then times ``CurveCache().series`` there: the first fold
(a new cache each round, the whole file read) and the page's reload (the same cache again,
nothing new to read). Prints one JSON document: median and max of each over ``--rounds``,
with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from lorasup.supervisor.serve.curves import CurveCache

STARTED = '{"t":0.0,"kind":"started","wall_time":1700000000.0}\n'
NAN = '"nan"'


def write(path: Path, steps: int) -> None:
    """The test's file: ``steps`` step records, the loss at step 777,777 a NaN."""
    with path.open("w", encoding="utf-8") as fh:
        fh.write(STARTED)
        fh.writelines(
            f'{{"t":{step * 0.01!r},"kind":"step","step":{step},"total":{steps},"loss":'
            f'{NAN if step == 777_777 else repr(1.0 / step ** 0.1)},"lr":0.0001}}\n'
            for step in range(1, steps + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--points", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        write(run_dir / "events.jsonl", args.steps)
        size = (run_dir / "events.jsonl").stat().st_size
        first: list[float] = []
        reload: list[float] = []
        points = 0
        for _ in range(args.rounds):
            cache = CurveCache()
            started = time.perf_counter()
            out = cache.series(1, [run_dir], args.points)
            first.append(time.perf_counter() - started)
            started = time.perf_counter()
            cache.series(1, [run_dir], args.points)
            reload.append(time.perf_counter() - started)
            points = out["points"]
            if sum(out["count"]) != args.steps:
                raise SystemExit(f"folded {sum(out['count'])} steps, wrote {args.steps}")
    print(json.dumps({
        "steps": args.steps, "bytes": size, "points": points, "rounds": args.rounds,
        "first_fold_s": {"median": round(statistics.median(first), 3),
                         "max": round(max(first), 3)},
        "reload_s": {"median": round(statistics.median(reload), 4),
                     "max": round(max(reload), 4)},
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }, indent=2))


if __name__ == "__main__":
    main()
