"""A trainer that speaks the lorasup protocol and can be continued.

``protocol_steps.py --steps N [--continue STATE]``: with ``--continue``, reads the last
step from STATE, prints ``{"lorasup":1,"kind":"resume","step":K}`` and trains K+1..K+N;
writes the last step to STATE when done. Loss = 2 / step (known to the test). With
``--hang`` it then sleeps until stopped (Python's own SIGINT handling: a traceback);
``--ranked`` prints that traceback the way torchrun shows a worker's, each line prefixed
with ``[rank0]: ``, and exits 1.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path


def main() -> int:
    argv = sys.argv[1:]
    steps = int(argv[argv.index("--steps") + 1])
    state = Path(argv[argv.index("--state") + 1])
    start = 0
    if "--continue" in argv:
        start = int(state.read_text())
        resume = {"lorasup": 1, "kind": "resume", "step": start}
        print(json.dumps(resume, separators=(",", ":")), flush=True)
    for step in range(start + 1, start + steps + 1):
        print(json.dumps({"lorasup": 1, "kind": "step", "step": step, "total": start + steps,
                          "loss": 2 / step, "epoch": 1}, separators=(",", ":")),
              flush=True)
    state.write_text(str(start + steps))
    if "--hang" in argv:  # wait to be stopped; SIGINT raises KeyboardInterrupt (a traceback)
        print("hanging", flush=True)
        if "--ranked" not in argv:
            time.sleep(600)
        try:
            time.sleep(600)
        except KeyboardInterrupt:
            for line in traceback.format_exc().splitlines():
                print(f"[rank0]: {line}", flush=True)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
