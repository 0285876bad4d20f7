"""The builtin numpy LoRA trainer: real subprocesses, real files, real signals.

The trainer is run as ``python -m lorasup.trainers.builtin`` with argv lists in temporary
folders; only the gradient check, the schedules and the adapter are tested in-process.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file

from lorasup.trainers.base import TrainerJob, UsageError
from lorasup.trainers.builtin import model as M
from lorasup.trainers.builtin.adapter import BuiltinAdapter
from lorasup.trainers.builtin.noise import linear_schedule
from lorasup.trainers.builtin.optim import clip_grad_norm
from lorasup.trainers.builtin.schedule import learning_rate
from lorasup.trainers.native import NativeAdapter

REPO = Path(__file__).resolve().parents[1]
LORA = "lora_output/lorasup_lora.safetensors"
STATE = "lora_output/lorasup_lora-state.npz"
STEP_KEYS = ["lorasup", "kind", "step", "total", "loss", "avg_loss", "lr", "epoch"]


def trainer_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str
    cwd: Path

    @property
    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.stdout.splitlines()
                if line.startswith('{"lorasup":1,')]

    def kinds(self, kind: str) -> list[dict]:
        return [r for r in self.records if r["kind"] == kind]

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.kinds("step")]


def run_trainer(cwd: Path, *args: str, timeout: float = 30) -> Run:
    cwd.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "lorasup.trainers.builtin", "--no-progress", *args]
    proc = subprocess.run(argv,
                          cwd=cwd, env=trainer_env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    return Run(proc.returncode, proc.stdout, proc.stderr, cwd)


def make_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)
               ) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    image.putpixel((3, 4), (255 - colour[0], 0, 0))
    image.save(path)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One uninterrupted default run: 200 steps on the demo dataset (no lora_train_set)."""
    run = run_trainer(tmp_path_factory.mktemp("baseline"), "--steps", "200")
    assert run.returncode == 0, run.stderr
    return run


# --- the model ---------------------------------------------------------------------------


def test_gradients_match_finite_differences() -> None:
    schedule = linear_schedule(dtype=np.float64)
    base = M.BaseModel.build(schedule, dtype=np.float64, hidden=16)
    rng = np.random.default_rng(0)
    lora = M.LoraAdapters.init(base, rank=3, alpha=2.0, rng=rng)
    for layer in M.LAYERS:  # B = 0 would make every dL/dA zero: test the general case
        lora.up[layer] = rng.standard_normal(lora.up[layer].shape) * 0.3
    x = rng.standard_normal((5, M.PIXELS))
    t = rng.integers(0, schedule.timesteps, 5)
    eps = rng.standard_normal((5, M.PIXELS))
    _, grads = M.loss_and_grads(base, lora, x, t, eps)
    h = 1e-5  # central differences: O(h²) truncation, ~1e-11 round-off on a loss of ~1
    for name, param in lora.params().items():
        assert grads[name].shape == param.shape
        for i in rng.choice(param.size, 25, replace=False):
            old = param.flat[i]
            param.flat[i] = old + h
            plus, _ = M.loss_and_grads(base, lora, x, t, eps, need_grads=False)
            param.flat[i] = old - h
            minus, _ = M.loss_and_grads(base, lora, x, t, eps, need_grads=False)
            param.flat[i] = old
            numeric = (plus - minus) / (2 * h)
            assert grads[name].flat[i] == pytest.approx(numeric, rel=1e-5, abs=1e-9), name


def test_adapters_start_as_the_base_network() -> None:
    schedule = linear_schedule(dtype=np.float64)
    base = M.BaseModel.build(schedule, dtype=np.float64, hidden=16)
    rng = np.random.default_rng(1)
    x, eps = rng.standard_normal((2, M.PIXELS)), rng.standard_normal((2, M.PIXELS))
    t = np.array([10, 900])
    fresh = M.LoraAdapters.init(base, 4, 4.0, rng)
    zero = M.LoraAdapters(4, 4.0, {k: np.zeros_like(v) for k, v in fresh.down.items()},
                          {k: np.zeros_like(v) for k, v in fresh.up.items()})
    loss, grads = M.loss_and_grads(base, fresh, x, t, eps)
    assert loss == M.loss_and_grads(base, zero, x, t, eps, need_grads=False)[0]
    assert all(not grads[f"{layer}.down"].any() for layer in M.LAYERS)  # B = 0
    assert all(grads[f"{layer}.up"].any() for layer in M.LAYERS)


