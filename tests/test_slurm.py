"""``lorasup sbatch`` against a real single-node SLURM (slurmctld + slurmd + munge).

The cluster is brought up once for this module by ``tests/cluster/slurm_up.py`` (a
generated slurm.conf: cons_tres, two fake GPUs, proctrack/linuxproc, requeues in seconds)
and stopped by ``slurm_down.py``. The tests run in one xdist worker (group "slurm", with
``--dist loadgroup``). They skip only where SLURM is not installed or not runnable (not
root); a cluster that is installed but does not come up is a failure.

Every attempt is a real ``lorasup start`` of the builtin trainer (resumable) or of a small
program, under SLURM's own signals: ``scontrol requeue``, ``scancel``, and the time warning
``--signal=B:USR1`` simulated with ``scancel --signal=USR1 --batch``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "tests" / "cluster"
pytestmark = pytest.mark.xdist_group("slurm")

#: a job's end, from submission (the builtin trainer's 60 steps take about a second)
JOB_TIMEOUT = 45.0


def _tool(name: str) -> str | None:
    for folder in (None, "/usr/sbin", "/sbin"):
        found = shutil.which(name, path=folder)
        if found:
            return found
    return None


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A running single-node cluster; the environment its clients need."""
    missing = [n for n in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "squeue")
               if _tool(n) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing; "
                    "apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root to start jobs; run the SLURM tests as root")
    root = tmp_path_factory.mktemp("slurm")
    up = subprocess.run([sys.executable, str(CLUSTER / "slurm_up.py"), str(root)],
                        capture_output=True, text=True, timeout=60)
    try:
        if up.returncode != 0:
            pytest.fail(f"the SLURM cluster did not come up: {up.stderr[-2000:]}")
        env = dict(line.split("=", 1) for line in up.stdout.split())
        env["_ROOT"] = str(root)
        yield env
    finally:
        subprocess.run([sys.executable, str(CLUSTER / "slurm_down.py"), str(root)],
                       timeout=60, check=False)


def _env(slurm: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **{k: v for k, v in slurm.items() if not k.startswith("_")}}


def _run(slurm: dict[str, str], *argv: str, cwd: Path | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), env=_env(slurm), cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def _wait(what: str, check: Callable[[], Any], timeout: float = JOB_TIMEOUT) -> Any:
    """Poll ``check`` until it answers something true (the cluster has no event stream)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = check()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def submit(slurm: dict[str, str], folder: Path, job: str, *args: str) -> str:
    (folder / "job.toml").write_text(job, encoding="utf-8")
    done = _run(slurm, sys.executable, "-m", "lorasup", "sbatch", "job.toml",
                "--logs-dir", "logs", *args, cwd=folder)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("SLURM job ", 1)[1].split(";", 1)[0]


def queue_state(slurm: dict[str, str], job_id: str) -> str | None:
    """The job's state while squeue knows it; None once it is gone (MinJobAge)."""
    done = _run(slurm, "squeue", "--json", "-j", job_id)
    if done.returncode != 0:
        return None
    for job in json.loads(done.stdout).get("jobs", []):
        if str(job.get("job_id")) == job_id:
            return str(job.get("job_state"))
    return None


def final_state(slurm: dict[str, str], job_id: str) -> str:
    """The job's end state from the jobcomp log (accounting is off in the test cluster),
    once SLURM has forgotten the job; the last line for the job counts (a requeue writes
    one per attempt)."""
    log = Path(slurm["_ROOT"]) / "log" / "jobcomp.txt"

    def ended() -> str | None:
        if queue_state(slurm, job_id) is not None or not log.exists():
            return None
        states = [part.split("=", 1)[1] for line in log.read_text().splitlines()
                  if f"JobId={job_id} " in line for part in line.split()
                  if part.startswith("JobState=")]
        return states[-1] if states else None

    return _wait(f"SLURM job {job_id} to end", ended)


def events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def steps_of(run_dir: Path) -> list[int]:
    return [e["step"] for e in events(run_dir) if e["kind"] == "step"]


def outcome_of(run_dir: Path) -> dict[str, Any]:
    return next(e for e in events(run_dir) if e["kind"] == "outcome")


def attempt(folder: Path, job_id: str, restart: int) -> Path:
    return folder / "logs" / f"slurm-{job_id}-{restart}"


def wait_step(run_dir: Path, step: int) -> None:
    def reached() -> bool:
        try:
            return any(s >= step for s in steps_of(run_dir))
        except (OSError, ValueError):  # not there yet, or a line being written
            return False

    _wait(f"step {step} in {run_dir}", reached)


def status(slurm: dict[str, str], folder: Path, job_id: str) -> dict[str, Any]:
    done = _run(slurm, sys.executable, "-m", "lorasup", "status", "--slurm", job_id,
                "--logs-dir", "logs", "--json", cwd=folder)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def no_process_left(folder: Path) -> list[str]:
    """Command lines of live processes that mention the test's folder."""
    left = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if str(folder) in cmdline and state != "Z":
            left.append(cmdline)
    return left


BUILTIN = 'steps = {steps}\ngrace = 20\ncommand = ["--batch-size", "64"]\n'


