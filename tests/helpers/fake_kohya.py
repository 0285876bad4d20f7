"""A trainer that prints what kohya sd-scripts prints, and misbehaves on request.

The frames copy the real recordings' grammar: tqdm on stderr redrawn with ``\\r``, two
frames per step (the first still shows the previous avr_loss), ``epoch k/n`` and
``saving checkpoint:`` on stdout, ``model saved.`` as a rich log record at the end.
Misbehaviours are flags; each test asks for one.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import time

BAR_CELLS = 10


def frame(step: int, total: int, elapsed: float, avr: float | None) -> str:
    frac = step / total if total else 1.0
    filled = int(frac * BAR_CELLS)
    bar = "█" * filled + " " * (BAR_CELLS - filled)
    rate = elapsed / step if step else 0.0
    postfix = "" if avr is None else f", avr_loss={avr:.3g}"
    return (f"\rsteps: {int(frac * 100):3d}%|{bar}| {step}/{total} "
            f"[00:{int(elapsed):02d}<00:00, {rate:5.2f}s/it{postfix}]")


def err(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def spawn_grandchildren(pid_file: str) -> None:
    """Two SIGTERM-ignoring sleepers: one in our group, one in a session of its own."""
    code = ("import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)")
    pids = []
    for own_session in (False, True):
        child = subprocess.Popen([sys.executable, "-c", code], start_new_session=own_session,
                                 stdin=subprocess.DEVNULL)
        pids.append(child.pid)
    with open(pid_file, "w") as fh:
        fh.write(" ".join(map(str, pids)))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--max_train_steps", type=int, default=1600)
    p.add_argument("--step-seconds", type=float, default=0.01)
    p.add_argument("--overshoot", type=int, default=0, help="steps to run past N")
    p.add_argument("--total-shown", type=int, default=None, help="tqdm total to print")
    p.add_argument("--hang-at", type=int, default=None, help="go silent at this step")
    p.add_argument("--silent", action="store_true", help="print nothing at all, hang")
    p.add_argument("--ignore", default="", help="comma list of signals to ignore")
    p.add_argument("--grandchildren", default=None, help="file to write their pids to")
    p.add_argument("--oom-at", type=int, default=None)
    p.add_argument("--nan-at", type=int, default=None)
    p.add_argument("--save-seconds", type=float, default=0.0)
    p.add_argument("--no-data", action="store_true")
    p.add_argument("--garbage", action="store_true")
    p.add_argument("--output_dir", default=None)
    p.add_argument("--output_name", default="test_lora")
    args, _ = p.parse_known_args()

    for name in filter(None, args.ignore.split(",")):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    if args.grandchildren:
        spawn_grandchildren(args.grandchildren)
    if args.silent:
        while True:
            time.sleep(3600)
    err("2026-11-27 21:44:48 INFO     Using v1 tokenizer                strategy_sd.py:26\n")
    if args.no_data:
        err("                    ERROR    No data found. Please verify   train_network.py:576\n"
            "                             arguments (train_data_dir must                     \n")
        return 0
    if args.garbage:
        os.write(2, b"\x1b[31mred\x1b[0m text with \x00 NUL and bad \xff\xfe bytes\n")
        os.write(1, b"x" * (10 * 1024 * 1024))  # 10 MB, no newline
        os.write(1, b"\n")
    n = args.max_train_steps
    total = args.total_shown or n
    out(f"running training / 学習開始\n  total optimization steps / 学習ステップ数: {n}\n")
    err(frame(0, total, 0, None).replace(", 0.00s/it", ", ?it/s"))
    out("\nepoch 1/1\n\n")
    avr = None
    start = time.monotonic()
    for step in range(1, n + args.overshoot + 1):
        if args.hang_at is not None and step == args.hang_at:
            while True:
                time.sleep(3600)
        time.sleep(args.step_seconds)
        loss = 1.2 - 0.1 * math.log(step)
        if args.nan_at is not None and step >= args.nan_at:
            loss = float("nan")
        if args.oom_at is not None and step == args.oom_at:
            err("Traceback (most recent call last):\n"
                '  File "train_network.py", line 1, in train\n'
                "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB. "
                "GPU 0 has a total capacity of 7.79 GiB\n")
            return 1
        elapsed = time.monotonic() - start
        err(frame(step, total, elapsed, avr))
        avr = loss if avr is None else (avr * (step - 1) + loss) / step
        err(frame(step, total, elapsed, avr))
    if args.save_seconds:
        time.sleep(args.save_seconds)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, args.output_name + ".safetensors")
        with open(path, "wb") as fh:
            fh.write(b"{}")
        out(f"\nsaving checkpoint: {path}\n")
    err("2026-11-27 21:45:12 INFO     model saved.                  train_network.py:1729\n")
    err(frame(n, total, time.monotonic() - start, avr) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
