"""Fixtures shared by the suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# The property tests draw the same examples on every run (CI must never go red by chance);
# HYPOTHESIS_PROFILE=explore draws new ones, to look for trouble on purpose.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Most tests do not look at loss_curves.png: no matplotlib for them (every lorasup they
# start inherits this), only a placeholder PNG. Tests that check the drawing use the
# ``real_plot`` fixture; LORASUP_NO_PLOT=0 in the environment draws everywhere.
os.environ.setdefault("LORASUP_NO_PLOT", "1")


def pytest_configure(config: pytest.Config) -> None:
    """Compile lorasup's sources once, before any test starts a lorasup process.

    An installed lorasup has its bytecode written at install time; an editable checkout
    under ``PYTHONDONTWRITEBYTECODE=1`` (this box, CI) would otherwise recompile every
    module in each of the suite's hundreds of lorasup, guard and trainer processes. Only
    the controller compiles (xdist workers start after it); a failure costs speed, never a
    test.
    """
    if hasattr(config, "workerinput"):
        return
    import compileall

    root = Path(__file__).resolve().parent.parent
    for folder in ("supervisor", "trainers"):
        compileall.compile_dir(root / folder, quiet=2, workers=1)
    compileall.compile_file(root / "__init__.py", quiet=2)
    compileall.compile_file(root / "__main__.py", quiet=2)


@pytest.fixture
def real_plot(monkeypatch: pytest.MonkeyPatch) -> None:
    """This test checks the drawn PNG: matplotlib draws it (here and in the children)."""
    monkeypatch.delenv("LORASUP_NO_PLOT", raising=False)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture
def daemons(tmp_path: Path):
    """Start real ``lorasup serve`` daemons on this test's state directory; all are
    stopped and cleaned up afterwards."""
    from tests.serve_support import Daemon

    made: list[Daemon] = []

    def make(*args: str, env: dict[str, str] | None = None) -> Daemon:
        made.append(Daemon(tmp_path, *args, env=env))
        return made[-1]

    yield make
    for d in made:
        d.cleanup()
