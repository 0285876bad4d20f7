"""The builtin trainer's inputs are checked by lorasup before anything is started.

Each bad input is one line on stderr and exit 2 from ``lorasup start``, with no run
directory made and no trainer spawned; the trainer itself, run alone, names a corrupt
image by its path too. Real files in tmp_path (tests run as root in CI, where permissions
do not stop writes: an unwritable output folder is a path through a regular file).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from lorasup.trainers.base import TrainerJob, UsageError
from lorasup.trainers.builtin.adapter import BuiltinAdapter
from tests.support import child_env, lorasup_argv


def _image(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 16), colour).save(path)
    return path


def _good_dataset(root: Path) -> Path:
    _image(root / "data" / "3_red" / "a.png")
    _image(root / "data" / "3_red" / "b.png", (10, 200, 10))
    return root / "data"


def _corrupt_png(root: Path) -> tuple[list[str], str]:
    data = _good_dataset(root)
    (data / "3_red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is no image")
    return ["--dataset", "data"], str(data / "3_red" / "broken.png")


def _truncated_png(root: Path) -> tuple[list[str], str]:
    data = _good_dataset(root)
    whole = (data / "3_red" / "a.png").read_bytes()
    (data / "3_red" / "cut.png").write_bytes(whole[: len(whole) // 2])
    return ["--dataset", "data"], str(data / "3_red" / "cut.png")


def _missing_dataset(root: Path) -> tuple[list[str], str]:
    return ["--dataset", "nowhere"], "dataset folder not found"


def _empty_dataset(root: Path) -> tuple[list[str], str]:
    (root / "empty").mkdir()
    return ["--dataset", "empty"], "no images"


def _empty_concept_folders(root: Path) -> tuple[list[str], str]:
    (root / "data" / "5_cats").mkdir(parents=True)
    return ["--dataset", "data"], "no images"


def _output_dir_is_a_file(root: Path) -> tuple[list[str], str]:
    _good_dataset(root)
    (root / "out").write_text("a file, not a folder")
    return ["--dataset", "data", "--output-dir", "out"], "is not a folder"


def _output_dir_under_a_file(root: Path) -> tuple[list[str], str]:
    _good_dataset(root)
    (root / "blocker").write_text("a file where a folder should be")
    return ["--dataset", "data", "--output-dir", "blocker/lora"], "cannot make the output folder"


def _continue_without_state(root: Path) -> tuple[list[str], str]:
    _good_dataset(root)
    return ["--dataset", "data", "--continue"], "no saved state to continue from"


def _continue_from_a_damaged_state(root: Path) -> tuple[list[str], str]:
    _good_dataset(root)
    (root / "lora_output").mkdir()
    (root / "lora_output" / "lorasup_lora-state.npz").write_bytes(b"PK\x03\x04 cut off")
    return ["--dataset", "data", "--continue"], "cannot read saved state"


def _bad_trainer_flag(root: Path) -> tuple[list[str], str]:
    _good_dataset(root)
    return ["--dataset", "data", "--", "--lr", "fast"], "--lr: must be a number"


CASES: dict[str, Callable[[Path], tuple[list[str], str]]] = {
    "corrupt png": _corrupt_png,
    "truncated png": _truncated_png,
    "missing dataset": _missing_dataset,
    "empty dataset": _empty_dataset,
    "empty concept folders": _empty_concept_folders,
    "output dir is a file": _output_dir_is_a_file,
    "output dir under a file": _output_dir_under_a_file,
    "continue without state": _continue_without_state,
    "continue from a damaged state": _continue_from_a_damaged_state,
    "bad trainer flag": _bad_trainer_flag,
}


def _split(args: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """lorasup flags → job options; what follows '--' → the trainer's argv."""
    argv = args[args.index("--") + 1:] if "--" in args else []
    flags = args[: args.index("--")] if "--" in args else args
    options: list[tuple[str, str]] = []
    i = 0
    while i < len(flags):
        if flags[i] == "--continue":
            options.append(("mode", "continue"))
            i += 1
        else:
            options.append((flags[i][2:].replace("-", "_"), flags[i + 1]))
            i += 2
    return sorted(options), argv


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_preflight_refuses_with_one_line(tmp_path: Path, case: str) -> None:
    args, expected = CASES[case](tmp_path)
    options, argv = _split(args)
    job = TrainerJob(steps=5, argv=tuple(argv), run_dir=str(tmp_path / "run"),
                     options=tuple(options))
    with pytest.raises(UsageError) as info:
        BuiltinAdapter().preflight(job, tmp_path)
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert "BytesIO" not in message
    assert not (tmp_path / "lora_output" / "lorasup_lora.safetensors").exists()


def test_preflight_passes_a_good_dataset_and_the_demo(tmp_path: Path) -> None:
    _good_dataset(tmp_path)
    adapter = BuiltinAdapter()
    adapter.preflight(TrainerJob(5, (), "run", (("dataset", "data"),)), tmp_path)
    adapter.preflight(TrainerJob(5, (), "run"), tmp_path / "data")  # no lora_train_set: demo
    assert not (tmp_path / "lora_output").exists()  # checking writes nothing


def test_preflight_imports_no_numpy() -> None:
    """lorasup supervises with a small footprint: the check needs PIL, not numpy."""
    code = ("import sys; from pathlib import Path; "
            "from lorasup.trainers.builtin.adapter import BuiltinAdapter; "
            "from lorasup.trainers.base import TrainerJob; "
            "BuiltinAdapter().preflight(TrainerJob(3, (), 'r'), Path('.')); "
            "print('numpy' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=child_env(), cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@pytest.mark.parametrize("case", ["corrupt png", "empty dataset", "output dir is a file",
                                  "continue without state"])
def test_lorasup_start_refuses_before_anything_starts(tmp_path: Path, case: str) -> None:
    args, expected = CASES[case](tmp_path)
    proc = subprocess.run(lorasup_argv("start", "--steps", "5", "--log-format", "json", *args),
                          capture_output=True, text=True, timeout=60, env=child_env(),
                          cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorasup: error: ")
    assert expected in lines[0]
    assert proc.stdout == ""  # no log line: nothing was started
    assert not (tmp_path / "training_logs").exists()


def test_the_trainer_names_a_corrupt_image_by_its_path(tmp_path: Path) -> None:
    _args, path = _corrupt_png(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "lorasup.trainers.builtin", "--steps", "3",
                           "--no-progress", "--dataset", "data"], capture_output=True, text=True,
                          timeout=60, env=child_env(), cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1
    assert str(Path("data") / "3_red" / "broken.png") in proc.stderr
    assert "BytesIO" not in proc.stderr and "BytesIO" not in proc.stdout
    assert path.endswith("broken.png")
