"""Benchmark the builtin trainer: wall time and peak memory of a 200-step run.

    python bench/bench_builtin.py [--steps 200] [--runs 3] [--no-lorasup]

Each run starts in a fresh temporary folder (so the demo dataset is used and nothing is
resumed). Rows: the trainer alone (``python -m lorasup.trainers.builtin --steps N``), then the
same job under lorasup (``python -m lorasup start --steps N``), which the issue's
target (200 steps in at most 5 s, trainer RSS < 200 MB) is about. Peak RSS comes from
``getrusage(RUSAGE_CHILDREN)``: the largest child waited for so far, so the trainer rows
are measured before any lorasup process runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sample:
    wall: float
    returncode: int
    losses: list[float]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def run_once(argv: list[str]) -> Sample:
    with tempfile.TemporaryDirectory(prefix="bench-builtin-") as cwd:
        started = time.perf_counter()
        proc = subprocess.run(argv, cwd=cwd, env=_env(), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
    losses = [json.loads(line)["loss"] for line in proc.stdout.splitlines()
              if line.startswith('{"lorasup":1,"kind":"step"')]
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        print(f"  exit {proc.returncode}: {tail}", file=sys.stderr)
    return Sample(wall, proc.returncode, losses)


def peak_rss_mb() -> float:
    """ru_maxrss is KiB on Linux (bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-lorasup", action="store_true",
                        help="only the trainer alone (e.g. while the supervisor is broken)")
    args = parser.parse_args()

    steps = str(args.steps)
    rows: list[tuple[str, list[Sample], float]] = []
    trainer = [sys.executable, "-m", "lorasup.trainers.builtin", "--steps", steps, "--no-progress"]
    samples = [run_once(trainer) for _ in range(args.runs)]
    rows.append(("trainer alone", samples, peak_rss_mb()))
    if not args.no_lorasup:
        lorasup = [sys.executable, "-m", "lorasup", "start", "--steps", steps,
                   "--log-format", "json"]
        samples = [run_once(lorasup) for _ in range(args.runs)]
        rows.append(("lorasup start (end to end)", samples, peak_rss_mb()))

    print(f"builtin trainer, {args.steps} steps, {args.runs} runs each, "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print(f"{'what':<28} {'wall min':>9} {'median':>8} {'max':>8} {'steps/s':>8} "
          f"{'peak RSS':>9} {'ok':>4}")
    for name, samples, rss in rows:
        walls = [s.wall for s in samples]
        ok = sum(s.returncode == 0 for s in samples)
        print(f"{name:<28} {min(walls):>8.2f}s {statistics.median(walls):>7.2f}s "
              f"{max(walls):>7.2f}s {args.steps / statistics.median(walls):>8.0f} "
              f"{rss:>6.0f} MB {ok:>2}/{len(samples)}")
    losses = rows[0][1][0].losses
    if len(losses) >= 40:
        first = statistics.fmean(losses[:20])
        last = statistics.fmean(losses[-20:])
        print(f"loss (trainer alone, run 1): first 20 steps {first:.4f}, last 20 steps "
              f"{last:.4f} (ratio {last / first:.2f})")
    print("(peak RSS of lorasup rows is the largest process seen, lorasup or trainer)")
    return 0 if all(s.returncode == 0 for _, samples, _ in rows for s in samples) else 1


if __name__ == "__main__":
    raise SystemExit(main())
