"""loss_curves.png from a report dict (report.json's shape), so it can be redrawn any time.

matplotlib is imported inside the function: importing it costs about a second, which must
not delay a run's start. The figure is built with the object API (``Figure`` on an Agg
canvas), not pyplot: no global backend switch, no figure registry to leak into, and safe
to call from the worker thread the sink renders in.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

DPI = 100
FIGSIZE = (12.0, 10.0)


def _floats(values: list[Any] | None) -> tuple[list[float], list[int]]:
    """Plot-ready floats (NaN = gap) and the indices of reported non-finite values."""
    out: list[float] = []
    bad: list[int] = []
    for i, value in enumerate(values or []):
        if value is None:
            out.append(math.nan)
            continue
        number = float(value)  # "nan" / "inf" / "-inf" spell the non-finite ones
        if not math.isfinite(number):
            bad.append(i)
            number = math.nan
        out.append(number)
    return out, bad


def _has(values: list[float]) -> bool:
    return any(not math.isnan(v) for v in values)


def _empty(ax: Any, text: str) -> None:
    """An empty panel that says why: a missing series is shown as missing, not drawn."""
    label = ax.text(0.5, 0.5, textwrap.fill(text, 60), ha="center", va="center", fontsize=9,
                    color="0.35", transform=ax.transAxes)
    label.set_in_layout(False)  # long text must not shrink the panel
    ax.set_xticks([])
    ax.set_yticks([])


def _mark_nonfinite(ax: Any, steps: list[int], bad: list[int]) -> None:
    if bad:
        ax.plot([steps[i] for i in bad], [0.97] * len(bad), "x", color="tab:red", ms=5,
                transform=ax.get_xaxis_transform(), label=f"non-finite ({len(bad)})")
        ax.legend(loc="upper right", fontsize=8)


def render_loss_curves(report: dict[str, Any], png_path: str | os.PathLike[str]) -> Path:
    """Six panels: loss, running average, epoch means, EMA, learning rate(s), s/step.

    A series the trainer did not report gets an empty panel saying so, never a line.
    Written atomically (``.tmp`` then rename); returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = report.get("series") or {}
    explanation = series.get("explanation") or {}
    sources = series.get("sources") or {}
    trainer = report.get("trainer") or "the trainer"
    steps: list[int] = list(series.get("step") or [])

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 2).ravel()
    status = report.get("outcome") or report.get("status") or "running"
    fig.suptitle(f"{report.get('run_id') or 'run'} · {trainer} · {status}", fontsize=12)

    def line_panel(ax: Any, name: str, title: str, color: str, empty: str | None = None) -> None:
        values, bad = _floats(series.get(name))
        source = sources.get(name)
        ax.set_title(f"{title} ({source})" if source else title, fontsize=10)
        if not _has(values) and not bad:
            _empty(ax, empty or explanation.get(name) or f"not reported by {trainer}")
            return
        ax.plot(steps, values, color=color, lw=0.9)
        _mark_nonfinite(ax, steps, bad)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)

    line_panel(axes[0], "loss", "per-step loss", "tab:blue")
    line_panel(axes[1], "avg_loss", "trainer's running average", "tab:orange")

    ax = axes[2]
    ax.set_title("per-epoch mean loss", fontsize=10)
    epochs = [e for e in report.get("epochs") or [] if e.get("mean_loss") is not None]
    numbers, _ = _floats([e["mean_loss"] for e in epochs])
    if _has(numbers):
        xs = [e["epoch"] for e in epochs]
        ax.plot(xs, numbers, "o-", color="tab:green")
        ax.set_xlabel("epoch")
        ax.set_xticks(xs if len(xs) <= 20 else ax.get_xticks())
        ax.set_title(f"per-epoch mean loss: {epochs[0].get('source')}", fontsize=10)
        ax.grid(alpha=0.3)
    else:
        _empty(ax, "no per-epoch mean: " + (explanation.get("loss") or "no per-step loss")
               if report.get("epochs") else "no epochs reported")

    ema = series.get("ema") or {}
    line_panel(axes[3], "ema_loss",
               f"EMA (alpha={ema.get('alpha')}) of {ema.get('basis') or 'loss'}", "tab:purple",
               empty="no loss series to smooth")

    ax = axes[4]
    ax.set_title("learning rate", fontsize=10)
    lrs = {"lr": series.get("lr"), **(series.get("lr_by_tag") or {})}
    drawn = 0
    for name, values in lrs.items():
        numbers, _ = _floats(values)
        if _has(numbers):
            ax.plot(steps, numbers, lw=0.9, label=f"{name} ({sources.get(name)})")
            drawn += 1
    if drawn:
        ax.legend(fontsize=8)
        ax.set_xlabel("step")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.grid(alpha=0.3)
    else:
        _empty(ax, explanation.get("lr") or f"not reported by {trainer}")

    ax = axes[5]
    ax.set_title("seconds per step", fontsize=10)
    numbers, _ = _floats(series.get("s_per_step"))
    if _has(numbers):
        ax.plot(steps, numbers, ".", color="tab:gray", ms=2 if len(steps) > 500 else 5)
        median = (report.get("timing") or {}).get("median_s_per_step")
        if median is not None:
            ax.axhline(median, color="tab:red", lw=1, label=f"median {median:.3g} s")
            ax.legend(fontsize=8)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    else:
        _empty(ax, "fewer than two timed steps")

    path = Path(png_path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        fig.clear()
    return path


PLOT_TIMEOUT_SECONDS = 300.0


def render_in_child(report: dict[str, Any], png_path: str | os.PathLike[str]) -> Path:
    """Draw in a short-lived child process: matplotlib's ~40 MB and any crash of it stay
    out of the supervisor, whose memory must stay flat however long it runs."""
    proc = subprocess.run(
        [sys.executable, "-m", "lorasup.supervisor.plot", os.fspath(png_path)],
        input=json.dumps(report).encode(), capture_output=True, timeout=PLOT_TIMEOUT_SECONDS,
        check=False)
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"plot process exited {proc.returncode}: {tail[0]}")
    return Path(png_path)


def _main() -> int:
    render_loss_curves(json.load(sys.stdin), sys.argv[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
