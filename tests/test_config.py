"""Job files and flags: validated before anything starts; flags win over the file."""

from __future__ import annotations

import math
import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lorasup.supervisor.config import (
    GPUS_RANGE,
    MAX_NAN_PATIENCE,
    MAX_SECONDS,
    MAX_STEPS,
    PRIORITY_RANGE,
    RETRIES_RANGE,
    ConfigError,
    Job,
    Options,
    build_job,
    load_toml,
)
from lorasup.trainers import OPTIONS, REGISTRY

ROOT = Path(__file__).resolve().parents[1]


def test_example_job_file_is_valid() -> None:
    job = build_job(load_toml(ROOT / "systemd" / "job.example.toml"), {})
    assert job.trainer == "kohya"
    assert job.steps == 2000
    assert job.trainer_argv[1] == "launch"
    assert job.effective_timeout(job.steps) == 2000 * 30


def test_flags_win_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text('steps = 10\ngrace = 5\n[job]\nno_output_timeout = 7\n')
    job = build_job(load_toml(path), {"steps": 20, "grace": None})
    assert (job.steps, job.grace, job.no_output_timeout) == (20, 5, 7)


@pytest.mark.parametrize(("text", "message"), [
    ("steps = 0", "steps"),
    ("grace = -1", "grace"),
    ("no_such_key = 1", "no_such_key"),
    ('command = "python train.py"', "list of strings"),
    ("steps = [", "cannot read"),
])
def test_bad_job_files_give_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "job.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as info:
        build_job(load_toml(path), {})
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# --- strictness: unknown keys, strict types, per-trainer options ---------------------------


def _job_from(tmp_path: Path, text: str, flags: dict | None = None,
              options: dict | None = None) -> Job:
    path = tmp_path / "job.toml"
    path.write_text(text + "\n")
    return build_job(load_toml(path), flags or {}, options)


