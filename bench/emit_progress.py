"""A trainer that prints kohya-style progress frames as fast as it can (for benchmarks).

    python emit_progress.py --lines 1000000 [--max_train_steps=N]

Two tqdm frames per step on stderr, like kohya (``\\r`` redraws, no newline), then exit 0.
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=1_000_000)
    args, _ = parser.parse_known_args()
    steps = args.lines // 2
    write = sys.stderr.write
    avr = 1.0
    for step in range(1, steps + 1):
        head = f"\rsteps:  50%|█████     | {step}/{steps} [00:10<00:10,  1.50s/it"
        write(f"{head}, avr_loss={avr:.3g}]")
        avr = 1.0 + (step % 97) / 1000
        write(f"{head}, avr_loss={avr:.3g}]")
    write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
