"""Time from SIGKILL of lorasup (or of its whole process group) to the moment no process of
the trainer's tree is left: the trainer, a silent worker and a silent own-session grandchild
(tests/helpers/fault_trainer.py). The guard does the killing (README: How it stops a trainer).

    python bench/bench_orphans.py [TRIALS]
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

FAULT = Path(__file__).resolve().parents[1] / "tests" / "helpers" / "fault_trainer.py"


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def one_trial(work: Path, trial: int, whole_group: bool) -> float:
    """Seconds from lorasup's death to the last of its trainer's tree gone."""
    pidfile = work / f"pids{trial}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorasup", "start", "--run-dir", str(work / f"run{trial}"),
         "--log-format", "json", "--trainer", "native", "--steps", "3", "--",
         sys.executable, str(FAULT), "--family", str(pidfile), "--hold"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while not pidfile.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the trainer never wrote its pids")
        time.sleep(0.01)
    pids = [int(x) for x in pidfile.read_text().split()]
    if whole_group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    died = time.monotonic()
    while not all(gone(pid) for pid in pids):
        time.sleep(0.002)
    return time.monotonic() - died


def main() -> None:
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    work = Path(tempfile.mkdtemp(prefix="lorasup-orphans-"))
    results: dict[bool, list[float]] = {False: [], True: []}
    for trial in range(trials):
        whole_group = trial % 2 == 1
        results[whole_group].append(one_trial(work, trial, whole_group))
    for whole_group, times in results.items():
        times.sort()
        what = "SIGKILL to lorasup's process group" if whole_group else "SIGKILL to lorasup"
        print(f"{what}: tree gone after median {times[len(times) // 2] * 1000:.1f} ms, "
              f"max {times[-1] * 1000:.1f} ms (n={len(times)})")


if __name__ == "__main__":
    main()