def _error(tmp_path: Path, text: str, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        _job_from(tmp_path, text, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(("text", "key", "suggestion"), [
    ('[options]\ndatset = "pics"', "datset", "dataset"),
    ("stpes = 5", "stpes", "steps"),
    ("[job]\nno_output_timout = 5", "no_output_timout", "no_output_timeout"),
    ('[optoins]\ndataset = "pics"', "optoins", "options"),
    ('comand = ["python", "t.py"]', "comand", "command"),
])
def test_unknown_key_names_it_and_the_closest_known_one(
        tmp_path: Path, text: str, key: str, suggestion: str) -> None:
    message = _error(tmp_path, text)
    assert f"unknown key {key!r}" in message
    assert f"did you mean {suggestion!r}" in message


def test_a_typo_in_options_does_not_train_on_the_demo_data(tmp_path: Path) -> None:
    assert "[options]" in _error(tmp_path, '[options]\ndatset = "pics"')


@pytest.mark.parametrize(("text", "message"), [
    ("steps = true", "invalid steps: expected a whole number, got true"),
    ("steps = 1.5", "invalid steps: expected a whole number, got 1.5"),
    ('steps = "5"', "invalid steps: expected a whole number, got '5'"),
    ('grace = "5"', "invalid grace: expected a number, got '5'"),
    ("timeout = true", "invalid timeout: expected a number, got true"),
    ("nan_patience = false", "invalid nan_patience: expected a whole number, got false"),
    ('log_format = "xml"', "expected 'auto', 'json' or 'console', got 'xml'"),
    ('command = ["python", 3]', "invalid command[1]: expected a string, got 3"),
    ("logs_dir = 5", "invalid logs_dir"),
    ('trainer = "builtin"\n[options]\nmode = "resume"', "expected 'new' or 'continue'"),
    ('trainer = "diffusers"\n[options]\ntensorboard = "yes"', "expected true or false"),
    ("options = 3", "invalid options: expected a table, got 3"),
])
def test_wrong_types_name_the_expected_type(tmp_path: Path, text: str, message: str) -> None:
    assert message in _error(tmp_path, text)


def test_floats_accept_whole_numbers(tmp_path: Path) -> None:
    job = _job_from(tmp_path, "timeout = 60\ngrace = 0\nno_output_timeout = 7.5\nsteps = 3")
    assert (job.timeout, job.grace, job.no_output_timeout, job.steps) == (60.0, 0.0, 7.5, 3)
    assert isinstance(job.timeout, float)


def test_options_depend_on_the_trainer(tmp_path: Path) -> None:
    message = _error(tmp_path, 'trainer = "kohya"\n[options]\ndataset = "pics"')
    assert "'dataset'" in message and "--trainer kohya" in message and "builtin" in message
    message = _error(tmp_path, "", flags={"trainer": "builtin"}, options={"tensorboard": True})
    assert "--tensorboard" in message and "diffusers, hf" in message
    job = _job_from(tmp_path, 'trainer = "hf"\n[options]\ntensorboard = true')
    assert job.options.as_pairs() == (("tensorboard", "1"),)
    off = _job_from(tmp_path, 'trainer = "hf"\n[options]\ntensorboard = false')
    assert off.options.as_pairs() == ()


def test_option_flags_win_over_the_file_key_by_key(tmp_path: Path) -> None:
    job = _job_from(tmp_path, '[options]\ndataset = "a"\noutput_dir = "o"',
                    options={"dataset": "b", "mode": "continue", "output_dir": None})
    assert job.options.as_pairs() == (("dataset", "b"), ("mode", "continue"),
                                      ("output_dir", "o"))


def test_unknown_trainer_gets_a_suggestion(tmp_path: Path) -> None:
    message = _error(tmp_path, 'trainer = "kohyaa"')
    assert "unknown trainer 'kohyaa'" in message and "did you mean 'kohya'" in message


def test_every_trainer_option_is_a_field_and_every_field_has_a_reader() -> None:
    assert set(OPTIONS) <= set(REGISTRY)
    read = set().union(*OPTIONS.values())
    assert read == set(Options.model_fields)


def test_a_key_in_both_places_is_refused(tmp_path: Path) -> None:
    assert "both" in _error(tmp_path, "steps = 5\n[job]\nsteps = 6")
    assert "both" in _error(tmp_path, 'command = ["a"]\ntrainer_argv = ["b"]')


_KNOWN = set(Job.model_fields) | {"command"}
_key = st.text(string.ascii_lowercase + "_", min_size=1, max_size=20).filter(
    lambda k: k not in _KNOWN)
_scalar = st.one_of(st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8),
                    st.lists(st.integers(), max_size=2))


@given(key=_key, value=_scalar)
def test_property_any_unknown_key_is_refused_by_name(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        build_job({key: value}, {})
    assert repr(key) in str(info.value) and "\n" not in str(info.value)


@given(field=st.sampled_from(sorted(set(Job.model_fields) - {"options"})), value=_scalar)
def test_property_any_value_gives_a_job_or_one_clear_line(field: str, value: object) -> None:
    try:
        job = build_job({field: value}, {})
    except ConfigError as exc:
        # one clear line per mistake (a list with two bad items has two), none repeated
        lines = str(exc).split("\n")
        assert all(line.strip() for line in lines) and len(set(lines)) == len(lines)
        return
    got = getattr(job, field)
    if isinstance(value, bool):  # a switch is never read as a number (steps = true)
        assert isinstance(got, bool) or got is None


# --- bounds: every number is bounded at the door (issue 16.4) ------------------------------

_DURATIONS = ("timeout", "no_output_timeout", "startup_timeout", "no_progress_timeout",
              "finish_timeout", "grace")
#: field → (a value just inside, one just outside)
_EDGES = {
    "steps": (MAX_STEPS, MAX_STEPS + 1),
    "nan_patience": (MAX_NAN_PATIENCE, MAX_NAN_PATIENCE + 1),
    **{name: (float(MAX_SECONDS), MAX_SECONDS * 1.0001) for name in _DURATIONS},
}


@pytest.mark.parametrize("field", sorted(_EDGES))
def test_every_number_has_a_bound_named_in_the_error(field: str) -> None:
    inside, outside = _EDGES[field]
    assert getattr(build_job({field: inside}, {}), field) == inside
    for bad in (outside, 9223372036854775808, int("9" * 4000)):
        with pytest.raises(ConfigError) as info:
            build_job({field: bad}, {})
        assert f"invalid {field}:" in str(info.value) and "at most" in str(info.value)
        assert len(str(info.value)) < 200


@pytest.mark.parametrize("field", _DURATIONS)
def test_durations_are_finite(field: str) -> None:
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ConfigError) as info:
            build_job({field: bad}, {})
        assert f"invalid {field}: expected a finite number" in str(info.value)


def test_default_timeout_is_bounded_too() -> None:
    job = build_job({"steps": MAX_STEPS}, {})
    assert job.effective_timeout(MAX_STEPS) == MAX_SECONDS


def test_daemon_key_bounds_live_here() -> None:
    from lorasup.supervisor.serve import jobspec

    assert RETRIES_RANGE[1] == jobspec.MAX_RETRIES
    assert PRIORITY_RANGE == (-1_000_000, 1_000_000) and GPUS_RANGE == (0, 64)


@pytest.mark.parametrize(("text", "words"), [
    ("steps = " + "9" * 5000, "digits"),
    ("a = " + "[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_unreadable_numbers_and_nesting_in_a_job_file(tmp_path: Path, text: str,
                                                      words: str) -> None:
    path = tmp_path / "job.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as info:
        load_toml(path)
    assert words in str(info.value) and "\n" not in str(info.value)


_NUMBERS = st.one_of(st.integers(), st.floats(), st.integers(-(10**30), 10**30),
                     st.sampled_from([2**63, -(2**63) - 1, int("9" * 4000)]))


@given(field=st.sampled_from(sorted(_EDGES)), value=_NUMBERS)
def test_property_a_number_is_accepted_only_within_its_bounds(field: str, value) -> None:
    low = 0 if field in ("grace", "nan_patience") else None
    high = _EDGES[field][0]
    try:
        job = build_job({field: value}, {})
    except ConfigError as exc:
        assert field in str(exc) and "\n" not in str(exc)
        return
    got = getattr(job, field)
    assert got == value and got <= high and math.isfinite(got)
    assert got >= low if low is not None else got > 0
