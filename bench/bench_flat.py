"""Flat cost in run length: the 1-step-per-line firehose, `lorasup report`, start-up.

    python bench/bench_flat.py [--steps 10000,100000,1000000] [--rounds 2] [--json FILE]
                               [--only firehose,report,startup]

Prints a markdown table. What is measured (issue 8's table):

- firehose: ``bench/firehose.py`` (one kohya frame per step, ``\\n``-terminated, one write
  per line) (a) alone, output to /dev/null, and (b) under ``lorasup start --trainer kohya
  --steps S``, interleaved round by round. Ratio = lorasup's whole wall time ÷ the writer
  alone; "while it runs" = the trainer's duration under lorasup (``exited.t − started.t``)
  ÷ alone; "after exit" = lorasup's end − the trainer's exit (wall clock); peak RSS of
  lorasup's own pid and of its plot child (psutil, every 50 ms); report.json's size.
- report: ``lorasup report RUN`` on the firehose runs: wall time and peak RSS (its pid;
  the plot child separately).
- startup: ``lorasup --help`` and ``python -c pass`` (median of 15, interleaved);
  ``lorasup start --trainer command --steps 1 -- true`` whole (median of 5).

Everything runs in a temporary folder that is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
MB = 1024 * 1024


def lorasup() -> list[str]:
    script = Path(PY).parent / "lorasup"
    return [str(script)] if script.exists() else [PY, "-m", "lorasup"]


class Peak(threading.Thread):
    """Peak RSS of a pid and, separately, of its children whose argv contains ``marker``."""

    def __init__(self, pid: int, marker: str = "lorasup.supervisor.plot") -> None:
        super().__init__(daemon=True)
        self.pid, self.marker = pid, marker
        self.own = 0
        self.child = 0
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            proc = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.stop.is_set():
            try:
                self.own = max(self.own, proc.memory_info().rss)
                for child in proc.children():
                    try:
                        if self.marker in " ".join(child.cmdline()):
                            self.child = max(self.child, child.memory_info().rss)
                    except psutil.Error:
                        continue
            except psutil.Error:
                return
            time.sleep(0.05)


def timed(argv: list[str], *, cwd: Path, timeout: float, stdout: Any = subprocess.DEVNULL,
          env: dict[str, str] | None = None) -> tuple[float, int, Peak]:
    began = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=stdout, stderr=subprocess.DEVNULL, env=env)
    peak = Peak(proc.pid)
    peak.start()
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    ended = time.monotonic()
    peak.stop.set()
    peak.join()
    return ended - began, code, peak


def firehose(steps: int, rounds: int, work: Path) -> dict[str, Any]:
    writer = [PY, str(REPO / "bench" / "firehose.py"), "--steps", str(steps)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    alone: list[float] = []
    under: list[dict[str, Any]] = []
    for i in range(rounds):
        wall, _, _ = timed([*writer, "--stream", "stdout"], cwd=work, timeout=600, env=env)
        alone.append(wall)
        run_dir = work / f"run-{steps}-{i}"
        argv = [*lorasup(), "start", "--trainer", "kohya", "--steps", str(steps), "--run-dir",
                str(run_dir), "--log-format", "json", "--", *writer]
        wall, code, peak = timed(argv, cwd=work, timeout=900)
        ended = time.time()
        events = [json.loads(line) for line in (run_dir / "events.jsonl").open("rb")
                  if b'"kind":"step"' not in line]
        started = next(e for e in events if e["kind"] == "started")
        exited = next(e for e in events if e["kind"] == "exited")
        under.append({"wall": wall, "code": code, "trainer": exited["t"] - started["t"],
                      "after_exit": ended - (started["wall_time"] - started["t"] + exited["t"]),
                      "rss_mb": peak.own / MB, "plot_rss_mb": peak.child / MB,
                      "report_kb": (run_dir / "report.json").stat().st_size / 1024,
                      "run_dir": str(run_dir)})
    best = min(alone)
    return {"steps": steps, "alone_s": alone, "runs": under,
            "ratio": statistics.median(u["wall"] for u in under) / best,
            "ratio_running": statistics.median(u["trainer"] for u in under) / best,
            "after_exit_s": statistics.median(u["after_exit"] for u in under),
            "rss_mb": max(u["rss_mb"] for u in under),
            "plot_rss_mb": max(u["plot_rss_mb"] for u in under),
            "report_kb": max(u["report_kb"] for u in under)}


def report_time(run_dir: str, work: Path) -> dict[str, Any]:
    wall, code, peak = timed([*lorasup(), "report", run_dir], cwd=work, timeout=600)
    return {"wall_s": wall, "code": code, "rss_mb": peak.own / MB, "plot_rss_mb": peak.child / MB}


def startup(work: Path) -> dict[str, Any]:
    bare, helped = [], []
    for _ in range(15):
        bare.append(timed([PY, "-c", "pass"], cwd=work, timeout=60)[0])
        helped.append(timed([*lorasup(), "--help"], cwd=work, timeout=60)[0])
    whole = []
    for i in range(5):
        argv = [*lorasup(), "start", "--trainer", "command", "--steps", "1", "--run-dir",
                str(work / f"true-{i}"), "--log-format", "json", "--", "true"]
        whole.append(timed(argv, cwd=work, timeout=60)[0])
    return {"python_pass_s": statistics.median(bare), "help_s": statistics.median(helped),
            "help_over_pass_ms": (statistics.median(helped) - statistics.median(bare)) * 1000,
            "start_true_s": statistics.median(whole)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", default="10000,100000,1000000")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--only", default="firehose,report,startup")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    only = set(args.only.split(","))
    results: dict[str, Any] = {"load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="lorasup-bench-") as tmp:
        work = Path(tmp)
        if only & {"firehose", "report"}:
            results["firehose"] = []
            for steps in map(int, args.steps.split(",")):
                print(f"firehose {steps} ...", file=sys.stderr)
                found = firehose(steps, args.rounds, work)
                if "report" in only:
                    found["report"] = report_time(found["runs"][-1]["run_dir"], work)
                results["firehose"].append(found)
                for run in found["runs"]:
                    run.pop("run_dir")
        if "startup" in only:
            print("startup ...", file=sys.stderr)
            results["startup"] = startup(work)
    results["load_after"] = os.getloadavg()
    print(f"load average before {results['load_before'][0]:.1f}, "
          f"after {results['load_after'][0]:.1f} ({os.cpu_count()} cores)")
    print("| steps | alone s | ratio whole | ratio while running | after exit s | lorasup RSS MB"
          " | plot child MB | report.json KB | `lorasup report` s / MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for f in results.get("firehose", []):
        rep = f.get("report") or {}
        print(f"| {f['steps']:,} | {min(f['alone_s']):.2f} | {f['ratio']:.2f}× | "
              f"{f['ratio_running']:.2f}× | {f['after_exit_s']:.2f} | {f['rss_mb']:.0f} | "
              f"{f['plot_rss_mb']:.0f} | {f['report_kb']:.0f} | "
              f"{rep.get('wall_s', float('nan')):.2f} / {rep.get('rss_mb', float('nan')):.0f} |")
    if "startup" in results:
        s = results["startup"]
        print(f"\n`lorasup --help` {s['help_s'] * 1000:.0f} ms, `python -c pass` "
              f"{s['python_pass_s'] * 1000:.0f} ms (+{s['help_over_pass_ms']:.0f} ms); "
              f"`start --trainer command --steps 1 -- true` {s['start_true_s']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
