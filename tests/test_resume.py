"""``lorasup start --resume-from RUN`` and SIGUSR1 (time nearly up → ``preempted``).

Real ``lorasup start`` processes of the builtin trainer (it saves its state on every
graceful stop), real signals: an attempt cut off at any step continues in the next one, and
the job ends at exactly its requested total, each step run once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import events, outcome_of, steps_of

PREEMPTED_EXIT = 6
#: a builtin step with 64 images per batch takes a few ms: a stop lands mid-run
BUILTIN_ARGS = ("--", "--batch-size", "64")


def lorasup(cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "lorasup", "start", "--log-format", "json",
                             *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def stop_at(process: subprocess.Popen[str], run_dir: Path, step: int, sig: signal.Signals
            ) -> int:
    """Send ``sig`` once the run recorded ``step``; the exit code."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if any(s >= step for s in steps_of(run_dir)):
                break
        except (OSError, ValueError):
            pass
        if process.poll() is not None:
            raise AssertionError(f"ended before step {step}: {process.communicate()}")
        time.sleep(0.02)
    process.send_signal(sig)
    process.communicate(timeout=60)
    return process.returncode


def test_sigusr1_preempts_with_the_final_save_and_the_resume_ends_at_n(tmp_path: Path) -> None:
    first, second, third = (tmp_path / "runs" / name for name in ("a0", "a1", "a2"))
    code = stop_at(lorasup(tmp_path, "--steps", "150", "--run-dir", str(first),
                           *BUILTIN_ARGS), first, 10, signal.SIGUSR1)
    assert code == PREEMPTED_EXIT
    outcome = outcome_of(first)
    assert outcome["outcome"] == "preempted" and outcome["exit_code"] == PREEMPTED_EXIT
    saved = [e["step"] for e in events(first) if e["kind"] == "checkpoint"]
    assert saved and saved[-1] == steps_of(first)[-1] < 150  # saved where it stopped
    assert json.loads((first / "report.json").read_text())["outcome"] == "preempted"

    # cut again, by SIGTERM this time, then resumed by run id under --logs-dir
    code = stop_at(lorasup(tmp_path, "--steps", "150", "--run-dir", str(second),
                           "--resume-from", str(first), *BUILTIN_ARGS),
                   second, saved[-1] + 10, signal.SIGTERM)
    assert code == 143
    marker = json.loads((second / "resume.json").read_text())
    assert marker["target_step"] == 150 and marker["saved_step"] == saved[-1]
    assert not marker["fresh"]
    done = lorasup(tmp_path, "--steps", "150", "--run-dir", str(third), "--logs-dir",
                   str(tmp_path / "runs"), "--resume-from", "a1", *BUILTIN_ARGS)
    done.communicate(timeout=120)
    assert done.returncode == 0
    assert outcome_of(third)["outcome"] == "completed"
    # every step once, in order, 150 in total however often it was cut
    assert steps_of(first) + steps_of(second) + steps_of(third) == list(range(1, 151))
    assert any(e["kind"] == "resumed" for e in events(third))


