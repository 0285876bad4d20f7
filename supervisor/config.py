"""The job: what to run and the limits to hold it to, from a TOML file and flags (flags win).

Validation happens here, before anything is started, so a bad job costs one clear line
and exit code 2 instead of a half-started run. The pydantic models below are the single
list of what a job file may say: an unknown key, anywhere, is refused with the closest
known one suggested (a typo like ``datset`` must not silently train on the demo data), and
numbers and switches are strict (``steps = true`` is not 1 step; a float accepts an int).
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

from lorasup.supervisor.defaults import (
    DEFAULT_FINISH_TIMEOUT,
    DEFAULT_GRACE,
    DEFAULT_LOGS_DIR,
    DEFAULT_NO_OUTPUT_TIMEOUT,
    DEFAULT_SECONDS_PER_STEP_LIMIT,
    DEFAULT_TRAINER,
)
from lorasup.trainers import OPTIONS, REGISTRY

#: the job file's name for ``trainer_argv``
COMMAND_KEY = "command"


class ConfigError(ValueError):
    """The job is invalid; the message is one line per mistake, meant for the user."""


# -- bounds: every number a job may hold, in one place (``lorasup start`` and the daemon) -----
# A number past these is refused at the door with its name, never carried into arithmetic or
# into SQLite (an int over 2**63 cannot be stored; a 4000-digit one overflows a float).

#: steps of one run
MAX_STEPS = 10**9
#: any duration (timeouts, grace): ten years in seconds; durations are finite as well
MAX_SECONDS = 10 * 365 * 24 * 3600
#: non-finite losses tolerated
MAX_NAN_PATIENCE = 10**9
#: the daemon's keys: (lowest, highest)
PRIORITY_RANGE = (-1_000_000, 1_000_000)
RETRIES_RANGE = (0, 100)
GPUS_RANGE = (0, 64)
#: ``lorasup serve --slots``: runs at once without GPUs
SLOTS_RANGE = (1, 1024)


class Options(BaseModel):
    """Trainer-specific switches (``[options]`` in a job file, or their flags).

    Which trainer reads which key is ``lorasup.trainers.OPTIONS``; a key the chosen
    trainer would ignore is refused rather than dropped.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    # Which trainer reads which option: lorasup.trainers.OPTIONS.
    #: ``new`` (the default: start fresh, an earlier LoRA kept as a backup) or
    #: ``continue`` (resume and run ``steps`` more)
    mode: Literal["new", "continue"] | None = None
    #: the dataset folder
    dataset: str | None = None
    #: where the LoRA and its resume state go
    output_dir: str | None = None
    #: make the script write TensorBoard files into the run directory
    tensorboard: bool | None = None

    def as_pairs(self) -> tuple[tuple[str, str], ...]:
        """The adapter's view: given options only, as strings (a set switch is ``"1"``)."""
        pairs = []
        for name in sorted(self.model_fields_set):
            value = getattr(self, name)
            if value is None or value is False:
                continue
            pairs.append((name, "1" if value is True else str(value)))
        return tuple(pairs)


