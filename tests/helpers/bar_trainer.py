"""A tiny trainer for the daemon's tests: ``steps: k/N`` tqdm bars with an average loss.

--steps N --step-seconds S: the pace. --marker FILE: each started run appends a line
(pid) there, so a test sees how often it was started. --hang-after K: stop printing after
step K and sleep (a stall). --fail-code C: exit C after the last step. --env NAME: print
NAME=value of that variable at start. --nan-at K: step K's loss is nan. Exits 130 on
SIGINT, 143 on SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def frame(step: int, total: int, loss: float) -> str:
    frac = step / total
    bar = "#" * int(frac * 10)
    return (f"\rsteps: {int(frac * 100):3d}%|{bar:<10}| {step}/{total} "
            f"[00:01<00:01, 1.00it/s, avr_loss={loss:.4f}]")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--step-seconds", type=float, default=0.05)
    parser.add_argument("--marker", default=None)
    parser.add_argument("--hang-after", type=int, default=None)
    parser.add_argument("--fail-code", type=int, default=0)
    parser.add_argument("--env", default=None)
    parser.add_argument("--nan-at", type=int, default=None)
    args = parser.parse_args()
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.marker:
        with open(args.marker, "a", encoding="utf-8") as fh:
            fh.write(f"{os.getpid()}\n")
    if args.env:
        print(f"{args.env}={os.environ.get(args.env, '<unset>')}", flush=True)
    for step in range(1, args.steps + 1):
        time.sleep(args.step_seconds)
        loss = float("nan") if step == args.nan_at else 1.0 / step
        sys.stdout.write(frame(step, args.steps, loss))
        sys.stdout.flush()
        if args.hang_after is not None and step >= args.hang_after:
            while True:
                time.sleep(3600)
    sys.stdout.write("\n")
    return args.fail_code


if __name__ == "__main__":
    sys.exit(main())
