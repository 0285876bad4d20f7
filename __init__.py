"""lorasup: a supervisor for LoRA training runs.

Installed, this repository's root is the ``lorasup`` package: ``supervisor/`` becomes
``lorasup.supervisor`` (the engine) and ``trainers/`` ``lorasup.trainers`` (the adapters), so
nothing clashes with PyPI's supervisord, which owns the top-level name ``supervisor``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lorasup")
except PackageNotFoundError:  # pragma: no cover - running from an uninstalled copy
    __version__ = "0+unknown"
