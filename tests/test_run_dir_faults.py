"""No fault of the run directory ends a run: a full disk, planted symlinks, odd paths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from support import ROOT, run_lorasup

from lorasup.supervisor.events import Checkpoint, Outcome, Started, Step
from lorasup.supervisor.report import rebuild
from lorasup.supervisor.sink import ReportSink

FIREHOSE = ROOT / "bench" / "firehose.py"


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: full after a few hundred trainer lines."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "tiny"
    mount.mkdir()
    tool = shutil.which("mount")
    if tool is None:
        pytest.skip("no mount(8) here")
    proc = subprocess.run([tool, "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run([shutil.which("umount") or "umount", str(mount)], check=False)


def test_a_full_disk_does_not_end_the_run(tiny_disk: Path) -> None:
    run_dir = tiny_disk / "run"
    result = run_lorasup(run_dir, "--trainer", "kohya", "--steps", "4000", "--",
                         sys.executable, str(FIREHOSE), "--stream", "stdout", timeout=120)
    # the run earned its outcome: all steps, exit 0
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    logged = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    final = [e for e in logged if e.get("event") == "outcome"]
    assert final and final[-1]["outcome"] == "completed"
    assert "trainer.log" in final[-1]["unwritten"]
    failed = {e["file"] for e in logged if e.get("event") == "write_failed"}
    assert "trainer.log" in failed
    # logged once per file, not once per write
    assert len([e for e in logged if e.get("event") == "write_failed"]) == len(failed)
    report = run_dir / "report.json"
    if report.exists():  # the disk allowed it
        data = json.loads(report.read_text())
        assert data["outcome"] == "completed"
        assert any("could not be written" in n for n in data["notes"])


def feed_sink(run_dir: Path, *batches: list) -> ReportSink:
    """Run a real report sink over these batches to its end (its final files written)."""

    async def main() -> ReportSink:
        sink = ReportSink(run_dir, lambda: [], refresh_seconds=3600)
        send, receive = anyio.create_memory_object_stream(4)
        async with anyio.create_task_group() as tg:
            tg.start_soon(sink.run, receive)
            async with send:
                for batch in batches:
                    await send.send(batch)
        return sink

    return anyio.run(main)


def plant(run_dir: Path, targets: Path) -> dict[str, Path]:
    run_dir.mkdir()
    targets.mkdir()
    planted = {}
    for name in ("events.jsonl", "losses.csv", "report.json", "loss_curves.png"):
        target = targets / f"victim-{name}"
        target.write_text("precious\n")
        (run_dir / name).symlink_to(target)
        planted[name] = target
    return planted


def test_planted_symlinks_are_never_followed(tmp_path: Path) -> None:
    run_dir, targets = tmp_path / "run", tmp_path / "elsewhere"
    planted = plant(run_dir, targets)

    sink = feed_sink(run_dir,
                     [(0.0, Started(run_id="r", trainer="kohya", argv=("x",), pid=1,
                                    steps_requested=2, wall_time=0.0))],
                     [(1.0, Step(step=1, avg_loss=1.0)), (2.0, Step(step=2, avg_loss=0.5)),
                      (2.1, Outcome(outcome="completed", exit_code=0, reason="ok"))])
    for target in planted.values():
        assert target.read_text() == "precious\n"
    assert {"events.jsonl", "losses.csv"} <= set(sink.unwritten)
    # the report could be written: by replacing the link, never through it
    report = json.loads((run_dir / "report.json").read_text())
    assert report["outcome"] == "completed" and report["steps"]["last"] == 2
    assert not (run_dir / "report.json").is_symlink()
    assert any("events.jsonl could not be written" in n for n in report["notes"])
    assert report["artifacts"]["losses_csv"] is None
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_events_jsonl_is_private(tmp_path: Path) -> None:
    feed_sink(tmp_path, [(1.0, Step(step=1, loss=1.0))])
    assert (tmp_path / "events.jsonl").stat().st_mode & 0o777 == 0o600


def test_a_checkpoint_path_longer_than_name_max_is_no_crash(tmp_path: Path) -> None:
    name = "x" * 300 + ".safetensors"
    (tmp_path / "events.jsonl").write_text(
        Checkpoint(path=f"out/{name}").to_json(1.0) + "\n"
        + Step(step=1, loss=1.0).to_json(1.0) + "\n")
    report = rebuild(tmp_path, model_files=[f"out/{name}"])
    assert report["artifacts"]["checkpoints"] == [f"out/{name}"]
    from lorasup.supervisor.safefs import exists

    assert exists(tmp_path / name) is False  # ENAMETOOLONG is "not there", not a crash
