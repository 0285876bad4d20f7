"""Play a recording from ../shared/recordings back as a real child process.

Writes each chunk's bytes to the same fd (1 or 2) at its recorded time divided by
``--speed``, then exits with the recorded code (a negative code: kills itself with that
signal). Extra arguments (such as an injected ``--max_train_steps=N``) are ignored, so a
supervisor can treat this exactly like the trainer that was recorded.

    python replay.py RECORDING.jsonl [--speed 50] [--stop-at-signal] [ignored args...]

``--stop-at-signal``: a recording that got a signal from its recorder; replay until it,
then wait to be signalled for real and play the rest (the trainer's reaction) after.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("recording")
    parser.add_argument("--speed", type=float, default=1.0)
    parser.add_argument("--stop-at-signal", action="store_true")
    args, _ignored = parser.parse_known_args()
    with open(args.recording, encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    start = time.monotonic()
    offset = 0.0
    received: list[int] = []
    if args.stop_at_signal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda s, _f: received.append(s))
    for record in records:
        kind = record["kind"]
        if kind == "chunk":
            delay = start + (record["t"] - offset) / args.speed - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            os.write(record["fd"], base64.b64decode(record["b64"]))
        elif kind == "signal" and args.stop_at_signal:
            while not received:
                signal.pause()
            # The rest of the recording is the reaction: play it from now on.
            offset = record["t"]
            start = time.monotonic()
        elif kind == "exit":
            code = int(record["returncode"])
            delay = start + (record["t"] - offset) / args.speed - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sys.stdout.flush()
            if code < 0:
                signal.signal(-code, signal.SIG_DFL)
                os.kill(os.getpid(), -code)
                signal.pause()
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
