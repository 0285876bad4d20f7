"""Benchmark the supervisor core: throughput, stop latency, lorasup's own memory.

    python bench/bench_supervisor.py [--quick] [--runs 3] [--only throughput,latency,memory]
                                     [--json results.json]

Prints a markdown table. What is measured (see bench/README.md for the targets):

- throughput: ``bench/emit_progress.py`` (kohya tqdm frames, two per step) and
  ``bench/emit_lines.py`` (plain ``\\n`` log lines, no steps) (a) alone with both streams to
  /dev/null, (b) under ``lorasup start --trainer kohya``, (c) under the naive
  Popen + readline + regex baseline ``bench/naive_supervisor.py``. The trainer's duration
  under lorasup is ``exited.t - started.t`` from ``events.jsonl``; alone and under the
  naive baseline it is spawn → exit. Rounds are interleaved (alone, lorasup, naive, ...).
- latency: ``bench/overshoot_trainer.py`` under ``lorasup start --trainer kohya --steps N
  --grace 5``; SIGINT arrival minus the write of step N (and of step N+1, the first line
  past N), all CLOCK_MONOTONIC.
- memory: lorasup's RSS (its pid only, psutil, every 0.2 s) during the progress runs of
  the throughput benchmark and during ``lorasup start --steps S`` (builtin trainer); plus
  ``ru_maxrss`` from wait4, which is the largest of lorasup *and its children*.

Every process runs under a timeout (killed with its children when it passes) and in a
temporary folder that is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
PY = sys.executable
SAMPLE_SECONDS = 0.2
MB = 1024 * 1024


def lorasup_argv() -> list[str]:
    """The installed ``lorasup`` script next to this interpreter, else ``python -m supervisor``."""
    script = Path(PY).parent / "lorasup"
    return [str(script)] if script.exists() else [PY, "-m", "lorasup"]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


# -- running one process, bounded, with optional RSS sampling ---------------------------


@dataclass
class Proc:
    wall: float
    returncode: int | None
    timed_out: bool
    maxrss_mb: float
    #: (seconds since spawn, RSS in MB, whether the process had a child then)
    rss: list[tuple[float, float, bool]] = field(default_factory=list)


class RssSampler(threading.Thread):
    """RSS of one pid (not its children) every ``SAMPLE_SECONDS`` until it is gone."""

    def __init__(self, pid: int, t0: float) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.t0 = t0
        self.samples: list[tuple[float, float, bool]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            proc = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.stop.is_set():
            try:
                rss = proc.memory_info().rss / MB
                busy = bool(proc.children())
            except psutil.Error:
                return
            self.samples.append((time.perf_counter() - self.t0, rss, busy))
            self.stop.wait(SAMPLE_SECONDS)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (lorasup's trainer has its own session)."""
    try:
        parent = psutil.Process(pid)
        family = [*parent.children(recursive=True), parent]
    except psutil.Error:
        return
    for proc in family:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            continue


