"""Job files and flags: validated before anything starts; flags win over the file."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lorasup.supervisor.config import ConfigError, Job, Options, build_job, load_toml
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
        assert str(exc) and "\n" not in str(exc)
        return
    got = getattr(job, field)
    if isinstance(value, bool):  # a switch is never read as a number (steps = true)
        assert isinstance(got, bool) or got is None
