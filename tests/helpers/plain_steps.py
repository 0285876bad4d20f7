"""A training program that prints plain progress lines, the way hand-written loops do.

``plain_steps.py STEPS [--form iter|step|custom]``: prints ``ready``, then one line per step
with a loss that is a known function of the step (``loss = 1 / step``), flushed, a short
pause between steps; on SIGINT it prints ``interrupted`` and exits 130. Forms:

- ``iter``: ``iter 3 loss=0.3333``
- ``step``: ``Step 3/STEPS | loss: 0.3333 | lr: 0.0001``
- ``custom``: ``[train] it=3 L=0.3333 eta=1e-4`` (only a ``[parse]`` table can read it)
"""

from __future__ import annotations

import signal
import sys
import time


def main() -> int:
    steps = int(sys.argv[1])
    form = sys.argv[sys.argv.index("--form") + 1] if "--form" in sys.argv else "iter"

    def stop(_signum: int, _frame: object) -> None:
        print("interrupted", flush=True)
        sys.exit(130)

    signal.signal(signal.SIGINT, stop)
    print("ready", flush=True)
    for step in range(1, steps + 1):
        loss = 1 / step
        if form == "iter":
            print(f"iter {step} loss={loss:.4f}", flush=True)
        elif form == "step":
            print(f"Step {step}/{steps} | loss: {loss:.4f} | lr: 0.0001", flush=True)
        else:
            print(f"[train] it={step} L={loss:.4f} eta=1e-4", flush=True)
        time.sleep(0.02)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
