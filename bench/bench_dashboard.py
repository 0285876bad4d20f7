"""The dashboard's run page for a long history, end to end (issue 18: "a page of 1M-step
history loads in under 2 s and never sends more than `points` rows").

    python bench/bench_dashboard.py [--steps 1000000] [--rounds 3]

A real daemon runs a firehose trainer (``bench/firehose.py``: one kohya bar line a step) to
``--steps``; then, ``--rounds`` times, the daemon is restarted (so nothing is folded yet)
and the system chromium opens ``/jobs/<id>``: the time from navigation to the chart drawn
(``data-points`` set), the time of the page's ``/series`` request alone, and the rows it
held. Needs ``chromium`` on PATH and pip ``playwright``.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from serve_common import start_daemon

BENCH = Path(__file__).resolve().parent
TOKEN = "bench-" + "d" * 26


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(state: Path, port: int, token: Path, log: Any) -> tuple[subprocess.Popen[bytes],
                                                                    httpx.Client]:
    return start_daemon(state, log, "--listen", f"127.0.0.1:{port}", "--token-file",
                        str(token))


def stop(daemon: subprocess.Popen[bytes]) -> None:
    daemon.terminate()
    daemon.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--points", type=int, default=2000)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH")
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        token = tmp / "token"
        token.write_text(TOKEN, encoding="utf-8")
        port = free_port()
        log = (tmp / "daemon.log").open("ab")
        daemon, http = start(tmp / "state", port, token, log)
        job = {"trainer": "kohya", "steps": args.steps, "no_output_timeout": 60,
               "command": [sys.executable, str(BENCH / "firehose.py"), "--steps",
                           str(args.steps)]}
        began = time.monotonic()
        ident = http.post("/jobs", json={"job": job, "cwd": str(tmp)}).json()["id"]
        while http.get(f"/jobs/{ident}").json()["state"] not in ("completed", "failed",
                                                                   "cancelled", "lost"):
            time.sleep(0.5)
        shown = http.get(f"/jobs/{ident}").json()
        print(f"job {ident}: {shown['state']} at step {shown.get('step')} in "
              f"{time.monotonic() - began:.1f} s (firehose under the daemon)")
        origin = f"http://127.0.0.1:{port}"
        pages: list[float] = []
        series: list[float] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            for _ in range(args.rounds):
                stop(daemon)  # a cold daemon: nothing of the job folded yet
                daemon, http = start(tmp / "state", port, token, log)
                context = browser.new_context()
                page = context.new_page()
                page.goto(f"{origin}/?token={TOKEN}")
                started = time.monotonic()
                with page.expect_response(lambda r: "/series" in r.url,
                                          timeout=60_000) as answer:
                    page.goto(f"{origin}/jobs/{ident}")
                page.wait_for_function(
                    "() => Number(document.querySelector('[data-testid=loss-chart]')"
                    "?.dataset.points) > 0", timeout=60_000)
                pages.append(time.monotonic() - started)
                response = answer.value
                rows = len(response.json()["count"])
                series.append(response.request.timing["responseEnd"] / 1000)
                print(f"page drawn {pages[-1]:.2f} s; /series answered in "
                      f"{series[-1]:.2f} s with {rows} rows (points={args.points})")
                context.close()
            browser.close()
        stop(daemon)
        print(f"{args.steps} steps, {args.rounds} cold loads: page median "
              f"{statistics.median(pages):.2f} s (max {max(pages):.2f}); /series median "
              f"{statistics.median(series):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