class Job(BaseModel):
    """One supervised run. ``steps``/``timeout`` may be None until the adapter resolves them.

    Strict: ints, floats and bools must be given as such (a float accepts an int); paths
    and the argv list are the exceptions, since TOML spells them as strings and arrays.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    trainer: str = DEFAULT_TRAINER
    steps: int | None = Field(default=None, gt=0, le=MAX_STEPS)
    trainer_argv: tuple[str, ...] = Field(default=(), strict=False)
    run_dir: Path | None = Field(default=None, strict=False)
    logs_dir: Path = Field(default=DEFAULT_LOGS_DIR, strict=False)
    run_id: str | None = None
    #: total wall-time limit; None = steps × 30 s once steps are known
    timeout: float | None = Field(default=None, gt=0, le=MAX_SECONDS, allow_inf_nan=False)
    no_output_timeout: float = Field(default=DEFAULT_NO_OUTPUT_TIMEOUT, gt=0, le=MAX_SECONDS,
                                     allow_inf_nan=False)
    #: the silence limit before the first step (model loading); None = no_output_timeout
    startup_timeout: float | None = Field(default=None, gt=0, le=MAX_SECONDS,
                                          allow_inf_nan=False)
    #: time without a new step, counted from the first step; None = not watched
    no_progress_timeout: float | None = Field(default=None, gt=0, le=MAX_SECONDS,
                                              allow_inf_nan=False)
    #: total time from the first graceful signal to SIGKILL
    grace: float = Field(default=DEFAULT_GRACE, ge=0, le=MAX_SECONDS, allow_inf_nan=False)
    #: how long a trainer that stops by itself may take after step N (its final save)
    finish_timeout: float = Field(default=DEFAULT_FINISH_TIMEOUT, gt=0, le=MAX_SECONDS,
                                  allow_inf_nan=False)
    #: non-finite losses tolerated before the run counts as diverged (0: the first stops it)
    nan_patience: int = Field(default=0, ge=0, le=MAX_NAN_PATIENCE)
    log_format: Literal["auto", "json", "console"] = "auto"
    #: the run directory 0700: nothing of the run (report, CSV, PNG included) is reachable
    #: by other users, whatever the umask
    private: bool = False
    #: trainer-specific options (which trainer reads which: lorasup.trainers.OPTIONS)
    options: Options = Field(default_factory=Options)
    #: the job file's ``[parse]`` table: regexes that read steps and values from a program's
    #: lines (``--trainer command``); the adapter checks the keys and compiles them
    parse: dict[str, str] = Field(default_factory=dict)
    cwd: Path | None = Field(default=None, strict=False)

    @model_validator(mode="after")
    def _exclusive_dirs(self) -> Job:
        if self.run_dir is not None and self.run_id is not None:
            raise ValueError("give either run_dir or run_id, not both")
        return self

    def effective_timeout(self, steps: int) -> float:
        if self.timeout is not None:
            return self.timeout
        return min(steps * DEFAULT_SECONDS_PER_STEP_LIMIT, float(MAX_SECONDS))


#: pydantic error type → what the value should have been, in words
_EXPECTED = {
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "tuple_type": "a list of strings",
    "list_type": "a list of strings",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "path_type": "a path (a string)",
    "finite_number": "a finite number",
}


def _shown(value: Any) -> str:
    """A value as the job file would spell it (TOML: true/false, quoted strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _known_keys(where: tuple[str | int, ...]) -> list[str]:
    """The keys the model at ``where`` accepts (the job file's spelling)."""
    if where == ("options",):
        return list(Options.model_fields)
    return [COMMAND_KEY if name == "trainer_argv" else name for name in Job.model_fields]


def _unknown_key(where: tuple[str | int, ...], key: str) -> str:
    table = f"[{'.'.join(map(str, where))}]" if where else "the job file"
    message = f"unknown key {key!r} in {table}"
    close = difflib.get_close_matches(key, _known_keys(where), n=1, cutoff=0.6)
    if close:
        return f"{message}; did you mean {close[0]!r}?"
    return f"{message} (known: {', '.join(sorted(_known_keys(where)))})"


def _describe(error: ErrorDetails) -> str:
    loc = tuple(error["loc"])
    if error["type"] == "extra_forbidden" and loc:
        return _unknown_key(loc[:-1], str(loc[-1]))
    # A tuple index (trainer_argv.0) reads better as "command[0]".
    names = [COMMAND_KEY if part == "trainer_argv" else part for part in loc]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in names).lstrip(".")
    if not where:  # a check across fields (run_dir and run_id)
        return error["msg"].removeprefix("Value error, ")
    ctx = error.get("ctx", {})
    expected = _EXPECTED.get(error["type"])
    given = error.get("input")
    if error["type"] == "float_type" and isinstance(given, int) and not isinstance(given, bool):
        # a whole number too large to be a float: every float field is a duration
        expected = f"a number of at most {MAX_SECONDS} (ten years in seconds)"
    if expected is None and "expected" in ctx:
        expected = str(ctx["expected"])
    elif expected is None and "gt" in ctx:
        expected = f"a number greater than {ctx['gt']:g}"
    elif expected is None and "ge" in ctx:
        expected = f"a number of at least {ctx['ge']:g}"
    elif expected is None and "le" in ctx:
        limit = ctx["le"]
        limit = int(limit) if float(limit).is_integer() else limit
        expected = f"a number of at most {limit}" + (
            " (ten years in seconds)" if limit == MAX_SECONDS else "")
    if expected is None:
        message = error["msg"].removeprefix("Value error, ")
        return f"invalid {where}: {message[:1].lower()}{message[1:]}"
    return f"invalid {where}: expected {expected}, got {_shown(error['input'])}"


