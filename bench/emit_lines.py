"""A trainer that prints ordinary log lines (no progress steps) as fast as it can.

    python emit_lines.py --lines 1000000 [--stream stderr|stdout|both]

Each line is ``\\n``-terminated, like a logger's records (``INFO something happened 12345``),
written one ``write`` call per line, then exit 0. It never prints a training step, so under
``lorasup start --trainer kohya --steps 10`` the run ends as ``trainer_failed`` by design:
the benchmark measures how fast lorasup drains lines that are not steps.
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--stream", choices=("stderr", "stdout", "both"), default="stderr")
    args, _ = parser.parse_known_args()  # lorasup injects kohya flags; ignore them
    if args.stream == "both":
        writers = (sys.stdout.write, sys.stderr.write)
    else:
        writers = (getattr(sys, args.stream).write,) * 2
    for i in range(args.lines):
        writers[i & 1](f"INFO something happened {i}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
