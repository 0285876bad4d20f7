"""The wheel's package list (pyproject's ``packages``) names every package of the tree: a
folder left out installs without its modules, and only an installed lorasup would notice."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_in_the_wheel() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(config["tool"]["setuptools"]["packages"])
    found = {"lorasup"}
    for top in ("supervisor", "trainers"):
        for init in (ROOT / top).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT).parts
            found.add(".".join(("lorasup", *parts)))
    assert found == listed


def test_the_dashboard_files_are_package_data() -> None:
    """The dashboard's static files ship in the wheel (a page without them is blank)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["lorasup.supervisor.serve"]
    static = ROOT / "supervisor" / "serve" / "static"
    names = {p.name for p in static.iterdir()}
    assert {"index.html", "app.js", "style.css", "uPlot.iife.min.js", "uPlot.min.css",
            "uPlot.LICENSE"} <= names
    for path in static.iterdir():
        assert any(path.relative_to(static.parent).match(p) for p in patterns), path