def _one_line(error: ValidationError) -> str:
    """Every mistake pydantic found, one line each (a job file's are all shown at once)."""
    return "\n".join(dict.fromkeys(_describe(e) for e in error.errors()))


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def load_toml(path: Path) -> dict[str, Any]:
    """Read a job file; its keys are the long flag names with ``_`` (``no_output_timeout``)."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except ValueError as exc:  # a number of more digits than Python converts (4300)
        raise ConfigError(f"cannot read config file {path}: {_first_line(exc)}") from None
    except RecursionError:  # arrays nested thousands deep
        raise ConfigError(f"cannot read config file {path}: nested too deeply") from None
    # A [job] table is allowed for readability; top-level keys work too.
    job = data.pop("job", {})
    if not isinstance(job, dict):
        raise ConfigError(f"{path}: [job] must be a table")
    twice = sorted(set(job) & set(data))
    if twice:
        raise ConfigError(f"{path}: {twice[0]!r} is given both at the top and in [job]")
    merged = {**data, **job}
    if COMMAND_KEY in merged:
        if "trainer_argv" in merged:
            raise ConfigError(f"{path}: give 'command' or 'trainer_argv', not both")
        merged["trainer_argv"] = merged.pop(COMMAND_KEY)
    return merged


def _check_options(trainer: str, options: Options) -> None:
    """Each given option must be one the chosen trainer reads."""
    readers = OPTIONS.get(trainer, frozenset())
    wrong: list[str] = []
    for name in sorted(options.model_fields_set):
        if name in readers:
            continue
        users = sorted(t for t, keys in OPTIONS.items() if name in keys)
        flag = "--" + ("new/--continue" if name == "mode" else name.replace("_", "-"))
        wrong.append(f"option {name!r} ({flag}) is not used by --trainer {trainer}; "
                     f"it is for: {', '.join(users)}")
    if wrong:
        raise ConfigError("\n".join(wrong))


def build_job(file_values: dict[str, Any], flag_values: dict[str, Any],
              flag_options: dict[str, Any] | None = None) -> Job:
    """Merge a job file with the flags that were given (None = not given) and validate.

    ``flag_options`` are the trainer-option flags (``--dataset`` ...); they win over the
    file's ``[options]`` key by key.
    """
    values = dict(file_values)
    values.update({k: v for k, v in flag_values.items() if v is not None})
    given = {k: v for k, v in (flag_options or {}).items() if v is not None}
    if given:
        from_file = values.get("options", {})
        if not isinstance(from_file, dict):
            raise ConfigError(f"invalid options: expected a table, got {_shown(from_file)}")
        values["options"] = {**from_file, **given}
    if isinstance(values.get("trainer_argv"), str):
        raise ConfigError("command must be a list of strings, not one string")
    trainer = values.get("trainer", Job.model_fields["trainer"].default)
    if isinstance(trainer, str) and trainer not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        close = difflib.get_close_matches(trainer, list(REGISTRY), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown trainer {trainer!r} (known: {known}){hint}")
    try:
        job = Job(**values)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from exc
    _check_options(job.trainer, job.options)
    return job
