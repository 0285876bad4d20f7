#!/usr/bin/env python3
"""Stop the cluster ``slurm_up.py DIR`` started: slurmd, slurmctld, munged (SIGTERM, then
SIGKILL after 5 s), by their pidfiles in DIR. Idempotent.

    python3 tests/cluster/slurm_down.py DIR
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

PIDFILES = ("slurmd.pid", "slurmctld.pid", "munge/munged.pid")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie of ours counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][:1] != "Z"
    except (OSError, IndexError):
        return False


def stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: slurm_down.py DIR\n")
        return 2
    root = Path(argv[0])
    for name in PIDFILES:
        try:
            pid = int((root / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        stop(pid)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
