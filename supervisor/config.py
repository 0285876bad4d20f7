"""The job: what to run and the limits to hold it to, from a TOML file and flags (flags win).

Validation happens here, before anything is started, so a bad job costs one clear line
and exit code 2 instead of a half-started run.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_NO_OUTPUT_TIMEOUT = 300.0
DEFAULT_GRACE = 30.0
DEFAULT_SECONDS_PER_STEP_LIMIT = 30.0
DEFAULT_FINISH_TIMEOUT = 900.0


class ConfigError(ValueError):
    """The job is invalid; the message is one line meant for the user."""


class Job(BaseModel):
    """One supervised run. ``steps``/``timeout`` may be None until the adapter resolves them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    trainer: str = "builtin"
    steps: int | None = Field(default=None, gt=0)
    trainer_argv: tuple[str, ...] = ()
    run_dir: Path | None = None
    logs_dir: Path = Path("training_logs")
    run_id: str | None = None
    #: total wall-time limit; None = steps × 30 s once steps are known
    timeout: float | None = Field(default=None, gt=0)
    no_output_timeout: float = Field(default=DEFAULT_NO_OUTPUT_TIMEOUT, gt=0)
    #: total time from the first graceful signal to SIGKILL
    grace: float = Field(default=DEFAULT_GRACE, ge=0)
    #: how long a trainer that stops by itself may take after step N (its final save)
    finish_timeout: float = Field(default=DEFAULT_FINISH_TIMEOUT, gt=0)
    #: non-finite losses tolerated before the run counts as diverged (0: the first stops it)
    nan_patience: int = Field(default=0, ge=0)
    log_format: Literal["auto", "json", "console"] = "auto"
    #: trainer-specific options (builtin: mode, dataset, output_dir)
    options: dict[str, str] = Field(default_factory=dict)
    #: the job file's ``[parse]`` table: regexes that read steps and values from a program's
    #: lines (``--trainer command``); the adapter checks the keys and compiles them
    parse: dict[str, str] = Field(default_factory=dict)
    cwd: Path | None = None

    @model_validator(mode="after")
    def _exclusive_dirs(self) -> Job:
        if self.run_dir is not None and self.run_id is not None:
            raise ValueError("give either run_dir or run_id, not both")
        return self

    def effective_timeout(self, steps: int) -> float:
        return self.timeout if self.timeout is not None else steps * DEFAULT_SECONDS_PER_STEP_LIMIT


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "job"
    return f"invalid {where}: {first['msg']}"


def load_toml(path: Path) -> dict[str, Any]:
    """Read a job file; its keys are the long flag names with ``_`` (``no_output_timeout``)."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    # A [job] table is allowed for readability; top-level keys work too.
    job = data.pop("job", {})
    if not isinstance(job, dict):
        raise ConfigError(f"{path}: [job] must be a table")
    merged = {**data, **job}
    if "command" in merged and "trainer_argv" not in merged:
        merged["trainer_argv"] = merged.pop("command")
    return merged


def build_job(file_values: dict[str, Any], flag_values: dict[str, Any]) -> Job:
    """Merge a job file with the flags that were given (None = not given) and validate."""
    values = dict(file_values)
    values.update({k: v for k, v in flag_values.items() if v is not None})
    if isinstance(values.get("trainer_argv"), str):
        raise ConfigError("trainer_argv/command must be a list of strings, not one string")
    try:
        return Job(**values)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from exc
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc
