"""loss_curves.png from a report dict (report.json's shape), so it can be redrawn any time.

This module is the plot child's side (``python -m lorasup.supervisor.plot``); lorasup's
side, which starts the child and waits for it, is supervisor/plotchild.py (re-exported
here for callers).

matplotlib is imported inside the function: importing it costs about a second, which must
not delay a run's start. The figure is built with the object API (``Figure`` on an Agg
canvas), not pyplot: no global backend switch, no figure registry to leak into, and safe
to call from the worker thread the sink renders in.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any, NoReturn

from lorasup.supervisor.plotchild import (
    PLOT_TIMEOUT_SECONDS,
    PlotChild,
    nothing_to_draw,
    render_in_child,
    render_nothing_recorded,
)
from lorasup.supervisor.plotfacts import epoch_ends, headline, step_range

__all__ = [
    "PLOT_TIMEOUT_SECONDS",
    "TICKS_AHEAD",
    "PlotChild",
    "blank_figure",
    "nothing_to_draw",
    "render_in_child",
    "render_loss_curves",
    "render_nothing_recorded",
]

DPI = 100
#: per-epoch points named (``e3``) on a step axis when there are at most this many
EPOCHS_NAMED = 8
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
    """Red crosses along the bottom edge: the legend lives at the top, so never over them."""
    if bad:
        ax.plot([steps[i] for i in bad], [0.03] * len(bad), "x", color="tab:red", ms=5,
                transform=ax.get_xaxis_transform(), label=f"non-finite ({len(bad)})",
                clip_on=False)


def _integer_steps(ax: Any, xrange: tuple[float, float] | None = None) -> None:
    """Whole step numbers on x, written out (no ``+3e3`` offset); ``xrange``: the range
    every step panel shares (:func:`step_range`)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(axis="x", useOffset=False, style="plain")
    if xrange is not None:
        ax.set_xlim(*xrange)


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=7, framealpha=0.7)


def _avg_title(series: dict[str, Any]) -> str:
    """The running average named for what it is: per epoch only when the data say so."""
    each = (series.get("avg_loss_resets") or {}).get("each_epoch")
    if each is True:
        return "trainer's running average, per epoch (restarts each epoch)"
    if each is False:
        return "trainer's running average (goes on across epochs)"
    return "trainer's running average"


#: major ticks made ahead per axis by :func:`blank_figure` (a 200-step run's panels use
#: up to 14 on x and 9 on y, out-of-view ones included); more are made when a panel needs them
TICKS_AHEAD = 14


