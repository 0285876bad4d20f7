"""A trainer speaking lorasup's line protocol that hangs, chatters or loads slowly on request.

The functions it hangs in have distinctive names, so a test can check that the stacks
lorasup took name them. Each misbehaviour is a flag; each test asks for one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def emit(kind: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"lorasup": 1, "kind": kind, **fields},
                                separators=(",", ":")) + "\n")
    sys.stdout.flush()


def step(k: int, total: int) -> None:
    emit("step", step=k, total=total, loss=1.0 / k)


def wait_for_the_collective_barrier() -> None:
    """Where a rank waits forever for the others, silently."""
    while True:
        time.sleep(1)


def supervise_the_ranks(worker: subprocess.Popen) -> None:
    """The launcher's side: waits for its worker (in the standard library's subprocess.py)."""
    worker.wait()


def warn_while_waiting_for_a_peer(total: int, k: int) -> None:
    """Rank 0 keeps talking (warnings, redraws of its last step), never progressing."""
    while True:
        sys.stderr.write("UserWarning: peer 1 has not joined the collective yet\n")
        sys.stderr.flush()
        step(k, total)
        time.sleep(0.2)


def load_the_checkpoint_slowly(seconds: float) -> None:
    time.sleep(seconds)


def save_the_lora_slowly(seconds: float) -> None:
    time.sleep(seconds)


def wait_for_the_go_file(path: str) -> None:
    while not os.path.exists(path):
        time.sleep(0.02)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--step-seconds", type=float, default=0.02)
    p.add_argument("--silent-start", type=float, default=0.0, help="silent seconds before step 1")
    p.add_argument("--final-save", type=float, default=0.0, help="silent seconds after step N")
    p.add_argument("--hang-at", type=int, default=0, help="hang silently instead of this step")
    p.add_argument("--chatter-at", type=int, default=0, help="talk without progress from here")
    p.add_argument("--with-worker", action="store_true", help="hang in a RANK=1 child too")
    p.add_argument("--as-worker", action="store_true")
    p.add_argument("--go-file", default=None, help="after step 1, wait for this file")
    args = p.parse_args()

    if args.as_worker:
        wait_for_the_collective_barrier()
    load_the_checkpoint_slowly(args.silent_start)
    for k in range(1, args.steps + 1):
        if k == args.hang_at:
            if args.with_worker:
                env = {**os.environ, "RANK": "1"}
                worker = subprocess.Popen([sys.executable, __file__, "--steps", "1",
                                           "--as-worker"], env=env, stdin=subprocess.DEVNULL)
                supervise_the_ranks(worker)
            wait_for_the_collective_barrier()
        if k == args.chatter_at:
            warn_while_waiting_for_a_peer(args.steps, k - 1)
        step(k, args.steps)
        if k == 1 and args.go_file:
            wait_for_the_go_file(args.go_file)
        time.sleep(args.step_seconds)
    save_the_lora_slowly(args.final_save)
    emit("finished", marker="saved")
    return 0


if __name__ == "__main__":
    sys.exit(main())
