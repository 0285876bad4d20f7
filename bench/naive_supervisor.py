"""The baseline: how LoRA GUIs and wrapper scripts commonly supervise a trainer.

    python naive_supervisor.py [--log FILE] -- TRAINER ARGV...

``subprocess.Popen(argv, stdout=PIPE, stderr=STDOUT, text=True)`` and a ``readline()``
loop that runs five regexes (step, loss, lr, epoch, error) over every line. Text mode
reads with universal newlines, so tqdm's ``\\r`` redraws come out as lines. No step gate,
no watchdogs, no events file, no report: only the parsing a progress display needs.

Prints one JSON object on stdout: ``trainer_s`` (Popen until the trainer exited, noticed
by a thread blocked in wait()), ``total_s`` (until the last line was read), ``lines``,
``last_step``, ``losses`` (how many lines had a loss), ``errors``, ``returncode``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time

STEP = re.compile(r"(\d+)/(\d+) \[")
LOSS = re.compile(r"(?:avr_)?loss[=:]\s*([-+0-9.eE]+|nan|inf)")
LR = re.compile(r"\blr[=:]\s*([-+0-9.eE]+)")
EPOCH = re.compile(r"epoch (\d+)/(\d+)")
ERROR = re.compile(r"Traceback|Error|CUDA out of memory")


def main() -> int:
    parser = argparse.ArgumentParser(usage=__doc__)
    parser.add_argument("--log", help="also append every line to this file")
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        parser.error("give the trainer command after --")

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, encoding="utf-8",
                            errors="replace", env=env)
    exited: list[float] = []

    def waiter() -> None:
        proc.wait()
        exited.append(time.perf_counter())

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()

    log = open(args.log, "a", encoding="utf-8") if args.log else None  # noqa: SIM115
    lines = losses = errors = 0
    last_step = lr = epoch = None
    assert proc.stdout is not None
    readline = proc.stdout.readline
    while True:
        line = readline()
        if not line:
            break
        lines += 1
        if log is not None:
            log.write(line)
        m = STEP.search(line)
        if m:
            last_step = int(m[1])
        m = LOSS.search(line)
        if m:
            losses += 1
        m = LR.search(line)
        if m:
            lr = m[1]
        m = EPOCH.search(line)
        if m:
            epoch = int(m[1])
        if ERROR.search(line):
            errors += 1
    done = time.perf_counter()
    thread.join()
    if log is not None:
        log.close()
    print(json.dumps({"trainer_s": round(exited[0] - started, 4),
                      "total_s": round(done - started, 4), "lines": lines,
                      "last_step": last_step, "losses": losses, "errors": errors,
                      "lr": lr, "epoch": epoch, "returncode": proc.returncode}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
