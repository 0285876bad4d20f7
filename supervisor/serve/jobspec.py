"""A submitted job: the ``lorasup start`` job file plus the daemon's own keys, validated.

Validation is the one ``lorasup start`` does (``build_job`` and ``plan_run``), run against
a scratch run directory that is removed again, so a bad job is refused with the very same
one-line error and nothing is queued. The daemon-only keys are checked here and stripped
before the job reaches ``lorasup start``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import unicodedata
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from lorasup.trainers.base import Resume

#: keys only the daemon reads; never passed on to ``lorasup start``
DAEMON_KEYS = ("name", "priority", "gpus", "cwd", "retries", "notify")
#: keys the daemon decides for each attempt (it names the run directory itself)
PLACEMENT_KEYS = ("run_dir", "run_id", "logs_dir")
NOTIFY_KEYS = {"webhook", "secret", "format", "events"}
NOTIFY_FORMATS = ("json", "slack", "discord")
#: what a ``[notify]`` table may ask for: an attempt started, a retry queued, a final state
NOTIFY_EVENTS = ("started", "retrying", "completed", "failed", "cancelled", "lost")
#: the events sent when ``events`` is not given: the final states
FINAL_EVENTS = ("completed", "failed", "cancelled", "lost")
MAX_NAME = 200


def __getattr__(name: str) -> Any:
    """``MAX_RETRIES`` (the bound of ``retries``, from config.py), read on first use: the
    module itself does not import config (pydantic), so ``ps`` reading stored jobs stays
    light."""
    if name == "MAX_RETRIES":
        from lorasup.supervisor.config import RETRIES_RANGE

        return RETRIES_RANGE[1]
    raise AttributeError(name)


class JobError(ValueError):
    """The submitted job is invalid. ``errors``: every mistake found, one line each; the
    message is the one line that stands for them all (``N mistakes in the job: a; b``)."""

    def __init__(self, *errors: str) -> None:
        lines = [line for e in errors for line in str(e).splitlines() if line.strip()]
        self.errors = lines or ["invalid job"]
        text = self.errors[0] if len(self.errors) == 1 else (
            f"{len(self.errors)} mistakes in the job: " + "; ".join(self.errors))
        super().__init__(text)


@dataclass(frozen=True)
class JobSpec:
    """What the store keeps about a job; ``values`` is the ``lorasup start`` job file."""

    values: dict[str, Any]
    name: str
    priority: int
    gpus: int
    cwd: str
    retries: int
    notify: dict[str, str]
    trainer: str
    steps: int
    grace: float
    #: the job's own run directory (run_dir/run_id) or logs directory, absolute; None: state dir
    run_dir: str | None
    logs_dir: str | None
    output_dirs: tuple[str, ...] = field(default_factory=tuple)


def check_name(name: Any) -> str:
    """A job name is shown by ``ps`` and in logs: text without control characters (a NUL, a
    newline or an ESC sequence would forge lines or repaint a terminal)."""
    if not isinstance(name, str) or len(name) > MAX_NAME:
        raise JobError(f"invalid name: must be a string of at most {MAX_NAME} characters")
    for char in name:
        if unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp"):
            what = "a lone surrogate" if unicodedata.category(char) == "Cs" else (
                f"the control character U+{ord(char):04X}")
            raise JobError(f"invalid name: {what} is not allowed in a job name")
    return name


def _int(values: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = values.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobError(f"invalid {key}: must be a whole number, not {value!r}")
    if not low <= value <= high:
        raise JobError(f"invalid {key}: must be between {low} and {high}, not {value}")
    return value


def check_notify(raw: Any, where: str = "notify") -> dict[str, Any]:
    """A ``[notify]`` table: webhook URL (http/https), optional secret, message format and
    ``events`` (a list of NOTIFY_EVENTS; default: the final states). Every mistake is
    reported (JobError.errors)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise JobError(f"invalid {where}: must be a table")
    errors = [f"invalid {where}: unknown key {key!r} (known: {', '.join(sorted(NOTIFY_KEYS))})"
              for key in sorted(set(raw) - NOTIFY_KEYS, key=str)]
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in NOTIFY_KEYS:
            continue
        if key == "events":
            known = isinstance(value, list) and all(v in NOTIFY_EVENTS for v in value
                                                    if isinstance(v, str))
            if not known or not all(isinstance(v, str) for v in value):
                errors.append(f"invalid {where}.events: a list of {', '.join(NOTIFY_EVENTS)}; "
                              f"got {str(value)[:80]}")
            else:
                out[key] = list(dict.fromkeys(value))
        elif not isinstance(value, str):
            errors.append(f"invalid {where}.{key}: must be a string")
        else:
            out[key] = value
    url = urlparse(out.get("webhook", ""))
    if "webhook" in out and (url.scheme not in ("http", "https") or not url.netloc):
        errors.append(f"invalid {where}.webhook: not an http(s) URL: {out['webhook']!r}")
    if out.get("format", "json") not in NOTIFY_FORMATS:
        errors.append(f"invalid {where}.format: use one of {', '.join(NOTIFY_FORMATS)}")
    if errors:
        raise JobError(*errors)
    return out