def blank_figure(ticks: int = 0) -> Any:
    """The figure's skeleton, no data: Figure on an Agg canvas, margins, the 3x2 panels.

    Building it (and each axis's tick objects, ``ticks`` per axis) is a good part of a
    render's time; the waiting plot child builds it while the trainer trains, so that
    only the data and the drawing are left for the end of the run.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    # Fixed margins: the constrained layout engine doubled the time to draw (0.7 s → 0.35 s),
    # and that time is spent after the trainer exited.
    fig.subplots_adjust(left=0.07, right=0.98, top=0.93, bottom=0.05, hspace=0.35,
                        wspace=0.18)
    FigureCanvasAgg(fig)
    fig.subplots(3, 2)
    if ticks > 0:
        for ax in fig.axes:
            ax.xaxis.get_major_ticks(ticks)
            ax.yaxis.get_major_ticks(ticks)
    return fig


def render_loss_curves(report: dict[str, Any], png_path: str | os.PathLike[str],
                       figure: Any = None) -> Path:
    """Six panels: loss, running average, epoch means, EMA, learning rate(s), s/step.

    A series the trainer did not report gets an empty panel saying so, never a line.
    Written atomically (``.tmp`` then rename); returns the path. ``figure``: an unused
    :func:`blank_figure` to draw into (it is used up: the caller must not draw into it
    again); without one a new figure is made and cleared afterwards.
    """
    series = report.get("series") or {}
    explanation = series.get("explanation") or {}
    sources = series.get("sources") or {}
    trainer = report.get("trainer") or "the trainer"
    steps: list[int] = list(series.get("step") or [])

    fig = figure if figure is not None else blank_figure()
    axes = fig.axes
    sampling = series.get("sampling") or {}
    sampled = (f" · {sampling.get('bucket_steps')} steps per point"
               if sampling.get("method") == "buckets" else "")
    earlier = series.get("history") if isinstance(series.get("history"), dict) else None
    continues = f" · continues {earlier.get('run_id')}" if earlier else ""
    title = f"{report.get('run_id') or 'run'} · {trainer}{sampled}{continues}"
    problems = [p for p in report.get("problems") or [] if not p.get("expected")]
    if not steps and problems:  # nothing to draw: say what went wrong instead
        title += f"\n{problems[-1].get('problem')}: {str(problems[-1].get('line'))[:110]}"
    # The numbers first, big; which run it is below them.
    fig.subplots_adjust(top=0.9 if "\n" not in title else 0.88)
    fig.suptitle(headline(report), fontsize=13, fontweight="bold", y=0.985)
    fig.text(0.5, 0.955, title, ha="center", va="top", fontsize=9, color="0.3")
    xrange = step_range(report)

    history = series.get("history") if isinstance(series.get("history"), dict) else None
    resumed = (report.get("steps") or {}).get("resumed_from")

    def mark_resume(ax: Any) -> None:
        if resumed:
            ax.axvline(resumed + 0.5, color="0.4", lw=1, ls="--",
                       label=f"resumed after step {resumed}")

    def draw_history(ax: Any, name: str, color: str) -> bool:
        if history is None:
            return False
        values, _ = _floats(history.get(name))
        xs = list(history.get("step") or [])
        if xrange is not None:  # only the lead-in: the y-range is this run's business
            shown = [i for i, x in enumerate(xs[:len(values)]) if x >= xrange[0]]
            xs, values = [xs[i] for i in shown], [values[i] for i in shown]
        if not _has(values):
            return False
        ax.plot(xs, values, color=color, lw=0.9, alpha=0.4, label="before the resume")
        return True

    def line_panel(ax: Any, name: str, title: str, color: str, ylabel: str,
                   empty: str | None = None) -> None:
        values, bad = _floats(series.get(name))
        source = sources.get(name)
        ax.set_title(f"{title} ({source})" if source else title, fontsize=10)
        if not _has(values) and not bad:
            _empty(ax, empty or explanation.get(name) or f"not reported by {trainer}")
            return
        envelope = (series.get("envelope") or {}).get(name)
        if envelope and len(steps) == len(envelope.get("min") or ()):
            low, _ = _floats(envelope["min"])
            high, _ = _floats(envelope["max"])
            ax.fill_between(steps, low, high, color=color, alpha=0.25, lw=0,
                            label="min-max per bucket")
        if draw_history(ax, name, color):
            mark_resume(ax)
        ax.plot(steps, values, color=color, lw=0.9)
        _mark_nonfinite(ax, steps, bad)
        _legend(ax)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        _integer_steps(ax, xrange)
        ax.grid(alpha=0.3)

    line_panel(axes[0], "loss", "per-step loss", "tab:blue", "loss")
    line_panel(axes[1], "avg_loss", _avg_title(series), "tab:orange", "average loss")

    ax = axes[2]
    ax.set_title("per-epoch mean loss", fontsize=10)
    epochs = [e for e in report.get("epochs") or [] if e.get("mean_loss") is not None]
    numbers, _ = _floats([e["mean_loss"] for e in epochs])
    if _has(numbers):
        ends = epoch_ends(series)
        on_steps = all(e["epoch"] in ends for e in epochs)
        # At the step each epoch ended, like every other panel; by epoch number only
        # when the steps do not say where epochs ended.
        xs = [ends[e["epoch"]] if on_steps else e["epoch"] for e in epochs]
        ax.plot(xs, numbers, "-", color="tab:green")
        full = [i for i, e in enumerate(epochs) if not e.get("partial")]
        part = [i for i, e in enumerate(epochs) if e.get("partial")]
        ax.plot([xs[i] for i in full], [numbers[i] for i in full], "o", color="tab:green")
        if part:
            ax.plot([xs[i] for i in part], [numbers[i] for i in part], "o", mfc="white",
                    color="tab:green", label="partial epoch")
            _legend(ax)
        ax.set_xlabel("step (the end of each epoch)" if on_steps else "epoch")
        ax.set_ylabel("mean loss")
        _integer_steps(ax, xrange if on_steps else None)
        if on_steps and len(xs) <= EPOCHS_NAMED:
            for x, y, e in zip(xs, numbers, epochs, strict=True):
                if not math.isnan(y):
                    ax.annotate(f"e{e['epoch']}", (x, y), textcoords="offset points",
                                xytext=(0, 5), ha="center", fontsize=7, color="0.3")
        elif not on_steps and len(xs) <= 20:
            ax.set_xticks(xs)
        ax.set_title(f"per-epoch mean loss: {epochs[0].get('source')}", fontsize=10)
        ax.grid(alpha=0.3)
    else:
        _empty(ax, "no per-epoch mean: " + (explanation.get("loss") or "no per-step loss")
               if report.get("epochs") else "no epochs reported")

    ema = series.get("ema") or {}
    line_panel(axes[3], "ema_loss",
               f"EMA (alpha={ema.get('alpha')}) of {ema.get('basis') or 'loss'}", "tab:purple",
               "smoothed loss", empty=explanation.get("ema_loss") or "no loss series to smooth")

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
        if draw_history(ax, "lr", "0.5"):
            mark_resume(ax)
        _legend(ax)
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        _integer_steps(ax, xrange)
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
            _legend(ax)
        ax.set_xlabel("step")
        ax.set_ylabel("seconds")
        _integer_steps(ax, xrange)
        ax.grid(alpha=0.3)
    else:
        _empty(ax, explanation.get("s_per_step") or "fewer than two timed steps")

    path = Path(png_path)
    # A random O_EXCL name: a link planted in a shared run directory is never written through.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            # zlib level 3, not Pillow's 6: the same pixels, ~6 % more bytes, ~25 ms less
            # (the encode runs after the trainer exited).
            fig.savefig(fh, format="png", dpi=DPI, pil_kwargs={"compress_level": 3})
            os.fchmod(fh.fileno(), 0o644)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if figure is None:
            fig.clear()
    return path


def _die_with_parent() -> None:
    """The early plot child must not outlive a lorasup that was SIGKILLed while the child
    was still importing matplotlib at idle priority (it would read EOF only afterwards)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import ctypes.util

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() == 1:  # the parent died before the line above ran
        raise SystemExit(0)


def _main() -> NoReturn:
    # After the PNG (or EOF) the child skips the interpreter's teardown (~0.15 s with
    # matplotlib loaded): lorasup waits for this exit.
    from lorasup.supervisor.quickexit import exit_now

    if sys.argv[1:] == ["--wait"]:
        _die_with_parent()
        # While the trainer trains (at idle priority): matplotlib's import and the empty
        # figure, its tick objects included; the end of the run only adds data and draws.
        figure = blank_figure(TICKS_AHEAD)
        data = sys.stdin.buffer.read()
        if not data:
            exit_now(0)  # the run ended without asking for a plot
        request = json.loads(data)
        render_loss_curves(request["report"], request["png"], figure=figure)
        exit_now(0)
    render_loss_curves(json.load(sys.stdin), sys.argv[1], figure=blank_figure())
    exit_now(0)


if __name__ == "__main__":
    _main()
