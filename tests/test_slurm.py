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
from hypothesis import given
from hypothesis import strategies as st

from tests.support import events, outcome_of, steps_of

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


#: states a job ends in (jobcomp and squeue spell them alike)
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def final_state(slurm: dict[str, str], job_id: str) -> str:
    """The job's end state from the jobcomp log (accounting is off in the test cluster):
    its last line for the job (a requeue writes one per attempt) says it ended, and squeue
    no longer shows it pending or running."""
    log = Path(slurm["_ROOT"]) / "log" / "jobcomp.txt"

    def ended() -> str | None:
        if not log.exists():
            return None
        states = [part.split("=", 1)[1] for line in log.read_text().splitlines()
                  if f"JobId={job_id} " in line for part in line.split()
                  if part.startswith("JobState=")]
        if not states or states[-1] not in ENDED:
            return None
        in_queue = queue_state(slurm, job_id)
        return states[-1] if in_queue is None or in_queue in ENDED else None

    return _wait(f"SLURM job {job_id} to end", ended)


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
    # A cap of 0 requeues: a stalled run would be requeued (see the time-warning test for a
    # requeue after exit 6; stalled is 4, in the same list) but the cap is used up.
    job_id = submit(slurm, tmp_path, job, "--max-restarts", "0")
    assert final_state(slurm, job_id) == "FAILED"
    outcome = outcome_of(attempt(tmp_path, job_id, 0))
    assert outcome["outcome"] == "stalled" and outcome["exit_code"] == 4
    assert not attempt(tmp_path, job_id, 1).exists()
    log = (tmp_path / "logs" / f"slurm-{job_id}.out").read_text()
    assert "exit 4: not requeued, 0 of 0 restarts used" in log


# -- without a cluster: the script, the options, the time parser ---------------------------

def test_the_shipped_script_is_the_generated_one() -> None:
    from lorasup.supervisor.cluster.slurm import shipped

    assert (REPO / "systemd" / "slurm" / "lorasup.sbatch").read_text() == shipped()


def test_requeue_codes_are_the_engines() -> None:
    from lorasup.supervisor.cluster.slurm import REQUEUE_EXITS
    from lorasup.supervisor.outcome import EXIT_CODES

    assert {name: EXIT_CODES[name] for name in REQUEUE_EXITS} == REQUEUE_EXITS
    # a cancel (143), a completed run, a trainer's failure, usage, divergence: never
    assert not {0, 1, 2, 5, 130, 143} & set(REQUEUE_EXITS.values())


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_the_scripts_are_valid_bash(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text("steps = 3\n")
    printed = subprocess.run([sys.executable, "-m", "lorasup", "sbatch", "job.toml", "--print",
                              "--warn", "60", "--max-restarts", "2", "--", "--time=0-1"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    script = printed.stdout
    assert "#SBATCH --signal=B:USR1@60" in script and "MAX_RESTARTS=2" in script
    assert "#SBATCH --requeue" in script and "#SBATCH --open-mode=append" in script
    assert f"JOB={tmp_path / 'job.toml'}" in script
    for text in (script, (REPO / "systemd" / "slurm" / "lorasup.sbatch").read_text()):
        checked = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True,
                                 timeout=30)
        assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--warn", "300", "--", "--time=5"], "--warn 300 is not shorter than the job's time "
                                          "limit (300 s)"),
    (["--", "-t", "1:00"], "--warn 300 is not shorter than the job's time limit (60 s)"),
    (["--", "--signal=USR2@60"], "--signal is set by lorasup sbatch"),
    (["--", "--no-requeue"], "--no-requeue is set by lorasup sbatch"),
    (["--", "--time=soon"], "invalid --time 'soon'"),
    (["--warn", "0"], "--warn must be at least 1 second"),
])
def test_sbatch_refuses_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "job.toml").write_text("steps = 3\n")
    done = subprocess.run([sys.executable, "-m", "lorasup", "sbatch", "job.toml", "--print",
                           *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


def test_sbatch_refuses_a_job_that_names_its_run_dir(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text('steps = 3\nrun_dir = "x"\n')
    done = subprocess.run([sys.executable, "-m", "lorasup", "sbatch", "job.toml", "--print"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "run_dir is set by lorasup sbatch" in done.stderr


def test_time_limits_in_every_form() -> None:
    from lorasup.supervisor.cluster.slurm import parse_time, time_limit

    assert parse_time("90") == 5400 and parse_time("1:30") == 90
    assert parse_time("1:00:01") == 3601 and parse_time("2-3") == (2 * 24 + 3) * 3600
    assert parse_time("1-0:5") == 86400 + 300 and parse_time("1-0:0:7") == 86407
    assert parse_time("UNLIMITED") is None and parse_time("infinite") is None
    assert time_limit(["--gres=gpu:1", "-t", "5"]) == 300
    assert time_limit(["-t10"]) == 600 and time_limit(["--time", "1:0:0"]) == 3600
    assert time_limit(["--gres=gpu:1"]) is None


@given(st.integers(0, 400), st.integers(0, 23), st.integers(0, 59), st.integers(0, 59),
       st.sampled_from(["M", "M:S", "H:M:S", "D-H", "D-H:M", "D-H:M:S"]))
def test_time_parser_agrees_with_slurms_forms(d: int, h: int, m: int, s: int,
                                              form: str) -> None:
    from lorasup.supervisor.cluster.slurm import parse_time

    text, expected = {
        "M": (f"{m}", m * 60),
        "M:S": (f"{m}:{s}", m * 60 + s),
        "H:M:S": (f"{h}:{m}:{s}", h * 3600 + m * 60 + s),
        "D-H": (f"{d}-{h}", d * 86400 + h * 3600),
        "D-H:M": (f"{d}-{h}:{m}", d * 86400 + h * 3600 + m * 60),
        "D-H:M:S": (f"{d}-{h}:{m}:{s}", d * 86400 + h * 3600 + m * 60 + s),
    }[form]
    assert parse_time(text) == expected


@given(st.text(max_size=20))
def test_time_parser_never_raises_anything_but_its_error(text: str) -> None:
    from lorasup.supervisor.cluster.slurm import SlurmError, parse_time

    try:
        value = parse_time(text)
    except SlurmError as exc:
        assert "invalid --time" in str(exc)
    else:
        assert value is None or value >= 0


def test_status_reads_the_attempts_without_the_scheduler(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}  # no cluster to ask
    run = subprocess.run([sys.executable, "-m", "lorasup", "start", "--steps", "3",
                          "--run-dir", "logs/slurm-99-0", "--log-format", "json"],
                         cwd=tmp_path, env=env, capture_output=True, timeout=120)
    assert run.returncode == 0
    done = subprocess.run([sys.executable, "-m", "lorasup", "status", "--slurm", "99",
                           "--logs-dir", "logs", "--json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["outcome"] == "completed" and data["last_step"] == 3
    assert [(a["restart"], a["first_step"], a["last_step"]) for a in data["attempts"]] == [
        (0, 1, 3)]
    for bad, message in (("98", "no SLURM job 98"), ("x1", "a SLURM job id is a number")):
        refused = subprocess.run([sys.executable, "-m", "lorasup", "status", "--slurm", bad,
                                  "--logs-dir", "logs"], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and message in refused.stderr
