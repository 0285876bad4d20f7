"""A training-like loop with a plain tqdm bar (default mininterval) and a loss postfix."""

import sys
import time

from tqdm import tqdm

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 30
desc = sys.argv[2] if len(sys.argv) > 2 else "Training"
bar = tqdm(range(steps), desc=desc or None)
for i in bar:
    time.sleep(0.12)
    bar.set_postfix(loss=round(1.0 / (i + 1), 4), lr=1e-4)
