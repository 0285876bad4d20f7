"""A hand-written loop printing a dict per step: Python repr, then JSON."""

import json
import time

for step in range(1, 21):
    time.sleep(0.05)
    record = {"loss": round(2.0 / step, 5), "lr": 1e-4, "step": step}
    print(record if step <= 10 else json.dumps(record), flush=True)