def test_a_job_completes_its_exact_steps(slurm: dict[str, str], tmp_path: Path) -> None:
    job_id = submit(slurm, tmp_path, BUILTIN.format(steps=20))
    assert final_state(slurm, job_id) == "COMPLETED"
    run = attempt(tmp_path, job_id, 0)
    assert steps_of(run) == list(range(1, 21))
    assert outcome_of(run)["outcome"] == "completed"
    assert not attempt(tmp_path, job_id, 1).exists()


def test_an_operator_requeue_resumes_with_every_step_run_once(
        slurm: dict[str, str], tmp_path: Path) -> None:
    job_id = submit(slurm, tmp_path, BUILTIN.format(steps=60))
    wait_step(attempt(tmp_path, job_id, 0), 10)
    assert _run(slurm, "scontrol", "requeue", job_id).returncode == 0
    assert final_state(slurm, job_id) == "COMPLETED"
    first, second = attempt(tmp_path, job_id, 0), attempt(tmp_path, job_id, 1)
    assert outcome_of(first)["outcome"] == "interrupted"
    assert outcome_of(second)["outcome"] == "completed"
    # each step once, in order, across the attempts: exactly 60 in total
    assert steps_of(first) + steps_of(second) == list(range(1, 61))
    assert 10 <= steps_of(first)[-1] < 60
    resumed = json.loads((second / "resume.json").read_text())
    assert resumed["target_step"] == 60 and resumed["saved_step"] == steps_of(first)[-1]
    for run in (first, second):  # one report per attempt
        assert json.loads((run / "report.json").read_text())["outcome"] in (
            "interrupted", "completed")
    summary = status(slurm, tmp_path, job_id)  # the summary of all attempts
    assert [a["outcome"] for a in summary["attempts"]] == ["interrupted", "completed"]
    assert summary["last_step"] == 60 and summary["outcome"] == "completed"


def test_scancel_is_a_cancel_never_requeued_and_nothing_left(
        slurm: dict[str, str], tmp_path: Path) -> None:
    job_id = submit(slurm, tmp_path, BUILTIN.format(steps=100000))
    run = attempt(tmp_path, job_id, 0)
    wait_step(run, 5)
    assert _run(slurm, "scancel", job_id).returncode == 0
    assert final_state(slurm, job_id) == "CANCELLED"
    outcome = outcome_of(run)
    assert outcome["outcome"] == "interrupted" and outcome["exit_code"] == 143
    # the trainer saved on the cancel's SIGTERM, within the grace (no SIGKILL)
    assert not any(e["kind"] == "signal" and e["signal"] == "SIGKILL" for e in events(run))
    assert (tmp_path / "lora_output" / "lorasup_lora-state.npz").exists()
    assert not attempt(tmp_path, job_id, 1).exists()
    assert no_process_left(tmp_path) == []


def test_the_time_warning_preempts_saves_requeues_and_completes(
        slurm: dict[str, str], tmp_path: Path) -> None:
    job_id = submit(slurm, tmp_path, BUILTIN.format(steps=60), "--warn", "30",
                    "--", "--time=5")
    first = attempt(tmp_path, job_id, 0)
    wait_step(first, 10)
    # what --signal=B:USR1@30 sends 30 s before the limit: SIGUSR1 to the batch shell only
    warned = _run(slurm, "scancel", "--signal=USR1", "--batch", job_id)
    assert warned.returncode == 0, warned.stderr
    assert final_state(slurm, job_id) == "COMPLETED"
    outcome = outcome_of(first)
    assert outcome["outcome"] == "preempted" and outcome["exit_code"] == 6
    assert any(e["kind"] == "checkpoint" for e in events(first))  # the final save
    second = attempt(tmp_path, job_id, 1)
    assert outcome_of(second)["outcome"] == "completed"
    assert steps_of(first) + steps_of(second) == list(range(1, 61))
    assert "requeueing (restart 1 of 3)" in (tmp_path / "logs" / f"slurm-{job_id}.out"
                                              ).read_text()


def test_a_trainer_failure_is_not_requeued(slurm: dict[str, str], tmp_path: Path) -> None:
    job = ('trainer = "command"\nsteps = 5\ncommand = ["' + sys.executable
           + '", "-c", "import sys; print(\'boom\'); sys.exit(1)"]\n')
    job_id = submit(slurm, tmp_path, job)
    assert final_state(slurm, job_id) == "FAILED"
    assert outcome_of(attempt(tmp_path, job_id, 0))["outcome"] == "trainer_failed"
    assert not attempt(tmp_path, job_id, 1).exists()


def test_the_restart_cap_holds(slurm: dict[str, str], tmp_path: Path) -> None:
    job = ('trainer = "command"\nsteps = 5\nno_output_timeout = 1\ngrace = 2\ncommand = ["'
           + sys.executable + '", "-c", "import time; time.sleep(60)"]\n')
    job_id = submit(slurm, tmp_path, job, "--max-restarts", "1")
    assert final_state(slurm, job_id) == "FAILED"
    runs = [attempt(tmp_path, job_id, n) for n in range(2)]
    assert [outcome_of(r)["outcome"] for r in runs] == ["stalled", "stalled"]
    assert not attempt(tmp_path, job_id, 2).exists()
    log = (tmp_path / "logs" / f"slurm-{job_id}.out").read_text()
    assert "not requeued, 1 of 1 restarts used" in log
