"""lorasup: a supervisor for LoRA training runs.

Installed, this repository's root is the ``lorasup`` package: ``supervisor/`` becomes
``lorasup.supervisor`` (the engine) and ``trainers/`` ``lorasup.trainers`` (the adapters), so
nothing clashes with PyPI's supervisord, which owns the top-level name ``supervisor``.
"""



def __getattr__(name: str) -> str:
    """``lorasup.__version__``, looked up on first use (importlib.metadata is slow to import
    and the command line must start fast)."""
    if name != "__version__":
        raise AttributeError(name)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorasup")
    except PackageNotFoundError:  # pragma: no cover - running from an uninstalled copy
        return "0+unknown"