def wants(target: dict[str, Any], event: str) -> bool:
    """Whether a ``[notify]`` table asks for ``event`` (a NOTIFY_EVENTS name)."""
    events = target.get("events")
    return event in (events if isinstance(events, list) else FINAL_EVENTS)


def _absolute(path: Any, cwd: Path) -> str:
    candidate = Path(str(path))
    return str(candidate if candidate.is_absolute() else cwd / candidate)


MISSING_CWD = ("missing cwd: the job's working directory (an absolute path; `lorasup submit` "
               "sends the folder it is run in)")


def _cwd(values: dict[str, Any], cwd: str | None) -> Path:
    """The job's working directory: its own ``cwd`` key (relative to the submitter's), else
    the submitter's; never a default (a job run in the daemon's home would surprise)."""
    given = values.get("cwd") or cwd
    if not given:
        raise JobError(MISSING_CWD)
    job_cwd = Path(str(given))
    if not job_cwd.is_absolute():
        if not cwd or not Path(cwd).is_absolute():
            raise JobError(MISSING_CWD)
        job_cwd = Path(cwd) / job_cwd
    if not job_cwd.is_dir():
        raise JobError(f"invalid cwd: not a folder: {job_cwd}")
    return job_cwd


def parse(values: dict[str, Any], *, cwd: str | None, scratch: Path, name: str | None = None,
          priority: int | None = None) -> JobSpec:
    """Validate a submitted job completely (raises JobError with every mistake found)
    without queueing anything."""
    # config (pydantic) here, not at the top: `ps` reads stored specs without it
    from lorasup.supervisor.config import (
        GPUS_RANGE,
        PRIORITY_RANGE,
        RETRIES_RANGE,
        ConfigError,
        build_job,
    )
    from lorasup.supervisor.prepare import plan_run
    from lorasup.trainers.base import UsageError

    if not isinstance(values, dict):
        raise JobError("the job must be a table of keys")
    values = dict(values)
    if "command" in values and "trainer_argv" not in values:
        values["trainer_argv"] = values.pop("command")  # as load_toml spells it
    if name is not None:
        values["name"] = name
    if priority is not None:
        values["priority"] = priority
    errors: list[str] = []

    def checked(check: Any, *args: Any) -> Any:
        try:
            return check(*args)
        except JobError as exc:
            errors.extend(exc.errors)
            return None

    job_cwd: Path | None = checked(_cwd, values, cwd)
    job_name = checked(check_name, values.get("name", ""))
    spec_priority = checked(_int, values, "priority", 0, *PRIORITY_RANGE)
    gpus = checked(_int, values, "gpus", 0, *GPUS_RANGE)
    retries = checked(_int, values, "retries", 0, *RETRIES_RANGE)
    notify = checked(check_notify, values.get("notify"))
    start_values = {k: v for k, v in values.items() if k not in DAEMON_KEYS}
    start_values["cwd"] = str(job_cwd or "/")
    checked(to_toml, start_values)  # refuses values a job file cannot hold
    try:
        job = build_job(start_values, {"log_format": "json"})
    except ConfigError as exc:
        raise JobError(*errors, str(exc)) from None
    if errors or job_cwd is None:
        raise JobError(*errors)
    try:
        probe = scratch / f"validate-{uuid.uuid4().hex}"
        try:
            plan, _adapter = plan_run(job.model_copy(update={"run_dir": probe, "run_id": None}))
        finally:
            shutil.rmtree(probe, ignore_errors=True)
    except (ConfigError, UsageError) as exc:
        raise JobError(str(exc)) from None
    run_dir: str | None = None
    if job.run_dir is not None:
        run_dir = _absolute(job.run_dir, job_cwd)
    elif job.run_id is not None:
        run_dir = _absolute(job.logs_dir / job.run_id, job_cwd)
    if run_dir is not None and (Path(run_dir) / "events.jsonl").exists():
        raise JobError(f"{run_dir} already holds a run (events.jsonl); choose another run_dir")
    logs_dir = _absolute(job.logs_dir, job_cwd) if "logs_dir" in start_values else None
    for key in PLACEMENT_KEYS:
        start_values.pop(key, None)
    return JobSpec(
        values=start_values, name=job_name or f"{job.trainer}", priority=spec_priority,
        gpus=gpus, cwd=str(job_cwd), retries=retries, notify=notify, trainer=job.trainer,
        steps=plan.steps, grace=plan.grace, run_dir=run_dir, logs_dir=logs_dir,
        output_dirs=tuple(dict.fromkeys(_absolute(p, job_cwd) for p in (
            *plan.output_dirs, *_output_flags(job.trainer_argv)))),
    )


def _output_flags(argv: tuple[str, ...]) -> list[str]:
    """Where a program writes its model by its flags (``--output_dir X``, ``--output-dir=X``),
    beside the folders its adapter names (``plan.output_dirs``)."""
    found: list[str] = []
    for i, arg in enumerate(argv):
        for flag in ("--output_dir", "--output-dir"):
            if arg == flag and i + 1 < len(argv):
                found.append(argv[i + 1])
            elif arg.startswith(flag + "="):
                found.append(arg.split("=", 1)[1])
    return found


