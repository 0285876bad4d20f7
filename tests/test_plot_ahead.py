"""The plot child builds its figure ahead (issue 8): the same pixels, and it never lingers.

Real plot children (``python -m lorasup.supervisor.plot --wait``) and real lorasup runs.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageChops

from lorasup.supervisor.plot import (
    DPI,
    FIGSIZE,
    TICKS_AHEAD,
    PlotChild,
    blank_figure,
    render_loss_curves,
)
from tests.support import child_env, lorasup_argv

# every test here checks the drawing itself
pytestmark = pytest.mark.usefixtures("real_plot")

SIZE = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))


def a_report(steps: int = 120) -> dict[str, Any]:
    """Every kind of panel: lines with a gap and a non-finite value, an envelope, several
    learning rates, epochs (one partial), seconds per step, a resume; one empty panel."""
    xs = list(range(1, steps + 1))
    loss: list[Any] = [1.0 / (1 + 0.05 * s) + 0.02 * math.sin(s) for s in xs]
    loss[7], loss[11] = None, "nan"
    return {
        "run_id": "r1", "trainer": "builtin", "outcome": "completed",
        "steps": {"resumed_from": 20},
        "series": {
            "step": xs, "loss": loss, "avg_loss": [0.9 - s / 1000 for s in xs],
            "lr": [2e-4] * steps, "lr_by_tag": {"unet": [1e-4 * (1 - s / steps) for s in xs]},
            "s_per_step": [0.01 + 0.001 * (s % 7) for s in xs],
            "sources": {"loss": "console", "lr": "console", "unet": "console"},
            "envelope": {"loss": {"min": [0.1] * steps, "max": [1.2] * steps}},
            "sampling": {"method": "buckets", "bucket_steps": 2},
            "history": {"run_id": "r0", "step": list(range(1, 21)), "loss": [1.1] * 20,
                        "lr": [2e-4] * 20},
            "explanation": {"ema_loss": "the trainer reports no EMA"},
        },
        "epochs": [{"epoch": 1, "mean_loss": 0.6, "source": "lorasup"},
                   {"epoch": 2, "mean_loss": 0.5, "partial": True, "source": "lorasup"}],
        "timing": {"median_s_per_step": 0.013},
    }


def pixels(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image.convert("RGBA")


@pytest.mark.parametrize("report", [a_report(), a_report(5000),
                                    {"series": {"step": []}, "trainer": "command"}],
                         ids=["panels", "long", "empty"])
def test_a_prepared_figure_draws_the_same_pixels(tmp_path: Path, report: dict) -> None:
    fresh = render_loss_curves(report, tmp_path / "fresh.png")
    ahead = render_loss_curves(report, tmp_path / "ahead.png",
                               figure=blank_figure(TICKS_AHEAD))
    a, b = pixels(fresh), pixels(ahead)
    assert a.size == b.size == SIZE
    assert ImageChops.difference(a, b).getbbox() is None  # not one pixel differs


def test_the_waiting_child_draws_the_png(tmp_path: Path) -> None:
    plot = PlotChild()
    plot.start()
    assert plot.proc is not None
    proc = plot.proc
    path = plot.render(a_report(), tmp_path / "loss_curves.png")
    assert proc.returncode == 0
    assert pixels(path).size == SIZE
    assert [p.name for p in tmp_path.iterdir()] == ["loss_curves.png"]  # no .tmp left


def test_an_unused_child_ends_at_eof_and_a_discarded_one_at_once() -> None:
    unused = PlotChild()
    unused.start()
    assert unused.proc is not None
    proc = unused.proc
    unused.close()
    assert proc.returncode == 0
    refused = PlotChild()
    refused.start()
    assert refused.proc is not None
    proc = refused.proc
    refused.discard()
    assert proc.returncode == -signal.SIGKILL
    assert refused.proc is None


def test_a_refused_start_leaves_no_plot_child(tmp_path: Path) -> None:
    # lorasup leads a process group of its own; the plot child is started in it before the
    # job is checked, so a refused job must end it before lorasup exits.
    proc = subprocess.Popen(
        lorasup_argv("start", "--run-dir", str(tmp_path / "run"), "--trainer", "command",
                     "--steps", "1", "--", str(tmp_path / "no-such-program")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
        cwd=tmp_path, start_new_session=True)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2, stderr
    assert "trainer program not found" in stderr
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # nobody is left in lorasup's group
    assert not (tmp_path / "run").exists()


def test_a_builtin_run_still_leaves_its_png_and_its_last_log_line(tmp_path: Path) -> None:
    # Block-buffered stdout (no PYTHONUNBUFFERED): the fast exit after the run must still
    # deliver every log line, the outcome last.
    env = {k: v for k, v in child_env().items() if k != "PYTHONUNBUFFERED"}
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        lorasup_argv("start", "--run-dir", str(run_dir), "--log-format", "json",
                     "--steps", "20"),
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads(proc.stdout.splitlines()[-1])
    assert last["event"] == "outcome" and last["outcome"] == "completed"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["artifacts"]["loss_curves_png"] == "loss_curves.png"
    assert pixels(run_dir / "loss_curves.png").size == SIZE


def test_exit_now_flushes_the_standard_streams_and_keeps_the_code() -> None:
    env = {k: v for k, v in child_env().items() if k != "PYTHONUNBUFFERED"}
    code = ("import sys\n"
            "from lorasup.supervisor.quickexit import exit_now\n"
            "sys.stdout.write('out'); sys.stderr.write('err'); exit_now(3)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out", "err")
