"""A kohya-like trainer that runs past its step limit, for the stop-latency benchmark.

    python overshoot_trainer.py --record FILE [--max_train_steps=N] [--extra 1000]
                                [--step-seconds 0.02]

It prints kohya tqdm frames on stderr (two per step, ``\\r`` redraws; the frame format of
tests/helpers/fake_kohya.py) for steps 1..N+extra, one step every ``--step-seconds``,
ignoring the step limit lorasup injects as ``--max_train_steps`` (that is the N).

Timestamps are ``time.monotonic_ns()`` (CLOCK_MONOTONIC, shared by every process on the
machine), taken right after the first frame of a step is written and flushed (the first
frame is the one that makes a supervisor see the step):

- ``step_n_ns``: step N written; ``step_n1_ns``: step N+1 (the first line past N) written;
- ``signal_ns``: a SIGINT (or SIGTERM) arrived in the handler, which then writes FILE and
  exits; ``signal_step``: the last step written before it.

FILE gets one JSON object, also when no signal came (``signal_ns`` is then null).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time

BAR_CELLS = 10
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def frame(step: int, total: int, elapsed: float, avr: float | None) -> str:
    """The same text as tests/helpers/fake_kohya.py's frame()."""
    frac = step / total if total else 1.0
    filled = int(frac * BAR_CELLS)
    bar = "█" * filled + " " * (BAR_CELLS - filled)
    rate = elapsed / step if step else 0.0
    postfix = "" if avr is None else f", avr_loss={avr:.3g}"
    return (f"\rsteps: {int(frac * 100):3d}%|{bar}| {step}/{total} "
            f"[00:{int(elapsed):02d}<00:00, {rate:5.2f}s/it{postfix}]")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--max_train_steps", type=int, default=20, help="N (lorasup injects it)")
    p.add_argument("--extra", type=int, default=1000, help="steps to run past N")
    p.add_argument("--step-seconds", type=float, default=0.02)
    p.add_argument("--record", required=True, help="JSON file for the timestamps")
    args, _ = p.parse_known_args()
    n = args.max_train_steps
    record: dict[str, object] = {"n": n, "pid": os.getpid(), "step_n_ns": None,
                                 "step_n1_ns": None, "signal_ns": None, "signal": None,
                                 "signal_step": None}
    last = 0

    def save() -> None:
        tmp = args.record + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(record, fh)
        os.replace(tmp, args.record)

    def on_signal(signum: int, _frame: object) -> None:
        arrived = time.monotonic_ns()
        if record["signal_ns"] is None:
            record.update(signal_ns=arrived, signal=signal.Signals(signum).name,
                          signal_step=last)
        save()
        os._exit(130)

    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)

    err = sys.stderr
    err.write("running training / 学習開始\n")
    err.flush()
    start = time.monotonic()
    avr: float | None = None
    for step in range(1, n + args.extra + 1):
        time.sleep(args.step_seconds)
        elapsed = time.monotonic() - start
        text = frame(step, n, elapsed, avr)
        # The timestamp is taken *before* the write: lorasup can only react to a frame it
        # has read, so its signal always lands after this instant (taken after the write,
        # a signal that arrived during the write read as ~0 ms).
        if step == n:
            record["step_n_ns"] = time.monotonic_ns()
        elif step == n + 1:
            record["step_n1_ns"] = time.monotonic_ns()
        last = step
        err.write(text)
        err.flush()
        loss = 1.2 - 0.1 * math.log(step)
        avr = loss if avr is None else (avr * (step - 1) + loss) / step
        err.write(frame(step, n, elapsed, avr))
        err.flush()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