def test_learning_rate_schedules_and_clipping() -> None:
    kw = {"base_lr": 1.0, "total_steps": 10}
    assert [learning_rate(s, **kw, warmup_steps=4) for s in (1, 2, 4, 5, 10)] == \
        [0.25, 0.5, 1.0, 1.0, 1.0]
    cosine = [learning_rate(s, **kw, scheduler="cosine", warmup_steps=2) for s in range(1, 11)]
    assert cosine[:3] == [0.5, 1.0, 1.0]
    assert all(a > b for a, b in itertools.pairwise(cosine[2:]))
    assert 0 < cosine[-1] < 0.05
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    assert clip_grad_norm(grads, 1.0) == pytest.approx(5.0)
    assert math.hypot(*grads["a"], *grads["b"].ravel()) == pytest.approx(1.0, rel=1e-5)
    assert clip_grad_norm(grads, 0.0) == pytest.approx(1.0, rel=1e-5)  # 0: no clipping


# --- a full run ----------------------------------------------------------------------------


def test_run_speaks_the_protocol_and_uses_the_demo_dataset(baseline: Run) -> None:
    assert "built-in demo dataset" in baseline.stderr
    raw_steps = [line for line in baseline.stdout.splitlines() if '"kind":"step"' in line]
    assert all(line.startswith('{"lorasup":1,"kind":"step","step":') for line in raw_steps)
    steps = baseline.kinds("step")
    assert [s["step"] for s in steps] == list(range(1, 201))
    assert all(list(s) == STEP_KEYS and s["total"] == 200 for s in steps)
    # demo set: 6 images × 10 repeats = 60 per epoch, batch 4 -> 15 steps/epoch, 14 epochs
    epochs = baseline.kinds("epoch")
    assert [e["epoch"] for e in epochs] == list(range(1, 15))
    assert {e["total"] for e in epochs} == {14}
    assert steps[15]["epoch"] == 2 and steps[15]["avg_loss"] == steps[15]["loss"]
    assert steps[1]["avg_loss"] == pytest.approx((steps[0]["loss"] + steps[1]["loss"]) / 2)
    assert baseline.records[-2:] == [
        {"lorasup": 1, "kind": "checkpoint", "path": LORA, "step": 200},
        {"lorasup": 1, "kind": "finished", "marker": "saved"},
    ]
    assert (baseline.cwd / STATE).is_file()


def test_loss_falls(baseline: Run) -> None:
    losses = baseline.losses
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    # measured (seed 42, defaults): first 20 steps 0.1901, last 20 steps 0.1280 (ratio 0.67);
    # the per-step spread over the last 20 is 0.023, so 0.85 is a wide margin.
    assert last < 0.85 * first, (first, last)
    assert all(math.isfinite(x) for x in losses)


def test_lora_file_has_kohya_keys_and_metadata(baseline: Run) -> None:
    path = baseline.cwd / LORA
    tensors = load_file(str(path))
    expected = {f"lora_unet_{layer}.{part}" for layer in M.LAYERS
                for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert set(tensors) == expected
    for layer, (out_features, in_features) in M.layer_shapes().items():
        down = tensors[f"lora_unet_{layer}.lora_down.weight"]
        up = tensors[f"lora_unet_{layer}.lora_up.weight"]
        assert down.shape == (4, in_features) and up.shape == (out_features, 4)
        assert down.dtype == up.dtype == np.float32
        assert np.abs(up).max() > 0  # B started at zero: it was trained
        assert tensors[f"lora_unet_{layer}.alpha"].shape == ()
        assert float(tensors[f"lora_unet_{layer}.alpha"]) == 4.0
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata()
    assert all(isinstance(v, str) for v in metadata.values())
    assert metadata["ss_steps"] == "200"
    assert metadata["ss_network_dim"] == "4"
    assert metadata["ss_network_alpha"] == "4.0"
    assert metadata["ss_learning_rate"] == "0.002"
    assert metadata["ss_seed"] == "42"
    assert len(metadata["lorasup_dataset_fingerprint"]) == 16


def test_same_seed_same_bytes_and_new_keeps_a_backup(tmp_path: Path) -> None:
    args = ("--steps", "30", "--seed", "7")
    first = run_trainer(tmp_path / "a", *args)
    assert first.returncode == 0, first.stderr
    first_bytes = (tmp_path / "a" / LORA).read_bytes()
    again = run_trainer(tmp_path / "a", *args)  # no --new/--continue with a LoRA present
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "a" / LORA).read_bytes() == first_bytes
    backups = list((tmp_path / "a" / "lora_output").glob("lorasup_lora.*.bak.safetensors"))
    assert len(backups) == 1 and backups[0].read_bytes() == first_bytes
    assert "kept the earlier LoRA as" in again.stderr
    other = run_trainer(tmp_path / "b", "--steps", "30", "--seed", "8")
    assert other.returncode == 0, other.stderr
    assert (tmp_path / "b" / LORA).read_bytes() != first_bytes
    assert other.losses != first.losses


