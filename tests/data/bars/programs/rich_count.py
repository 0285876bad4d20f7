"""rich Progress with a count column (MofNCompleteColumn) and a loss field."""

import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

columns = (TextColumn("[progress.description]{task.description}"), BarColumn(),
           MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("loss={task.fields[loss]}"))
with Progress(*columns) as progress:
    task = progress.add_task("Training", total=20, loss="-")
    for i in range(20):
        time.sleep(0.15)
        progress.update(task, advance=1, loss=f"{1.0 / (i + 1):.4f}")
