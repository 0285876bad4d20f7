"""What a run left: model files and checkpoints, found on disk once and recorded in
events.jsonl, so that a rebuilt report names the same absolute paths."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lorasup.supervisor.artifacts import find_artifacts, is_model_file
from lorasup.supervisor.report import rebuild
from tests.support import kohya_args, run_lorasup


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_training_state_is_no_model_file() -> None:
    for name in ("optimizer.pt", "scheduler.pt", "training_args.bin", "rng_state.pth",
                 "rng_state_3.pth", "scaler.pt", "random_states_0.pkl", "optimizer.bin"):
        assert not is_model_file(Path(name)), name
    for name in ("adapter_model.safetensors", "model-00001-of-00002.safetensors",
                 "pytorch_model.bin", "adapter_model.bin", "lora.ckpt", "last.safetensors"):
        assert is_model_file(Path(name)), name


def test_hf_checkpoint_folders_are_found_without_being_announced(tmp_path: Path) -> None:
    since = time.time()
    out = tmp_path / "out"
    for n in (10, 2):
        ck = out / f"checkpoint-{n}"
        for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
                     "training_args.bin", "rng_state.pth", "trainer_state.json"):
            _touch(ck / name)
    _touch(out / "adapter_model.safetensors")
    checkpoints, models = find_artifacts([], [Path("out")], tmp_path, since)
    assert checkpoints == [str(out / "checkpoint-2"), str(out / "checkpoint-10")]
    assert sorted(models) == sorted([str(out / "adapter_model.safetensors"),
                                     str(out / "checkpoint-10" / "adapter_model.safetensors"),
                                     str(out / "checkpoint-2" / "adapter_model.safetensors")])
    assert all(Path(p).is_absolute() for p in checkpoints + models)


def test_announced_paths_are_made_absolute_and_old_files_left_out(tmp_path: Path) -> None:
    old = _touch(tmp_path / "out" / "old.safetensors")
    since = time.time() + 5  # everything on disk is older than the run
    checkpoints, models = find_artifacts(["out/./old.safetensors", "gone/x.safetensors"],
                                         [tmp_path / "out"], tmp_path, since)
    assert checkpoints == [str(old), str(tmp_path / "gone" / "x.safetensors")]
    assert models == [str(old)]  # announced and there; the walk finds nothing fresh


def test_rebuilt_report_keeps_model_files_and_absolute_paths(run_dir: Path) -> None:
    out = run_dir.parent / "out"
    result = run_lorasup(run_dir, *kohya_args("--output_dir", str(out), steps=3))
    assert result.returncode == 0, result.stderr[-2000:]
    live = result.report["artifacts"]
    assert any(p.endswith("test_lora.safetensors") for p in live["model_files"])
    assert all(Path(p).is_absolute() for p in live["model_files"] + live["checkpoints"])
    kinds = [json.loads(line)["kind"] for line in
             (run_dir / "events.jsonl").read_text().splitlines()]
    assert kinds[-2:] == ["artifacts", "outcome"]
    rebuilt = rebuild(run_dir)
    assert rebuilt["artifacts"]["model_files"] == live["model_files"]
    assert rebuilt["artifacts"]["checkpoints"] == live["checkpoints"]
    timing = rebuilt["timing"]
    assert timing["started_at_iso"].endswith("Z")
    assert time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timing["started_at"])) == \
        timing["started_at_iso"][:19]
    assert timing["last_event_at"] >= timing["started_at"]
    assert timing["last_event_at_iso"] >= timing["started_at_iso"]
