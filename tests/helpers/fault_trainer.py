"""A trainer for fault tests: speaks the lorasup line protocol and reports on itself.

    fault_trainer.py [--steps N] [--step-seconds S] [--family PIDFILE] [--chatter BYTES]
                     [--hold] [--print-env NAME ...]

- prints its SIGINT/SIGTERM/SIGHUP dispositions and blocked mask (``signals: ...``) first;
- ``--family PIDFILE``: starts a silent worker (same session) and a silent grandchild in a
  session of its own (double fork + setsid), writes the three pids to PIDFILE, then trains;
- ``--hold``: after the last step, sleeps silently until signalled (a save that never ends);
- ``--chatter BYTES``: writes that many bytes of log text per step (fills a small disk);
- on SIGINT it prints ``cleanup ran`` (its KeyboardInterrupt path) and exits 130.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time


def _dispositions() -> str:
    names = []
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        handler = signal.getsignal(sig)
        state = ("ignored" if handler is signal.SIG_IGN else
                 "default" if handler in (signal.SIG_DFL, signal.default_int_handler) else
                 "handled")
        names.append(f"{sig.name}={state}")
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    names.append("blocked=" + (",".join(sorted(s.name for s in blocked)) or "none"))
    return " ".join(names)


def _silent_child(new_session: bool) -> int:
    """A child that sleeps without a word; in its own session when asked (double fork)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        if new_session:
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
        os.write(write_end, str(os.getpid()).encode())
        os.close(write_end)
        for fd in (0, 1, 2):
            os.close(fd)  # silent, and not holding lorasup's pipes
        while True:
            time.sleep(60)
    os.close(write_end)
    child = int(os.read(read_end, 32) or b"0")
    os.close(read_end)
    if new_session:
        os.waitpid(pid, 0)  # the intermediate parent: its child is now an orphan
    return child


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--step-seconds", type=float, default=0.05)
    parser.add_argument("--family")
    parser.add_argument("--hold", action="store_true")
    parser.add_argument("--chatter", type=int, default=0)
    parser.add_argument("--print-env", nargs="*", default=[])
    args = parser.parse_args()
    print(f"signals: {_dispositions()}", flush=True)
    for name in args.print_env:
        print(f"env: {name}={os.environ.get(name, '<absent>')}", flush=True)
    if args.family:
        pids = [os.getpid(), _silent_child(False), _silent_child(True)]
        with open(args.family + ".tmp", "w") as fh:
            fh.write(" ".join(map(str, pids)))
        os.replace(args.family + ".tmp", args.family)
    try:
        for step in range(1, args.steps + 1):
            time.sleep(args.step_seconds)
            if args.chatter:
                sys.stderr.write(("x" * 99 + "\n") * (args.chatter // 100))
                sys.stderr.flush()
            print(json.dumps({"lorasup": 1, "kind": "step", "step": step, "total": args.steps,
                              "loss": 1.0 / step}, separators=(",", ":")), flush=True)
        if args.hold:
            while True:
                time.sleep(60)
    except KeyboardInterrupt:
        print("cleanup ran", flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
