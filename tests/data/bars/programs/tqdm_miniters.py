"""A tqdm bar that redraws only every 4th step (miniters): the output skips numbers."""

import time

from tqdm import tqdm

bar = tqdm(total=30, desc="train", miniters=4, mininterval=0)
for i in range(30):
    time.sleep(0.03)
    bar.set_postfix_str(f"loss: {1.0 / (i + 1):.4f}", refresh=False)
    bar.update(1)
bar.close()
