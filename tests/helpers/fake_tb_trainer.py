"""A kohya-like trainer whose console looks healthy while its TensorBoard loss is NaN.

It draws kohya's ``steps:`` bar on stderr (two frames per step, a finite ``avr_loss``)
and, like kohya with ``--logging_dir``, writes ``loss/current``, ``loss/average`` and
``lr/unet`` for every step to ``<logging_dir>/<timestamp>/network_train/events.out.
tfevents.*`` (with tests/tb_writer.py). ``loss/current`` is NaN at ``--nan-step``; the
running average it writes (and shows) stays finite, so only the event file tells.

    python fake_tb_trainer.py --max_train_steps=50 --logging_dir=DIR
                              [--step-seconds 0.3] [--nan-step 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import socket
import sys
import time
from pathlib import Path

BAR_CELLS = 10
TB_WRITER = Path(__file__).resolve().parent.parent / "tb_writer.py"


def load_tb_writer():
    spec = importlib.util.spec_from_file_location("tb_writer", TB_WRITER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def frame(step: int, total: int, elapsed: float, avr: float | None) -> str:
    filled = step * BAR_CELLS // total
    bar = "█" * filled + " " * (BAR_CELLS - filled)
    postfix = "" if avr is None else f", avr_loss={avr:.3g}"
    rate = f"{step / elapsed:5.2f}it/s" if step and elapsed > 0 else "?it/s"
    return (f"\rsteps: {step * 100 // total:3d}%|{bar}| {step}/{total} "
            f"[00:{int(elapsed):02d}<00:00, {rate}{postfix}]")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max_train_steps", type=int, default=50)
    parser.add_argument("--logging_dir", required=True)
    parser.add_argument("--step-seconds", type=float, default=0.3)
    parser.add_argument("--nan-step", type=int, default=3)
    args, _ignored = parser.parse_known_args()
    tb = load_tb_writer()
    total = args.max_train_steps
    folder = Path(args.logging_dir, time.strftime("%Y%m%d%H%M%S"), "network_train")
    folder.mkdir(parents=True, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.0"
    began = time.monotonic()
    with open(folder / name, "wb") as events:
        tb.write_file_version(events)
        events.flush()
        sys.stderr.write(frame(0, total, 0.0, None))
        sys.stderr.flush()
        avr: float | None = None
        seen: list[float] = []
        for step in range(1, total + 1):
            time.sleep(args.step_seconds)
            elapsed = time.monotonic() - began
            sys.stderr.write(frame(step, total, elapsed, avr))  # tqdm update: old postfix
            sys.stderr.flush()
            loss = math.nan if step == args.nan_step else 1.0 + 0.1 * math.sin(step)
            seen.append(1.0 + 0.1 * math.sin(step))  # what the console average shows
            avr = sum(seen) / len(seen)
            sys.stderr.write(frame(step, total, elapsed, avr))  # set_postfix
            sys.stderr.flush()
            now = time.time()
            for tag, value in (("loss/current", loss), ("loss/average", avr),
                               ("lr/unet", 1e-4)):
                tb.write_scalar_event(events, tag, step, value, now)
            events.flush()
    sys.stderr.write("\n")
    print("model saved.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