def values_from_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """The job's keys from ``POST /jobs``: ``{"job": {...}}`` (what ``lorasup submit`` sends,
    already read by ``load_toml``) or ``{"toml": "..."}`` (a job file's text, for curl)."""
    import tomllib

    values = payload.get("job")
    if values is None and isinstance(payload.get("toml"), str):
        try:
            values = tomllib.loads(payload["toml"])
        except tomllib.TOMLDecodeError as exc:
            raise JobError(f"cannot read the job: {exc}") from None
        except ValueError as exc:  # a number of more digits than Python converts (4300)
            raise JobError(f"cannot read the job: {str(exc).splitlines()[0][:200]}") from None
        except RecursionError:
            raise JobError("cannot read the job: nested too deeply") from None
        table = values.pop("job", {})
        if not isinstance(table, dict):
            raise JobError("[job] must be a table")
        values = {**values, **table}  # as load_toml merges a [job] table
    if not isinstance(values, dict):
        raise JobError('the body must be {"job": {...}} or {"toml": "..."}')
    return values


def conflict(spec: JobSpec, others: list[tuple[str, JobSpec]]) -> str | None:
    """Why ``spec`` may not be queued next to ``others`` (label, spec): a shared output
    directory or run directory (one LoRA written over another); None when it may."""
    mine_out = {os.path.normpath(p) for p in spec.output_dirs}
    mine_run = os.path.normpath(spec.run_dir) if spec.run_dir else None
    for label, other in others:
        shared = mine_out & {os.path.normpath(p) for p in other.output_dirs}
        if shared:
            return f"{label} already writes the output directory {sorted(shared)[0]}"
        if mine_run and other.run_dir and os.path.normpath(other.run_dir) == mine_run:
            return f"{label} already uses the run directory {mine_run}"
    return None


# -- the job file handed to ``lorasup start`` -------------------------------------------------

def _toml_value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise JobError(f"invalid {where}: not valid text (a lone surrogate)") from None
        # A JSON string is a TOML basic string (same escapes); TOML also escapes DEL.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v, where) for v in value) + "]"
    raise JobError(f"invalid {where}: a job file cannot hold {type(value).__name__} values")


def _toml_key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare and key else json.dumps(key)


def to_toml(values: dict[str, Any]) -> str:
    """A job file: top-level scalars and arrays, then one level of tables (``[options]``)."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for key, value in values.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value, key)}")
    for key, table in tables:
        lines.append(f"\n[{_toml_key(key)}]")
        for sub, value in table.items():
            if isinstance(value, dict):
                raise JobError(f"invalid {key}.{sub}: nested tables are not supported")
            lines.append(f"{_toml_key(sub)} = {_toml_value(value, f'{key}.{sub}')}")
    return "\n".join(lines) + "\n"


def resumed_values(spec_values: dict[str, Any], trainer: str, *, target_step: int,
                   saved_step: int, output_dirs: tuple[str, ...] = ()
                   ) -> dict[str, Any] | None:
    """The job file for an attempt that continues an earlier one (see ``resumed``)."""
    found = resumed(spec_values, trainer, target_step=target_step, saved_step=saved_step,
                    output_dirs=output_dirs)
    return found[0] if found is not None else None


def resumed(spec_values: dict[str, Any], trainer: str, *, target_step: int, saved_step: int,
            output_dirs: tuple[str, ...] = ()) -> tuple[dict[str, Any], Resume] | None:
    """The job file for an attempt that continues an earlier one, and what it continues
    from; None when there is nothing to continue from (then the attempt starts over).
    Reads the output folders (blocking).

    The trainer's adapter decides how (``AdapterBase.resume``, the same rule ``lorasup start
    --resume-from`` follows): its trainer args, step limit and options for the attempt, so
    that the job ends at ``target_step`` in total.
    """
    from lorasup.trainers import get_adapter
    from lorasup.trainers.base import TrainerJob, UsageError

    values = dict(spec_values)
    argv = values.get("trainer_argv")
    argv = list(argv) if isinstance(argv, list | tuple) else []
    options = values.get("options")
    options = dict(options) if isinstance(options, dict) else {}
    pairs = tuple(sorted((str(k), "1" if v is True else str(v)) for k, v in options.items()
                         if v is not None and v is not False))
    steps = values.get("steps")
    job = TrainerJob(steps=steps if isinstance(steps, int) else target_step, argv=tuple(argv),
                     run_dir="", options=pairs)
    cwd = Path(str(values.get("cwd") or "."))
    try:
        resume = get_adapter(trainer).resume(job, target_step=target_step,
                                             saved_step=saved_step, output_dirs=output_dirs,
                                             cwd=cwd)
    except (UsageError, KeyError):
        return None
    if resume is None or (resume.step is not None and resume.step >= target_step):
        return None
    if resume.steps is not None:
        values["steps"] = resume.steps
    if resume.options:
        values["options"] = {**options, **dict(resume.options)}
    if resume.argv or "trainer_argv" in values:
        values["trainer_argv"] = list(resume.argv)
    return values, resume
