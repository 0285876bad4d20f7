"""Hangs explained: stacks before a stall kill and on SIGQUIT, the no-progress watchdog, the
start-up allowance and where the time went (timing.*), with real trainers and real py-spy."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lorasup.supervisor.config import ConfigError, build_job, load_toml
from lorasup.supervisor.report import ReportBuilder, read_into
from lorasup.supervisor.stacks import (
    Frame,
    ProcessStack,
    Target,
    ThreadStack,
    capture,
    evidence,
    explain_failure,
    find_py_spy,
    parse_dump,
    where,
    write_stacks_file,
)
from lorasup.supervisor.watchdogs import ProgressWatchdog, SilenceWatchdog
from tests.support import HELPERS, child_env, gone, lorasup_argv, run_lorasup, wait_for

HANG = HELPERS / "hang_trainer.py"


@pytest.fixture(scope="module")
def ptrace() -> None:
    """py-spy is a dependency; only a platform that forbids ptrace is a reason to skip."""
    py_spy = find_py_spy()
    assert py_spy is not None, "py-spy is a runtime dependency and must be installed"
    with subprocess.Popen([sys.executable, "-c", "import time\nprint('ready', flush=True)\n"
                           "time.sleep(60)"], stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
            probe = subprocess.run([py_spy, "dump", "--pid", str(child.pid)],
                                   capture_output=True, text=True, timeout=30,
                                   env={**os.environ, "RUST_BACKTRACE": "0"})
        finally:
            child.kill()
    if probe.returncode != 0:
        said = probe.stderr.lower()
        if any(word in said for word in ("permission", "not permitted", "ptrace")):
            pytest.skip(f"this platform forbids ptrace: {probe.stderr.strip()[:200]}")
        pytest.fail(f"py-spy failed on a plain Python child: {probe.stderr[:500]}")


def native(*trainer_args: str, steps: int = 5, silence: float = 10.0, grace: float = 0.5,
           extra: tuple[str, ...] = ()) -> list[str]:
    return ["--trainer", "native", "--steps", str(steps), "--no-output-timeout", str(silence),
            "--grace", str(grace), *extra, "--", sys.executable, str(HANG), *trainer_args]


def problems(report: dict, kind: str) -> list[str]:
    return [p["line"] for p in report["problems"] if p["problem"] == kind]


# ---------------------------------------------------------------------------- end to end


def test_a_stall_is_killed_after_the_stacks_name_the_functions(run_dir: Path, ptrace) -> None:
    # A long start-up allowance does not loosen the watch once training runs.
    result = run_lorasup(run_dir, *native("--hang-at", "3", "--with-worker", silence=0.5,
                                          extra=("--startup-timeout", "30")))
    assert result.returncode == 4, result.stderr[-2000:]
    report = result.report
    assert report["outcome"] == "stalled"
    assert report["reason"] == "no output for 0.5s"
    assert report["steps"]["last"] == 2
    text = (run_dir / "stacks.txt").read_text(encoding="utf-8")
    assert "wait_for_the_collective_barrier" in text and "supervise_the_ranks" in text
    assert stat.S_IMODE((run_dir / "stacks.txt").stat().st_mode) == 0o600
    located = problems(report, "stalled_in")
    # The worker's own frame; the launcher waits in subprocess.py, called from its function.
    assert any("hang_trainer.py:wait_for_the_collective_barrier" in line and "rank 1" in line
               for line in located), located
    assert any(line.startswith("stalled in subprocess.py:") and
               "called from hang_trainer.py:supervise_the_ranks" in line and "trainer" in line
               for line in located), located
    [capture] = report["stacks"]
    assert capture["reason"] == "stalled" and capture["file"] == "stacks.txt"
    assert capture["seconds"] <= 5.0
    # Stacks first, then the stop; both within a few seconds of the stall.
    events = result.events()
    taken = next(e["t"] for e in events if e["kind"] == "stacks")
    first_signal = next(e["t"] for e in events if e["kind"] == "signal")
    assert taken <= first_signal
    assert first_signal - report["series"]["t"][-1] < 6.0
    pids = [p["pid"] for p in capture["processes"]]
    assert len(pids) == 2 and all(gone(pid) for pid in pids)
    # The report is a function of events.jsonl alone.
    builder = ReportBuilder()
    read_into(builder, run_dir / "events.jsonl")
    again = builder.snapshot()
    assert again["stacks"] == report["stacks"] and again["timing"] == report["timing"]
    assert report["timing"]["finish_s"] >= 0.5  # from the last step through the hang and stop


def test_talking_without_progress_is_stalled(run_dir: Path, ptrace) -> None:
    # Warnings and redraws every 0.2 s: the 0.8 s no-output limit never fires, no-progress does.
    result = run_lorasup(run_dir, *native("--chatter-at", "3", silence=0.8,
                                          extra=("--no-progress-timeout", "1.5")))
    assert result.returncode == 4, result.stderr[-2000:]
    report = result.report
    assert report["outcome"] == "stalled"
    assert report["reason"].startswith("no new step for 1.5s")
    assert report["steps"]["last"] == 2
    stop = next(e for e in result.events() if e["kind"] == "signal")
    assert stop["reason"] == "no_progress"
    # Counted from the last new step, not reset by the chatter, and not much later.
    assert 1.5 <= stop["t"] - report["series"]["t"][-1] < 6.0
    assert "warn_while_waiting_for_a_peer" in (run_dir / "stacks.txt").read_text()
    assert any("warn_while_waiting_for_a_peer" in line
               for line in problems(report, "stalled_in"))


def test_slow_start_slow_save_complete_and_the_timing_adds_up(run_dir: Path) -> None:
    # Silent 1 s before step 1 and 1.2 s after step N with a 0.5 s no-output limit and a
    # 1 s no-progress limit: the allowance covers the load, the finish limit the save.
    result = run_lorasup(run_dir, *native(
        "--silent-start", "1", "--final-save", "1.2", "--step-seconds", "0.05", steps=4,
        silence=0.5, extra=("--startup-timeout", "20", "--no-progress-timeout", "1")))
    assert result.returncode == 0, result.stderr[-2000:]
    report = result.report
    assert report["outcome"] == "completed" and report["signals_sent"] == []
    assert report["stacks"] == [] and not (run_dir / "stacks.txt").exists()
    timing = report["timing"]
    assert timing["startup_s"] >= 1.0
    # from the first step's line to the last one's, as lorasup read them (0.05 s apart in
    # the trainer; a read that comes a little late makes the span a little shorter)
    step_t = {e["step"]: e["t"] for e in result.events() if e["kind"] == "step"}
    assert timing["training_s"] == pytest.approx(step_t[4] - step_t[1], abs=1e-6)
    assert timing["training_s"] >= 0.1
    assert timing["finish_s"] >= 1.2
    assert timing["startup_s"] + timing["training_s"] + timing["finish_s"] == timing["trainer_s"]
    exited = next(e["t"] for e in result.events() if e["kind"] == "exited")
    started = next(e["t"] for e in result.events() if e["kind"] == "started")
    assert timing["trainer_s"] == pytest.approx(exited - started, abs=1e-9)
    assert timing["trainer_s"] <= timing["duration_s"]
    assert timing["missing"] == [] and timing["explanation"] == {}


def test_a_non_python_trainer_is_reported_without_stacks_and_why(run_dir: Path, ptrace) -> None:
    result = run_lorasup(run_dir, "--trainer", "command", "--steps", "1",
                         "--no-output-timeout", "0.5", "--grace", "0.3", "--", "/bin/sleep", "30")
    assert result.returncode == 4, result.stderr[-2000:]
    report = result.report
    [line] = problems(report, "no_stack")
    assert "not a Python process" in line and "/bin/sleep 30" in line
    [capture] = report["stacks"]
    [process] = capture["processes"]
    assert "not a Python process" in process["error"] and "where" not in process
    assert "not a Python process" in (run_dir / "stacks.txt").read_text()
    # Silent from the start: the start-up allowance (by default the no-output timeout) ran out.
    assert report["reason"] == "no output for 0.5s before the first step"
    timing = report["timing"]
    assert timing["startup_s"] is None and "startup_s" in timing["missing"]
    assert timing["explanation"]["startup_s"] == "no step was recorded"
    assert timing["trainer_s"] is not None and timing["trainer_s"] >= 0.5


def test_sigquit_dumps_stacks_and_the_run_goes_on(run_dir: Path, tmp_path: Path,
                                                   ptrace) -> None:
    go = tmp_path / "go"
    argv = lorasup_argv("start", "--run-dir", str(run_dir), "--log-format", "json",
                        *native("--go-file", str(go), steps=3, silence=20))
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=child_env())
    stacks_txt = run_dir / "stacks.txt"
    try:
        events = run_dir / "events.jsonl"
        assert wait_for(lambda: events.exists() and '"kind":"step"' in events.read_text(),
                        timeout=20)
        proc.send_signal(signal.SIGQUIT)
        assert wait_for(lambda: stacks_txt.exists() and "wait_for_the_go_file"
                        in stacks_txt.read_text(), timeout=20)
        go.touch()
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, stderr[-2000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["outcome"] == "completed" and report["steps"]["last"] == 3
    assert report["signals_sent"] == []
    [capture] = report["stacks"]
    assert capture["reason"] == "SIGQUIT"
    assert "wait_for_the_go_file" in capture["processes"][0]["where"]
    assert problems(report, "stalled_in") == []


# ---------------------------------------------------------------------------- pieces


def test_flags_and_job_file_keys(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text("startup_timeout = 600\nno_progress_timeout = 120\n")
    job = build_job(load_toml(path), {"no_progress_timeout": 60})
    assert (job.startup_timeout, job.no_progress_timeout) == (600, 60)
    assert build_job({}, {}).no_progress_timeout is None
    with pytest.raises(ConfigError, match="no_progress_timeout"):
        build_job({"no_progress_timeout": 0}, {})


def test_bad_flag_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(lorasup_argv("start", "--run-dir", str(tmp_path / "r"),
                                       *native(extra=("--startup-timeout", "-1"))),
                          capture_output=True, text=True, timeout=60, env=child_env())
    assert proc.returncode == 2
    assert proc.stderr.startswith("lorasup: error: ") and "startup_timeout" in proc.stderr
    assert not (tmp_path / "r").exists()


def _stack(*paths_and_functions: tuple[str, str]) -> ProcessStack:
    frames = tuple(Frame(function=f, file=Path(p).name, path=p, line=7)
                   for p, f in paths_and_functions)
    return ProcessStack(Target(42, "rank 3", "python train.py"),
                        threads=(ThreadStack("Thread-1", 1, True, ()),
                                 ThreadStack("MainThread", 42, False, frames)))


def test_where_names_the_callers_frame_when_the_innermost_is_the_standard_library() -> None:
    lib = "/usr/lib/python3.11/threading.py"
    stack = _stack((lib, "Condition.wait"), (lib, "Event.wait"), ("/src/train.py", "barrier"))
    assert where(stack) == ("threading.py:Condition.wait (line 7), "
                            "called from train.py:barrier (line 7)")
    torch = "/venv/lib/python3.11/site-packages/torch/distributed/distributed_c10d.py"
    assert where(_stack((torch, "barrier"))) == "distributed_c10d.py:barrier (line 7)"
    assert where(_stack((torch, "barrier"), (lib, "Thread.run"), ("/src/train.py", "sync"))) == (
        "distributed_c10d.py:barrier (line 7), called from train.py:sync (line 7)")
    assert evidence(_stack((torch, "barrier"))).endswith("(pid 42, rank 3)")
    failed = ProcessStack(Target(9, "child", "/bin/sleep 30"), error="not a Python process")
    assert where(failed) is None
    assert evidence(failed) == "no Python stack for pid 9 (child: /bin/sleep 30): " \
                               "not a Python process"


def test_py_spy_failures_are_explained() -> None:
    not_python = ("Error: Failed to find python version from target process\n\n"
                  "Stack backtrace:\n   0: anyhow::error::msg\n")
    assert explain_failure(not_python, 1).startswith("not a Python process (py-spy: Failed")
    gone_away = ("Error: Failed to get process executable name. Check that the process is "
                 "running.\n\nCaused by:\n    0: No such file or directory (os error 2)\n")
    assert explain_failure(gone_away, 1) == (
        "py-spy could not take the stack: Failed to get process executable name. Check that "
        "the process is running. (No such file or directory (os error 2))")
    assert "exited with 1" in explain_failure("", 1)


@given(st.text())
def test_parse_dump_never_raises_on_text(text: str) -> None:
    assert isinstance(parse_dump(text), list)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["frames", "name", "filename", "short_filename", "line", "thread_name",
                         "active", "os_thread_id"]), inner, max_size=6),
    max_leaves=30)


@given(json_values)
def test_parse_dump_never_raises_on_json(value: object) -> None:
    for thread in parse_dump(json.dumps(value)):
        assert all(isinstance(f.function, str) for f in thread.frames)


@given(st.text())
def test_explain_failure_is_one_line(stderr: str) -> None:
    assert "\n" not in explain_failure(stderr, 1)


def test_stacks_file_is_ours_alone(tmp_path: Path) -> None:
    path = write_stacks_file(tmp_path, "first\n")
    write_stacks_file(tmp_path, "second\n")
    assert path.read_text() == "first\nsecond\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    planted = tmp_path / "planted"
    planted.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (planted / "stacks.txt").symlink_to(victim)
    with pytest.raises(OSError):
        write_stacks_file(planted, "x")
    assert victim.read_text() == "keep"


def test_a_py_spy_that_never_answers_is_killed_within_the_bound(tmp_path: Path) -> None:
    stuck = tmp_path / "py-spy"
    stuck.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(60)\n")
    stuck.chmod(0o755)
    targets = [Target(os.getpid(), "trainer", "python"), Target(1, "child", "init")]

    async def main() -> tuple[list[ProcessStack], set[int], float]:
        spies: set[int] = set()
        began = anyio.current_time()
        stacks = await capture(targets, py_spy=str(stuck), seconds=1.0, spies=spies)
        return stacks, spies, anyio.current_time() - began

    stacks, spies, took = anyio.run(main)
    assert 1.0 <= took < 4.0
    assert [s.error for s in stacks] == ["no stack within the 1 s bound of a capture"] * 2
    assert len(spies) == 2 and all(gone(pid) for pid in spies)
    missing = anyio.run(lambda: capture(targets[:1], py_spy=None, seconds=1.0))
    assert missing[0].error == "py-spy is not installed (pip install py-spy)"


def test_watchdog_deadlines() -> None:
    async def main() -> list[str]:
        fired: list[str] = []
        silenced = anyio.Event()

        def on_silence() -> None:
            fired.append(f"silence {silence.limit}")
            silenced.set()

        silence = SilenceWatchdog(0.05, startup=5.0)
        progress = ProgressWatchdog(0.05)
        async with anyio.create_task_group() as tg:
            tg.start_soon(silence.run, on_silence, lambda: fired.append("finish"))
            tg.start_soon(progress.run, lambda: fired.append("progress"))
            await anyio.sleep(0.1)  # within the start-up allowance; no step: no progress limit
            assert fired == []
            silence.first_step()
            progress.stepped()
            progress.stand_down()  # the last step: the progress watchdog gives way
            with anyio.fail_after(10):
                await silenced.wait()
            tg.cancel_scope.cancel()
        return fired

    assert anyio.run(main) == ["silence 0.05"]