def wait_holding(pid: int, sig: signal.Signals) -> None:
    """Until the process catches ``sig`` (``lorasup start`` holds it from its first line)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(next(line for line in status.splitlines()
                          if line.startswith("SigCgt:")).split()[1], 16)
        if caught & (1 << (int(sig) - 1)):
            return
        time.sleep(0.005)
    raise AssertionError(f"{pid} never caught {sig.name}")


def test_a_resume_of_a_run_that_saved_nothing_starts_fresh(tmp_path: Path) -> None:
    first, second = tmp_path / "a0", tmp_path / "a1"
    # a stale state of another run in the output folder must not be continued
    other = lorasup(tmp_path, "--steps", "3", "--run-dir", str(tmp_path / "other"))
    other.communicate(timeout=60)
    assert other.returncode == 0
    # a run stopped before its trainer started: signalled while lorasup prepares it
    process = lorasup(tmp_path, "--steps", "30", "--run-dir", str(first), *BUILTIN_ARGS)
    wait_holding(process.pid, signal.SIGUSR1)
    process.send_signal(signal.SIGUSR1)
    process.communicate(timeout=60)
    assert process.returncode == PREEMPTED_EXIT
    assert steps_of(first) == []
    resumed = lorasup(tmp_path, "--steps", "30", "--run-dir", str(second),
                      "--resume-from", str(first), *BUILTIN_ARGS)
    resumed.communicate(timeout=120)
    assert resumed.returncode == 0
    assert steps_of(second) == list(range(1, 31))
    assert json.loads((second / "resume.json").read_text())["fresh"] is True


def test_nothing_to_resume_is_a_usage_error(tmp_path: Path) -> None:
    done = lorasup(tmp_path, "--steps", "5", "--run-dir", str(tmp_path / "a0"))
    done.communicate(timeout=60)
    assert done.returncode == 0
    again = lorasup(tmp_path, "--steps", "5", "--run-dir", str(tmp_path / "a1"),
                    "--resume-from", str(tmp_path / "a0"))
    _out, err = again.communicate(timeout=60)
    assert again.returncode == 2 and "completed the job (5 steps): nothing to resume" in err
    assert not (tmp_path / "a1").exists()
    missing = lorasup(tmp_path, "--steps", "5", "--resume-from", "nope",
                      "--logs-dir", str(tmp_path))
    _out, err = missing.communicate(timeout=60)
    assert missing.returncode == 2 and err.startswith("lorasup: error: --resume-from: no run")


def test_a_second_sigusr1_is_the_same_request(tmp_path: Path) -> None:
    run = tmp_path / "a0"
    process = lorasup(tmp_path, "--steps", "100000", "--run-dir", str(run), "--grace", "30",
                      *BUILTIN_ARGS)
    deadline = time.monotonic() + 60
    while not any(e["kind"] == "step" for e in _safe_events(run)):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.02)
    process.send_signal(signal.SIGUSR1)
    process.send_signal(signal.SIGUSR1)
    process.communicate(timeout=60)
    assert process.returncode == PREEMPTED_EXIT
    sent = [e["signal"] for e in events(run) if e["kind"] == "signal"]
    assert "SIGKILL" not in sent  # the grace went on: the trainer saved and exited


def _safe_events(run: Path) -> list[dict[str, Any]]:
    try:
        return events(run)
    except (OSError, ValueError):
        return []


def test_the_builtin_state_step_is_read_without_numpy(tmp_path: Path) -> None:
    from lorasup.trainers.builtin.inputs import StateError, saved_state_step

    done = lorasup(tmp_path, "--steps", "7", "--run-dir", str(tmp_path / "a0"))
    done.communicate(timeout=60)
    state = tmp_path / "lora_output" / "lorasup_lora-state.npz"
    assert saved_state_step(state) == 7
    broken = tmp_path / "broken.npz"
    broken.write_bytes(state.read_bytes()[:100])
    try:
        saved_state_step(broken)
    except StateError as exc:
        assert str(broken) in str(exc)
    else:
        raise AssertionError("a truncated state was read")
    assert os.path.getsize(state) > 100


# -- the readers, on any input --------------------------------------------------------------

_LINES = st.one_of(
    st.binary(max_size=80),
    st.builds(lambda k, n: f'{{"t":0.1,"kind":"step","step":{n}}}'.encode() if k else
              json.dumps({"kind": "checkpoint", "path": "x", "step": n}).encode(),
              st.booleans(), st.integers(-5, 10**6)),
    st.builds(lambda kind, v: json.dumps({"kind": kind, "step": v, "steps_requested": v,
                                          "outcome": v}).encode(),
              st.sampled_from(["started", "resumed", "checkpoint", "outcome", "step"]),
              st.one_of(st.integers(-3, 10**9), st.text(max_size=5), st.none(),
                        st.booleans(), st.floats(allow_nan=True))))


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_LINES, max_size=12))
def test_the_record_reader_takes_any_events_file(tmp_path: Path, lines: list[bytes]) -> None:
    from lorasup.supervisor.resume import read_record

    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "events.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    record = read_record(run)  # a started record without a live supervisor: never refused
    assert record.saved_step >= 0 and record.last_step >= 0
    assert record.target_step is None or record.target_step >= 0
    assert record.outcome is None or isinstance(record.outcome, str)


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_the_state_step_reader_refuses_any_damaged_metadata(tmp_path: Path,
                                                            meta: bytes) -> None:
    import zipfile

    from lorasup.trainers.builtin.inputs import StateError, saved_state_step

    path = tmp_path / "state.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("meta.npy", meta)
    try:
        step = saved_state_step(path)
    except StateError as exc:
        assert str(path) in str(exc)
    else:
        assert isinstance(step, int) and step >= 0
