"""What ``--trainer command`` pays per line for the bars it reads out of the box.

    python bench/bench_bars.py [--lines 20000]

Each line shape (a tqdm frame, a rich row, a Keras 3 frame, a dict line, a plain progress
line, and a chatter line that no reader wants) goes through ``CommandAdapter.parse`` as the
engine calls it, one line at a time; printed: microseconds per line. The bars libraries
draw at most ~10 frames a second (tqdm's mininterval, rich's refresh, Keras' 0.05 s), so a
few tens of microseconds a frame is far below anything a trainer notices; a chatty trainer
costs the needle test of ``LineSplitter.feed`` per read, not this.
"""

from __future__ import annotations

import argparse
import time

from lorasup.trainers.base import TrainerJob
from lorasup.trainers.command import CommandAdapter

SHAPES = {
    "tqdm": "Training:  40%|████      | {k}/1000000 [00:10<00:15, 4.00it/s, loss=0.123, lr=1e-4]",
    "rich": "Training ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━ {k}/1000000 0:00:10 loss=0.1234",
    "keras3": "{k}/1000000 ━━━━━━━━━━━━━━━━━━━━ 1s 10ms/step - loss: 0.1234",
    "dict": "{{'loss': 0.5, 'lr': 0.0001, 'step': {k}}}",
    "plain": "step {k}/1000000 loss=0.52 lr=1e-4",
    "chatter": "INFO: loaded shard {k} of the dataset from /data/foo (1234 images, 512 px)",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=20000)
    args = parser.parse_args()
    for name, shape in SHAPES.items():
        adapter = CommandAdapter()
        adapter.command(TrainerJob(steps=1000000, argv=("x",), run_dir="/tmp/bench"))
        lines = [shape.format(k=k) for k in range(1, args.lines + 1)]
        began = time.perf_counter()
        for line in lines:
            list(adapter.parse(line))
        took = time.perf_counter() - began
        print(f"{name:8s} {took / args.lines * 1e6:6.1f} us/line")


if __name__ == "__main__":
    main()
