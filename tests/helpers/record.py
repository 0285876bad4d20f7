"""Record a program's raw output in the ../shared/recordings format (see its README).

    python tests/helpers/record.py OUT.jsonl [--env NAME=VALUE ...] -- PROGRAM ARGS...

The child gets pipes for stdout and stderr (what lorasup gives a trainer) and stdin from
/dev/null; every ``read()`` of either pipe becomes one ``chunk`` line with its time since
the start, then an ``exit`` line. ``--env`` adds variables to the child's environment.
Paths in argv under the current directory are written relative to it, the interpreter as
``<venv>/bin/python``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import selectors
import subprocess
import sys
import time


def _placeholder(arg: str) -> str:
    if arg == sys.executable or arg.endswith("/bin/python") or arg.endswith("/bin/python3"):
        return "<venv>/bin/python"
    cwd = os.getcwd() + "/"
    return "./" + arg[len(cwd):] if arg.startswith(cwd) else arg


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--env", action="append", default=[])
    if "--" not in sys.argv:
        parser.error("give the program after '--'")
    cut = sys.argv.index("--")
    args = parser.parse_args(sys.argv[1:cut])
    argv = sys.argv[cut + 1:]
    env = dict(os.environ)
    env.update(item.split("=", 1) for item in args.env)
    started = time.time()
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    records: list[dict] = [{"kind": "meta", "argv": [_placeholder(a) for a in argv],
                            "env": args.env, "started": round(started, 3)}]
    sel = selectors.DefaultSelector()
    for stream, fd in ((proc.stdout, 1), (proc.stderr, 2)):
        sel.register(stream.fileno(), selectors.EVENT_READ, fd)
    open_fds = 2
    while open_fds:
        for key, _ in sel.select():
            data = os.read(key.fileobj, 65536)  # type: ignore[arg-type]
            if not data:
                sel.unregister(key.fileobj)
                open_fds -= 1
                continue
            records.append({"kind": "chunk", "t": round(time.monotonic() - t0, 6),
                            "fd": key.data, "b64": base64.b64encode(data).decode()})
    code = proc.wait()
    records.append({"kind": "exit", "t": round(time.monotonic() - t0, 6), "returncode": code})
    with open(args.out, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, separators=(",", ":")) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