def test_continue_matches_an_uninterrupted_run(tmp_path: Path, baseline: Run) -> None:
    head = run_trainer(tmp_path, "--steps", "100")
    assert head.returncode == 0, head.stderr
    tail = run_trainer(tmp_path, "--steps", "100", "--continue")
    assert tail.returncode == 0, tail.stderr
    assert tail.records[0] == {"lorasup": 1, "kind": "resume", "step": 100}
    steps = tail.kinds("step")
    assert [s["step"] for s in steps] == list(range(101, 201))
    assert {s["total"] for s in steps} == {200}
    reference = baseline.kinds("step")
    for got, want in zip(head.kinds("step") + steps, reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert got["avg_loss"] == pytest.approx(want["avg_loss"], rel=1e-6)
        assert got["epoch"] == want["epoch"]
    resumed, whole = load_file(str(tmp_path / LORA)), load_file(str(baseline.cwd / LORA))
    for key, value in whole.items():
        np.testing.assert_allclose(resumed[key], value, rtol=1e-6, atol=1e-7)
    assert not list((tmp_path / "lora_output").glob("*.bak.safetensors"))


def test_continue_without_state_fails_cleanly(tmp_path: Path) -> None:
    run = run_trainer(tmp_path, "--steps", "5", "--continue")
    assert run.returncode == 1
    assert "lorasup_lora-state.npz" in run.stderr
    assert [r["problem"] for r in run.kinds("problem")] == ["resume"]
    assert not run.kinds("step")
    assert not (tmp_path / "lora_output").exists()


def test_kohya_repeats_and_epochs(tmp_path: Path) -> None:
    """The default dataset folder, when present, is used; epochs follow kohya's arithmetic."""
    root = tmp_path / "lora_train_set"
    make_image(root / "2_red" / "a.png", (200, 30, 30))
    (root / "2_red" / "a.txt").write_text("a red thing\n", encoding="utf-8")
    make_image(root / "2_red" / "b.jpg", (180, 60, 20), size=(20, 50))
    make_image(root / "2_red" / "c.webp", (240, 90, 90))
    make_image(root / "3_blue" / "d.jpeg", (20, 30, 220))
    (root / "notes.md").write_text("ignored\n", encoding="utf-8")
    run = run_trainer(tmp_path, "--steps", "7", "--batch-size", "4")
    assert run.returncode == 0, run.stderr
    assert "demo" not in run.stderr
    # 3 images × 2 + 1 image × 3 = 9 per epoch -> ceil(9/4) = 3 steps/epoch, ceil(7/3) = 3
    epochs = run.kinds("epoch")
    assert [(e["epoch"], e["total"]) for e in epochs] == [(1, 3), (2, 3), (3, 3)]
    assert [s["epoch"] for s in run.kinds("step")] == [1, 1, 1, 2, 2, 2, 3]
    with safe_open(str(tmp_path / LORA), framework="numpy") as handle:
        metadata = handle.metadata()
    assert metadata["ss_num_train_images"] == "9"
    assert json.loads(metadata["ss_dataset_dirs"]) == {
        "2_red": {"n_repeats": 2, "img_count": 3}, "3_blue": {"n_repeats": 3, "img_count": 1}}


def test_options_reach_the_run(tmp_path: Path) -> None:
    run = run_trainer(tmp_path, "--steps", "10", "--save-every", "4", "--scheduler", "cosine",
                      "--warmup-steps", "2", "--lr", "0.01", "--rank", "2", "--alpha", "1",
                      "--batch-size", "3", "--name", "mine", "--output-dir", "out")
    assert run.returncode == 0, run.stderr
    assert [c["step"] for c in run.kinds("checkpoint")] == [4, 8, 10]
    lrs = [s["lr"] for s in run.kinds("step")]
    assert lrs[:3] == [0.005, 0.01, 0.01]
    assert all(a > b for a, b in itertools.pairwise(lrs[2:]))
    tensors = load_file(str(tmp_path / "out" / "mine.safetensors"))
    assert tensors["lora_unet_in_proj.lora_down.weight"].shape == (2, M.PIXELS)
    assert float(tensors["lora_unet_out_proj.alpha"]) == 1.0
    assert (tmp_path / "out" / "mine-state.npz").is_file()
    # 60 entries / batch 3 = 20 steps per epoch: one epoch
    assert [(e["epoch"], e["total"]) for e in run.kinds("epoch")] == [(1, 1)]


def _bad_folder_name(root: Path) -> Path:
    make_image(root / "images" / "a.png", (1, 2, 3))
    return root / "images"


def _unreadable_image(root: Path) -> Path:
    make_image(root / "5_x" / "good.png", (1, 2, 3))
    (root / "5_x" / "broken.png").write_bytes(b"this is not a png")
    return root / "5_x" / "broken.png"


def _empty_dataset(root: Path) -> Path:
    (root / "5_x").mkdir(parents=True)
    (root / "5_x" / "caption_only.txt").write_text("no image here\n", encoding="utf-8")
    return root


@pytest.mark.parametrize("make_bad", [_bad_folder_name, _unreadable_image, _empty_dataset])
def test_dataset_errors_name_the_culprit(tmp_path: Path, make_bad: Callable[[Path], Path]
                                         ) -> None:
    culprit = make_bad(tmp_path / "data")
    run = run_trainer(tmp_path, "--steps", "5", "--dataset", "data")
    assert run.returncode == 1
    relative = str(culprit.relative_to(tmp_path))
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and relative in lines[0]
    assert run.records == [{"lorasup": 1, "kind": "problem", "problem": "dataset",
                            "line": lines[0].removeprefix("error: ")}]
    assert not (tmp_path / "lora_output").exists()


def test_explicit_missing_dataset_is_an_error(tmp_path: Path) -> None:
    run = run_trainer(tmp_path, "--steps", "5", "--dataset", "lora_train_set")
    assert run.returncode == 1
    assert "lora_train_set" in run.stderr and "demo" not in run.stderr
    assert run.kinds("problem")[0]["problem"] == "dataset"


# --- graceful stop ---------------------------------------------------------------------------


def _lines(proc: subprocess.Popen[str]) -> Iterator[dict]:
    assert proc.stdout is not None
    for line in proc.stdout:  # blocks until the trainer writes: no sleeping, no polling
        if line.startswith('{"lorasup":1,'):
            yield json.loads(line)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stop_signal_saves_and_exits(tmp_path: Path, signum: signal.Signals, code: int) -> None:
    with (tmp_path / "stderr.txt").open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lorasup.trainers.builtin", "--steps", "100000"], cwd=tmp_path,
            env=trainer_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=stderr, text=True)
        try:
            records = _lines(proc)
            first = next(r for r in records if r["kind"] == "step")
            proc.send_signal(signum)
            rest = list(records)
            assert proc.wait(timeout=30) == code
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]
    steps = [first, *(r for r in rest if r["kind"] == "step")]
    last = steps[-1]["step"]
    assert last < 100000
    assert rest[-1] == {"lorasup": 1, "kind": "checkpoint", "path": LORA, "step": last}
    assert not any(r["kind"] == "finished" for r in rest)
    assert f"stopped by {signum.name} after step {last}" in (tmp_path / "stderr.txt").read_text()
    tensors = load_file(str(tmp_path / LORA))
    assert len(tensors) == 3 * len(M.LAYERS)
    with safe_open(str(tmp_path / LORA), framework="numpy") as handle:
        assert handle.metadata()["ss_steps"] == str(last)
    resumed = run_trainer(tmp_path, "--steps", "2", "--continue")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.records[0] == {"lorasup": 1, "kind": "resume", "step": last}
    assert [s["step"] for s in resumed.kinds("step")] == [last + 1, last + 2]