def run_bounded(argv: list[str], *, timeout: float, cwd: str | Path | None = None,
                env: dict[str, str] | None = None, stdout: Any = subprocess.DEVNULL,
                stderr: Any = subprocess.DEVNULL, sample_rss: bool = False) -> Proc:
    """Run ``argv`` to its end (killed with its tree after ``timeout``); wall time and rusage."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env or child_env(), stdin=subprocess.DEVNULL,
                            stdout=stdout, stderr=stderr)
    sampler = RssSampler(proc.pid, started) if sample_rss else None
    if sampler is not None:
        sampler.start()
    fired = threading.Event()

    def on_timeout() -> None:
        fired.set()
        _kill_tree(proc.pid)

    timer = threading.Timer(timeout, on_timeout)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    samples: list[tuple[float, float, bool]] = []
    if sampler is not None:
        sampler.stop.set()
        sampler.join(2)
        samples = sampler.samples
    return Proc(wall=wall, returncode=proc.returncode, timed_out=fired.is_set(),
                maxrss_mb=usage.ru_maxrss / 1024, rss=samples)


# -- events.jsonl ------------------------------------------------------------------------


@dataclass
class RunEvents:
    started_t: float | None = None
    exited_t: float | None = None
    outcome: str | None = None
    steps: int = 0
    last_step: int | None = None
    signals: list[str] = field(default_factory=list)

    @property
    def trainer_s(self) -> float | None:
        if self.started_t is None or self.exited_t is None:
            return None
        return self.exited_t - self.started_t


def read_events(run_dir: Path) -> RunEvents:
    out = RunEvents()
    path = run_dir / "events.jsonl"
    if not path.is_file():
        return out
    last_step_line = None
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if '"kind":"step"' in line:
                out.steps += 1
                last_step_line = line
            elif '"kind":"started"' in line:
                out.started_t = json.loads(line)["t"]
            elif '"kind":"exited"' in line:
                out.exited_t = json.loads(line)["t"]
            elif '"kind":"outcome"' in line:
                out.outcome = json.loads(line)["outcome"]
            elif '"kind":"signal"' in line:
                out.signals.append(json.loads(line)["signal"])
    if last_step_line is not None:
        out.last_step = json.loads(last_step_line)["step"]
    return out


# -- statistics and formatting -----------------------------------------------------------


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {"n": len(ordered), "median": statistics.median(ordered), "min": ordered[0],
            "p90": p90, "max": ordered[-1]}


def fmt(values: list[float], unit: str = "s", digits: int = 2) -> str:
    s = summary(values)
    if not s:
        return "n/a"
    if s["n"] == 1:
        return f"{s['median']:.{digits}f} {unit}"
    return (f"{s['median']:.{digits}f} {unit} (min {s['min']:.{digits}f}, "
            f"max {s['max']:.{digits}f}, n={s['n']})")


def short(argv: list[str]) -> str:
    """A readable command: paths relative to the repository, the interpreter as ``python``."""
    out = []
    for arg in argv:
        if arg == PY:
            out.append("python")
        elif arg.startswith(str(REPO) + os.sep):
            out.append(os.path.relpath(arg, REPO))
        elif os.path.isabs(arg) and Path(arg).name == "lorasup":
            out.append("lorasup")
        else:
            out.append(arg)
    return " ".join(out)


@dataclass
class Row:
    section: str
    what: str
    command: str
    result: str
    target: str = ""
    verdict: str = ""


# -- benchmarks ----------------------------------------------------------------------------


def emitter(kind: str, lines: int) -> list[str]:
    script = "emit_progress.py" if kind == "progress" else "emit_lines.py"
    return [PY, str(BENCH / script), "--lines", str(lines)]


def bench_throughput(kind: str, lines: int, runs: int, timeout: float,
                     raw: dict[str, Any]) -> list[Row]:
    steps = lines // 2 if kind == "progress" else 10
    trainer = emitter(kind, lines)
    alone: list[float] = []
    sup: list[float] = []
    sup_wall: list[float] = []
    naive: list[float] = []
    rss_runs: list[Proc] = []
    checks: list[str] = []
    sup_cmd: list[str] = []
    for i in range(runs):
        print(f"  [{kind}] round {i + 1}/{runs}: alone", file=sys.stderr, flush=True)
        res = run_bounded(trainer, timeout=timeout, env=child_env(PYTHONUNBUFFERED="1"))
        if res.returncode == 0:
            alone.append(res.wall)
        print(f"  [{kind}] round {i + 1}/{runs}: lorasup", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="bench-sup-") as tmp:
            run_dir = Path(tmp) / "run"
            sup_cmd = [*lorasup_argv(), "start", "--trainer", "kohya", "--steps", str(steps),
                       "--run-dir", str(run_dir), "--log-format", "json", "--", *trainer]
            with open(Path(tmp) / "lorasup.log", "wb") as log:
                res = run_bounded(sup_cmd, timeout=timeout, cwd=tmp, stdout=log, stderr=log,
                                  sample_rss=True)
            events = read_events(run_dir)
        rss_runs.append(res)
        if res.timed_out or events.trainer_s is None:
            checks.append(f"run {i + 1}: timed out or no exited event (rc {res.returncode})")
        else:
            sup.append(events.trainer_s)
            sup_wall.append(res.wall)
            checks.append(f"run {i + 1}: outcome {events.outcome}, exit {res.returncode}, "
                          f"{events.steps} step events, last step {events.last_step}")
        print(f"  [{kind}] round {i + 1}/{runs}: naive", file=sys.stderr, flush=True)
        naive_cmd = [PY, str(BENCH / "naive_supervisor.py"), "--", *trainer]
        with tempfile.TemporaryFile("w+") as out:
            res = run_bounded(naive_cmd, timeout=timeout, stdout=out)
            out.seek(0)
            printed = out.read().strip()
        if res.returncode == 0 and printed:
            naive.append(json.loads(printed.splitlines()[-1])["trainer_s"])
    raw[f"throughput_{kind}"] = {"alone_s": alone, "lorasup_trainer_s": sup,
                                 "lorasup_wall_s": sup_wall, "naive_trainer_s": naive,
                                 "checks": checks,
                                 "lorasup_rss": [asdict(r) for r in rss_runs]}
    for line in checks:
        print(f"  [{kind}] {line}", file=sys.stderr)

    label = (f"{lines:,} kohya frames ({steps:,} steps)" if kind == "progress"
             else f"{lines:,} plain log lines (no steps)")
    ratio = [s / statistics.median(alone) for s in sup] if alone else []
    naive_ratio = [s / statistics.median(alone) for s in naive] if alone else []
    met = bool(ratio) and statistics.median(ratio) <= 1.5
    rows = [
        Row("throughput", f"{label}: (a) emitter alone",
            f"PYTHONUNBUFFERED=1 {short(trainer)} >/dev/null 2>&1", fmt(alone)),
        Row("throughput", f"{label}: (b) emitter under lorasup",
            short(sup_cmd).replace(str(Path(tempfile.gettempdir())), "$TMP"),
            fmt(sup) + (f"; ratio to (a) {fmt(ratio, '×')}" if ratio else ""),
            "≤ 1.5× (a)", "met" if met else "NOT met"),
        Row("throughput", f"{label}: (b') lorasup total wall (incl. final report/PNG)",
            "same", fmt(sup_wall)),
        Row("throughput", f"{label}: (c) emitter under naive Popen+readline+5 regexes",
            short([PY, str(BENCH / "naive_supervisor.py"), "--", *trainer]),
            fmt(naive) + (f"; ratio to (a) {fmt(naive_ratio, '×')}" if naive_ratio else "")),
    ]
    raw[f"_rss_{kind}"] = rss_runs
    return rows


def bench_latency(n: int, runs: int, timeout: float, raw: dict[str, Any],
                  trainer_name: str = "command") -> list[Row]:
    """``command``: lorasup stops the trainer at step N; ``kohya``: the trainer is trusted
    to stop by itself (its final save must not be cut), so it is stopped at N + 1."""
    from_n: list[float] = []
    from_n1: list[float] = []
    records: list[dict[str, Any]] = []
    cmd: list[str] = []
    for i in range(runs):
        with tempfile.TemporaryDirectory(prefix="bench-stop-") as tmp:
            record = Path(tmp) / "record.json"
            trainer = [PY, str(BENCH / "overshoot_trainer.py"), "--record", str(record),
                       "--step-seconds", "0.02", "--extra", "1000"]
            cmd = [*lorasup_argv(), "start", "--trainer", trainer_name, "--steps", str(n),
                   "--grace", "5", "--run-dir", str(Path(tmp) / "run"), "--log-format", "json",
                   "--", *trainer]
            with open(Path(tmp) / "lorasup.log", "wb") as log:
                res = run_bounded(cmd, timeout=timeout, cwd=tmp, stdout=log, stderr=log)
            events = read_events(Path(tmp) / "run")
            data = json.loads(record.read_text()) if record.is_file() else {}
        data.update(outcome=events.outcome, exit=res.returncode, timed_out=res.timed_out,
                    signals=events.signals, last_recorded_step=events.last_step)
        records.append(data)
        if data.get("signal_ns") and data.get("step_n_ns"):
            from_n.append((data["signal_ns"] - data["step_n_ns"]) / 1e6)
            if data.get("step_n1_ns"):
                from_n1.append((data["signal_ns"] - data["step_n1_ns"]) / 1e6)
        print(f"  [latency] run {i + 1}/{runs}: "
              f"{from_n[-1] if from_n else float('nan'):.2f} ms after step N, signal "
              f"{data.get('signal')} at trainer step {data.get('signal_step')}, outcome "
              f"{events.outcome}", file=sys.stderr, flush=True)
    raw[f"latency_{trainer_name}"] = {"from_step_n_ms": from_n, "from_step_n1_ms": from_n1,
                                       "runs": records}

    def stats(values: list[float]) -> str:
        s = summary(values)
        if not s:
            return "n/a (no signal recorded)"
        return (f"median {s['median']:.2f} ms, p90 {s['p90']:.2f} ms, max {s['max']:.2f} ms "
                f"(min {s['min']:.2f}, n={s['n']})")

    missed = runs - len(from_n)
    shown = short(cmd).replace(str(Path(tempfile.gettempdir())), "$TMP")
    met = bool(from_n) and statistics.median(from_n) <= 5 and missed == 0
    return [
        Row(f"stop latency ({trainer_name})",
            f"SIGINT arrival − step-{n} write (steps every 20 ms)", shown,
            stats(from_n) + (f"; {missed} run(s) without a signal" if missed else ""),
            "median ≤ 5 ms", "met" if met else "NOT met"),
        Row(f"stop latency ({trainer_name})",
            f"SIGINT arrival − step-{n + 1} write (first line past N)",
            "same", stats(from_n1)),
    ]


def rss_stats(runs: list[Proc]) -> dict[str, list[float]]:
    """Per run: RSS when the trainer had started, peak while it ran, at its exit, overall."""
    out: dict[str, list[float]] = {"start": [], "peak_running": [], "at_exit": [],
                                   "peak_all": [], "maxrss_tree": []}
    for run in runs:
        running = [rss for _, rss, busy in run.rss if busy]
        if not running:
            continue
        out["start"].append(running[0])
        out["peak_running"].append(max(running))
        out["at_exit"].append(running[-1])
        out["peak_all"].append(max(rss for _, rss, _ in run.rss))
        out["maxrss_tree"].append(run.maxrss_mb)
    return out


def memory_rows(label: str, command: str, runs: list[Proc]) -> list[Row]:
    s = rss_stats(runs)
    if not s["start"]:
        return [Row("memory", label, command, "n/a (no samples)")]
    med = {k: statistics.median(v) for k, v in s.items()}
    spread = {k: f"{min(v):.0f}–{max(v):.0f}" for k, v in s.items()}
    result = (f"start {med['start']:.0f} MB [{spread['start']}], "
              f"peak while trainer ran {med['peak_running']:.0f} MB [{spread['peak_running']}], "
              f"at trainer exit {med['at_exit']:.0f} MB [{spread['at_exit']}], "
              f"peak incl. final report {med['peak_all']:.0f} MB [{spread['peak_all']}]; "
              f"ru_maxrss (lorasup or a child) {med['maxrss_tree']:.0f} MB "
              f"(median [min–max], n={len(s['start'])})")
    running = "met" if max(s["peak_running"]) <= 60 else "NOT met"
    final = "met" if max(s["peak_all"]) <= 60 else "NOT met"
    return [Row("memory", label, command, result, "≤ 60 MB, flat",
                f"while the trainer runs: {running}; incl. final report: {final}")]


def bench_builtin_memory(steps: int, runs: int, timeout: float,
                         raw: dict[str, Any]) -> list[Row]:
    results: list[Proc] = []
    cmd: list[str] = []
    for i in range(runs):
        print(f"  [memory] builtin {steps} steps, run {i + 1}/{runs}", file=sys.stderr,
              flush=True)
        with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
            cmd = [*lorasup_argv(), "start", "--steps", str(steps), "--run-dir",
                   str(Path(tmp) / "run"), "--log-format", "json"]
            with open(Path(tmp) / "lorasup.log", "wb") as log:
                res = run_bounded(cmd, timeout=timeout, cwd=tmp, stdout=log, stderr=log,
                                  sample_rss=True)
            events = read_events(Path(tmp) / "run")
        print(f"  [memory] outcome {events.outcome}, exit {res.returncode}, "
              f"wall {res.wall:.1f} s, trainer {events.trainer_s or 0:.1f} s", file=sys.stderr)
        results.append(res)
    raw["memory_builtin"] = [asdict(r) for r in results]
    shown = short(cmd).replace(str(Path(tempfile.gettempdir())), "$TMP")
    return memory_rows(f"builtin trainer, {steps} steps", f"(in an empty tmp dir) {shown}",
                       results)


# -- main ------------------------------------------------------------------------------------


def git_state() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                                "supervisor", "trainers"],
                               capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head}{' + uncommitted changes in supervisor/ or trainers/' if dirty else ''}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: 100k lines, 300 builtin steps, 5 stop runs, 1 round")
    parser.add_argument("--runs", type=int, default=None, help="rounds per benchmark [3]")
    parser.add_argument("--lines", type=int, default=None, help="lines per emitter [1000000]")
    parser.add_argument("--latency-runs", type=int, default=None, help="stop runs [20]")
    parser.add_argument("--latency-n", type=int, default=20, help="N of the stop runs [20]")
    parser.add_argument("--builtin-steps", type=int, default=None, help="[3000]")
    parser.add_argument("--only", default="throughput,latency,memory",
                        help="comma list of: throughput (= progress,lines), progress, lines, "
                             "latency, memory (memory also runs progress: it samples those)")
    parser.add_argument("--timeout", type=float, default=240.0,
                        help="seconds any one process may run before it is killed [240]")
    parser.add_argument("--json", type=Path, default=None, help="write raw numbers here")
    args = parser.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    lines = args.lines or (100_000 if args.quick else 1_000_000)
    latency_runs = args.latency_runs or (5 if args.quick else 20)
    builtin_steps = args.builtin_steps or (300 if args.quick else 3000)
    only = {part.strip() for part in args.only.split(",") if part.strip()}

    load_before = os.getloadavg()
    raw: dict[str, Any] = {}
    rows: list[Row] = []
    t0 = time.perf_counter()
    if "throughput" in only:
        only |= {"progress", "lines"}
    if "progress" in only or "memory" in only:
        progress_rows = bench_throughput("progress", lines, runs, args.timeout, raw)
        rows += progress_rows if "progress" in only else []
    if "lines" in only:
        rows += bench_throughput("lines", lines, runs, args.timeout, raw)
    if "latency" in only:
        for trainer_name in ("command", "kohya"):
            rows += bench_latency(args.latency_n, latency_runs, args.timeout, raw, trainer_name)
    if "memory" in only:
        rss_runs = raw.pop("_rss_progress", [])
        rows += memory_rows(f"{lines:,} kohya frames (the (b) runs above)",
                            "sampled during (b)", rss_runs)
        rows += bench_builtin_memory(builtin_steps, runs, args.timeout, raw)
    for key in [k for k in raw if k.startswith("_")]:
        raw.pop(key)
    elapsed = time.perf_counter() - t0
    load_after = os.getloadavg()

    print(f"\nlorasup supervisor benchmarks: {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, {platform.system()} {platform.release()}, git "
          f"{git_state()}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
          f"{elapsed:.0f} s in all; {'quick sizes' if args.quick else 'full sizes'}.\n")
    print("| benchmark | command | result | target | |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row.what} | `{row.command}` | {row.result} | {row.target} | {row.verdict} |")
    if args.json is not None:
        raw["meta"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "git": git_state(), "load_before": load_before,
                       "load_after": load_after, "lines": lines, "runs": runs}
        raw["rows"] = [asdict(r) for r in rows]
        args.json.write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
