"""The job's defaults, in a module that imports nothing: ``lorasup --help`` shows them
without loading the validation machinery (pydantic) behind them."""

from __future__ import annotations

from pathlib import Path

DEFAULT_TRAINER = "builtin"
DEFAULT_NO_OUTPUT_TIMEOUT = 300.0
DEFAULT_GRACE = 30.0
DEFAULT_SECONDS_PER_STEP_LIMIT = 30.0
DEFAULT_FINISH_TIMEOUT = 900.0
DEFAULT_NAN_PATIENCE = 0
DEFAULT_LOGS_DIR = Path("training_logs")
