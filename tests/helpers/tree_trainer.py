"""A trainer with a stubborn process tree, for the guard's tests (issue 16).

    tree_trainer.py --pids FILE [--workers N] [--steps N] [--step-seconds S] [--hold]
                    [--save-seconds S --marker FILE]

- ``--workers N``: forks N silent workers, each in a session of its own (``os.setsid``,
  as torchrun's are) that ignore SIGTERM, SIGINT and SIGHUP: only SIGKILL ends them. The
  first one forks once more (a grandchild in the worker's session, ignoring them too).
  Every pid (the trainer first) is written to FILE, atomically, once all exist.
- ``--hold``: after the last step, sleeps silently until signalled.
- ``--save-seconds S --marker FILE``: the first SIGTERM or SIGINT starts a "save" that takes
  S seconds (further stop signals are ignored meanwhile), then writes FILE and exits 0: a
  trainer that checkpoints on a stop request, as a cluster job's trainer should.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

STUBBORN = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _silent() -> None:
    """Stdin, stdout and stderr on /dev/null: the worker holds none of lorasup's pipes."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _worker(report: int, grandchild: bool) -> None:
    """Runs in the forked child: never returns."""
    os.setsid()
    for sig in STUBBORN:
        signal.signal(sig, signal.SIG_IGN)
    _silent()
    if grandchild and os.fork() == 0:
        os.write(report, f"{os.getpid()} ".encode())
        while True:
            time.sleep(60)
    os.write(report, f"{os.getpid()} ".encode())
    while True:
        time.sleep(60)


def _start_workers(count: int) -> list[int]:
    read_end, write_end = os.pipe()
    expected = count + (1 if count else 0)
    for index in range(count):
        if os.fork() == 0:
            os.close(read_end)
            try:
                _worker(write_end, grandchild=index == 0)
            finally:
                os._exit(1)
    os.close(write_end)
    text = b""
    while len(text.split()) < expected:
        chunk = os.read(read_end, 4096)
        if not chunk:
            break
        text += chunk
    os.close(read_end)
    return [int(p) for p in text.split()]


class Saver:
    """The first stop signal starts a save of ``seconds``; the rest are ignored."""

    def __init__(self, seconds: float, marker: str) -> None:
        self.seconds = seconds
        self.marker = marker
        self.saving = False

    def __call__(self, signum: int, _frame: object) -> None:
        if self.saving:
            print(f"ignored {signal.Signals(signum).name} while saving", flush=True)
            return
        self.saving = True
        print(f"saving after {signal.Signals(signum).name}", flush=True)
        time.sleep(self.seconds)
        with open(self.marker, "w") as fh:
            fh.write("saved\n")
        print("saved", flush=True)
        os._exit(0)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pids", required=True)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--step-seconds", type=float, default=0.05)
    parser.add_argument("--hold", action="store_true")
    parser.add_argument("--save-seconds", type=float)
    parser.add_argument("--marker")
    args = parser.parse_args()
    if args.save_seconds is not None:
        saver = Saver(args.save_seconds, args.marker)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, saver)
    pids = [os.getpid(), *_start_workers(args.workers)]
    with open(args.pids + ".tmp", "w") as fh:
        fh.write(" ".join(map(str, pids)))
    os.replace(args.pids + ".tmp", args.pids)
    for step in range(1, args.steps + 1):
        time.sleep(args.step_seconds)
        print(json.dumps({"lorasup": 1, "kind": "step", "step": step, "total": args.steps,
                          "loss": 1.0 / step}, separators=(",", ":")), flush=True)
    while args.hold:
        time.sleep(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