# --- the adapter ----------------------------------------------------------------------------


def test_adapter_builds_the_command() -> None:
    adapter = BuiltinAdapter()
    assert isinstance(adapter, NativeAdapter) and adapter.name == "builtin"
    assert adapter.stops_by_itself
    assert adapter.stop_signals == (signal.SIGINT, signal.SIGTERM)
    assert adapter.resolve_steps(200, []) == 200
    with pytest.raises(UsageError, match="--steps"):
        adapter.resolve_steps(None, [])
    job = TrainerJob(steps=200, argv=("--lr", "1e-3", "--steps", "5", "--steps=9"),
                     run_dir="run", options=(("mode", "continue"), ("dataset", "pics"),
                                             ("output_dir", "out")))
    assert adapter.command(job) == [
        sys.executable, "-m", "lorasup.trainers.builtin", "--steps", "200", "--continue",
        "--dataset", "pics", "--output-dir", "out", "--lr", "1e-3"]
    plain = TrainerJob(steps=3, argv=(), run_dir="run")
    assert adapter.command(plain) == [
        sys.executable, "-m", "lorasup.trainers.builtin", "--steps", "3"]
    with pytest.raises(UsageError):
        adapter.command(TrainerJob(steps=3, argv=("--new",), run_dir="r",
                                   options=(("mode", "continue"),)))
    line = ('{"lorasup":1,"kind":"step","step":3,"total":200,"loss":0.5,"avg_loss":0.55,'
            '"lr":0.0001,"epoch":1}')
    (event,) = adapter.parse(line)
    assert (event.step, event.total, event.loss) == (3, 200, 0.5)
