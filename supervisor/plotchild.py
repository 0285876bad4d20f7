"""The plot child, seen from lorasup: start it early, hand it the report, wait for the PNG.

The drawing itself (matplotlib, ~40 MB, a second to import) runs in a child process,
``python -m lorasup.supervisor.plot`` (supervisor/plot.py), so that its memory and any
crash of it stay out of the supervisor. A run with nothing to draw gets a small Pillow
PNG that says so, without waiting for matplotlib. ``LORASUP_NO_PLOT=1`` (tests, CI) skips
matplotlib for every run: the PNG then says it was not drawn.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

#: set to "1" to skip matplotlib: loss_curves.png is then a placeholder that says so
NO_PLOT_ENV = "LORASUP_NO_PLOT"
NOTHING_RECORDED = "no training step was recorded: there are no loss curves to draw."
SKIPPED = f"loss curves not drawn: {NO_PLOT_ENV}=1 is set (a test/CI switch)."

PLOT_TIMEOUT_SECONDS = 300.0


def nothing_to_draw(report: dict[str, Any]) -> bool:
    """No step and no other point in any series: every panel would be empty."""
    series = report.get("series") or {}
    if series.get("step"):
        return False
    if any(e.get("mean_loss") is not None for e in report.get("epochs") or ()):
        return False
    for name in ("epoch_loss", "val_loss", "other"):
        value = series.get(name)
        if value and (not isinstance(value, dict) or any(value.values())):
            return False
    return True


def plot_skipped() -> bool:
    """``LORASUP_NO_PLOT=1``: no matplotlib at all (a test/CI switch; see the README)."""
    return os.environ.get(NO_PLOT_ENV) == "1"


def render_nothing_recorded(report: dict[str, Any], png_path: str | os.PathLike[str],
                            why: str = NOTHING_RECORDED) -> Path:
    """A small PNG that says there was nothing to plot (or why no plot was drawn), drawn
    with Pillow in-process (milliseconds; no matplotlib). The run still leaves a PNG, and it
    does not pretend."""
    import io

    from PIL import Image, ImageDraw

    from lorasup.supervisor.safefs import atomic_write

    status = report.get("outcome") or report.get("status") or "running"
    lines = [f"{report.get('run_id') or 'run'} · {report.get('trainer') or 'trainer'} · {status}",
             why,
             str(report.get("reason") or "")[:110], "see report.json and trainer.log"]
    image = Image.new("RGB", (900, 140), "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(x for x in lines if x):
        draw.text((20, 20 + 28 * i), line, fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write(png_path, buffer.getvalue())
    return Path(png_path)


class PlotChild:
    """The process that draws loss_curves.png, started with the run.

    It imports matplotlib at once, at idle priority (while the trainer trains), then waits for the
    report on its stdin; at the end of the run only the drawing is left to wait for. When
    lorasup goes away without sending anything, the child sees EOF and exits. It is
    lorasup's child, not the guard's, so it is never part of the trainer's tree; it is in a
    session of its own, so a Ctrl-C meant to stop the run leaves the drawing be.
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if plot_skipped():
            return
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lorasup.supervisor.plot", "--wait"],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                # Its own session: Ctrl-C (or Ctrl-\) at the terminal signals the whole
                # foreground process group, and the drawing must outlive that stop. It still
                # dies with lorasup (PDEATHSIG, and EOF on its stdin: see plot.py).
                close_fds=True, start_new_session=True)
        except OSError:
            self.proc = None
            return
        # Its import runs only on a CPU nobody else wants: the trainer and lorasup first.
        # Set (and later lifted) from here, not by the child: a child that starved itself
        # at idle priority could not be relied on to lift itself in time.
        _policy(self.proc.pid, "SCHED_IDLE")

    def hurry(self) -> None:
        """The drawing will be wanted soon (the trainer is done): normal priority again."""
        if self.proc is not None and self.proc.poll() is None:
            _policy(self.proc.pid, "SCHED_OTHER")

    def render(self, report: dict[str, Any], png_path: str | os.PathLike[str]) -> Path:
        """Send the report, wait for the PNG; a fresh child if the early one is gone."""
        proc, self.proc = self.proc, None
        if nothing_to_draw(report):
            # No curve to draw: matplotlib is not waited for (a run that failed at once
            # ends at once), the PNG says so instead.
            if proc is not None:
                with contextlib.suppress(OSError):
                    proc.kill()
                proc.communicate()
            return render_nothing_recorded(report, png_path)
        if plot_skipped():
            return render_nothing_recorded(report, png_path, SKIPPED)
        if proc is None or proc.poll() is not None:
            return render_in_child(report, png_path)
        _policy(proc.pid, "SCHED_OTHER")  # the drawing is wanted now
        payload = json.dumps({"png": os.fspath(png_path), "report": report}).encode()
        try:
            _, stderr = proc.communicate(payload, timeout=PLOT_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise RuntimeError("plot process timed out") from None
        except BrokenPipeError:
            proc.wait()
            stderr = b""
        _check(proc.returncode, stderr)
        return Path(png_path)

    def discard(self) -> None:
        """The run was refused before it started: end the child now (SIGKILL), not after
        its import (EOF is read only then)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.communicate()

    def close(self) -> None:
        """Let an unused child go (EOF on its stdin)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            # It reads the EOF only after its import: at idle priority, on a busy machine,
            # that could take longer than the wait below.
            _policy(proc.pid, "SCHED_OTHER")
            with contextlib.suppress(Exception):
                proc.communicate(b"", timeout=30)


def _policy(pid: int, name: str) -> None:
    """Set a process's scheduling policy where the platform has it; never fails."""
    policy = getattr(os, name, None)
    if policy is None or not hasattr(os, "sched_setscheduler"):
        return
    with contextlib.suppress(OSError):
        os.sched_setscheduler(pid, policy, os.sched_param(0))


def _check(returncode: int | None, stderr: bytes) -> None:
    if returncode != 0:
        tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"plot process exited {returncode}: {tail[0]}")


def render_in_child(report: dict[str, Any], png_path: str | os.PathLike[str]) -> Path:
    """Draw in a short-lived child process: matplotlib's ~40 MB and any crash of it stay
    out of the supervisor, whose memory must stay flat however long it runs."""
    if plot_skipped():
        return render_nothing_recorded(report, png_path, SKIPPED)
    proc = subprocess.run(
        [sys.executable, "-m", "lorasup.supervisor.plot", os.fspath(png_path)],
        input=json.dumps(report).encode(), capture_output=True, timeout=PLOT_TIMEOUT_SECONDS,
        check=False, start_new_session=True)  # see PlotChild.start
    _check(proc.returncode, proc.stderr)
    return Path(png_path)
