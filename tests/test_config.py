"""Job files and flags: validated before anything starts; flags win over the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorasup.supervisor.config import ConfigError, build_job, load_toml

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
