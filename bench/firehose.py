"""The firehose: one kohya bar frame per step, ``\\n``-terminated, 80 bytes a line.

    python firehose.py --steps 1000000 [--max_train_steps=N] [--stream stdout|stderr]

As fast as it can, one ``write`` per line (lorasup sets PYTHONUNBUFFERED=1, so each line is
its own syscall, as a flushing trainer's would be), then exit 0.
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--stream", choices=("stdout", "stderr"), default="stderr")
    parser.add_argument("--max_train_steps", type=int, default=None)
    args, _ = parser.parse_known_args()
    steps = args.max_train_steps or args.steps
    write = (sys.stderr if args.stream == "stderr" else sys.stdout).write
    width = len(str(steps))
    for step in range(1, steps + 1):
        avr = 1.0 + (step % 97) / 1000
        # 80 bytes with the newline for a 7-digit step count (the bar is 10 UTF-8 cells)
        write(f"steps:  50%|█████     | {step:>{width}}/{steps} "
              f"[00:10<00:10,  1.50s/it, avr_loss={avr:.3f}]\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
