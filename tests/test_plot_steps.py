"""The PNG's headline and its x-axes (issue 17.6): every panel has the steps of this run
as x (a resumed attempt's k+1..N, never an offset axis), and the numbers people look for
are on top. A real resumed run of the builtin trainer, drawn in this process."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorasup.supervisor.plotfacts import epoch_ends, headline, step_range
from tests.support import run_lorasup


def test_the_steps_of_this_run_with_at_most_as_many_before_them() -> None:
    assert step_range({"steps": {"first": 1, "last": 200}}) == pytest.approx((-2.98, 203.98))
    one = step_range({"steps": {"first": 3001, "last": 3001}})
    assert one == (3000.5, 3001.5)  # one step: still whole numbers around it, no offset
    resumed = {"steps": {"first": 3001, "last": 3200},
               "series": {"step": [3001, 3200],
                          "history": {"step": list(range(1, 3001))}}}
    low, high = step_range(resumed)  # type: ignore[misc]
    assert 2790 < low < 2801 and 3200 < high < 3210  # a lead-in as long as the run
    short_history = {"steps": {"first": 11, "last": 200},
                     "series": {"history": {"step": [4, 10]}}}
    assert step_range(short_history)[0] < 4  # type: ignore[index]
    assert step_range({"series": {"step": [5, 9]}}) == (4.5, 9.5)  # from the series
    assert step_range({"steps": {}, "series": {"step": []}}) is None


def test_the_headline_has_the_numbers_and_leaves_out_what_is_not_known() -> None:
    report = {"outcome": "completed",
              "steps": {"requested": 200, "resumed_from": 3000, "first": 3001, "last": 3200},
              "loss": {"basis": "loss", "final": 0.14298, "min": 0.08772, "min_step": 3127},
              "timing": {"duration_s": 125.0, "median_s_per_step": 0.00337}}
    assert headline(report) == ("completed · step 3200/3200 (from 3001) · final loss 0.143 · "
                                "min 0.08772 at step 3127 · 2 min 05 s · 0.00337 s/step")
    assert headline({"outcome": "trainer_failed", "steps": {"requested": 40}}) == "trainer_failed"
    assert headline({"status": "running", "steps": {"first": 1, "last": 7, "requested": 40},
                     "loss": {"basis": "avg_loss", "final": "nan"}}) == "running · step 7/40"


def test_epochs_end_where_their_last_step_is() -> None:
    series = {"step": [1, 2, 3, 4, 5], "epoch": [1, 1, 2, 2, 3]}
    assert epoch_ends(series) == {1: 2, 2: 4, 3: 5}
    assert epoch_ends({"step": [1, 2]}) == {}


@pytest.mark.usefixtures("real_plot")
def test_a_resumed_run_is_drawn_on_its_own_steps(tmp_path: Path) -> None:
    from lorasup.supervisor.plot import blank_figure, render_loss_curves

    first = run_lorasup(tmp_path / "first", "--steps", "30", "--log-format", "json")
    assert first.returncode == 0, first.stderr
    resumed = run_lorasup(tmp_path / "resumed", "--continue", "--steps", "5")
    assert resumed.returncode == 0, resumed.stderr
    report = resumed.report
    assert (report["steps"]["first"], report["steps"]["last"]) == (31, 35)
    figure = blank_figure()
    render_loss_curves(report, tmp_path / "loss_curves.png", figure=figure)
    figure.canvas.draw()
    assert figure._suptitle.get_text().startswith("completed · step 35/35 (from 31) · final")
    drawn = [ax for ax in figure.axes if ax.get_xlabel().startswith("step")]
    assert len(drawn) == 6  # every panel, the epoch means at their last step included
    for ax in drawn:
        low, high = ax.get_xlim()
        assert 25 <= low <= 31 and 35 <= high <= 36, (ax.get_title(), low, high)
        assert ax.xaxis.get_offset_text().get_text() == ""  # no "+3e3" offset
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(t == int(t) for t in ticks)
    seconds = next(ax for ax in drawn if ax.get_title() == "seconds per step")
    points = seconds.get_lines()[0]  # the measured points, at this run's own step numbers
    assert list(points.get_xdata()) == report["series"]["step"] == [31, 32, 33, 34, 35]



def test_a_fresh_run_whose_bar_showed_a_later_first_step_is_not_called_resumed() -> None:
    """tqdm's mininterval can hide steps 1..9: the run still started at 1 (no "from 10")."""
    report = {"outcome": "completed", "steps": {"first": 10, "last": 100, "requested": 100,
                                                "resumed_from": 0}}
    assert headline(report).startswith("completed · step 100/100 ·") or \
        headline(report) == "completed · step 100/100"
    resumed = {"outcome": "completed", "steps": {"first": 31, "last": 35, "requested": 5,
                                                 "resumed_from": 30}}
    assert headline(resumed).startswith("completed · step 35/35 (from 31)")
