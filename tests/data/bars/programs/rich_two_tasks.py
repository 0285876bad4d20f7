"""rich Progress with two tasks: epochs (3) and the steps of each epoch (6, reset per epoch)."""

import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
              TextColumn("{task.fields[loss]}")) as progress:
    epochs = progress.add_task("Epochs", total=3, loss="")
    steps = progress.add_task("Steps", total=6, loss="loss: -")
    for epoch in range(3):
        progress.reset(steps, total=6, loss="loss: -")
        for i in range(6):
            time.sleep(0.15)
            step = epoch * 6 + i + 1
            progress.update(steps, advance=1, loss=f"loss: {1.0 / step:.4f}")
        progress.update(epochs, advance=1)
