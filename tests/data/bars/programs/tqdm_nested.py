"""Nested tqdm: an epoch bar and a per-epoch step bar (position=1, leave=False)."""

import time

from tqdm import tqdm

for epoch in tqdm(range(3), desc="Epochs", position=0):
    bar = tqdm(range(8), desc=f"Epoch {epoch + 1}", position=1, leave=False)
    for i in bar:
        time.sleep(0.12)
        bar.set_postfix(loss=f"{1.0 / (epoch * 8 + i + 1):.4f}")
