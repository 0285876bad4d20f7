"""``lorasup serve`` end to end: a real daemon on a temporary state directory, real runs.

Each run is its own ``lorasup start`` process supervising a small helper trainer (or the
builtin trainer); waits poll the API with deadlines.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorasup.supervisor.cli import app
from lorasup.supervisor.serve.jobspec import to_toml
from tests.serve_support import BAR_TRAINER, bar_job, events_of
from tests.support import child_env, gone, lorasup_argv, wait_for


@pytest.fixture
def daemon(daemons):
    """A real daemon on this test's state directory (see tests/conftest.py)."""
    return daemons


def cli(tmp: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """The real console script (a new Python process)."""
    return subprocess.run(lorasup_argv(*args, "--state-dir", str(tmp / "state")),
                          capture_output=True, text=True, cwd=tmp, env=child_env(),
                          timeout=timeout)


def invoke(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The same command in this process (typer's runner): no interpreter start-up."""
    result = CliRunner().invoke(app, [*args, "--state-dir", str(tmp / "state")])
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def sse(text: str) -> list[dict]:
    """Server-sent events: blocks of ``field: value`` lines."""
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines()
                      if not line.startswith(":"))
        out.append({"event": fields.get("event"), "id": fields.get("id"),
                    "data": json.loads(fields.get("data", "{}"))})
    return out


def test_queue_order_priority_and_the_cli(daemon, tmp_path: Path) -> None:
    d = daemon().start()
    first = d.submit_ok(bar_job(400, 0.05, name="blocker"))
    d.wait_step(first, 1)
    low = d.submit_ok(bar_job(2, name="low"))
    job_file = tmp_path / "high.toml"
    job_file.write_text(to_toml(bar_job(2)), encoding="utf-8")
    submitted = cli(tmp_path, "submit", str(job_file), "--name", "high", "--priority", "5")
    assert submitted.returncode == 0, submitted.stderr
    high = int(submitted.stdout.strip())
    high2 = d.submit_ok(bar_job(2, name="high2", priority=5))
    listing = invoke(tmp_path, "ps")
    assert listing.returncode == 0 and "blocker" in listing.stdout and "queued" in listing.stdout
    as_json = json.loads(invoke(tmp_path, "ps", "--json").stdout)
    running = [j for j in as_json if j["state"] == "running"]
    assert [j["id"] for j in running] == [first] and running[0]["pid"] > 0
    assert running[0]["slot"] == "cpu0" and running[0]["steps"] == 400
    assert d.job(first)["step"] >= 1
    assert d.http.post(f"/jobs/{first}/cancel").status_code == 200
    for job in (low, high, high2):
        assert d.wait(job)["state"] == "completed"
    starts = {j: d.job(j)["attempts"][0]["started"] for j in (low, high, high2)}
    assert sorted(starts, key=starts.get) == [high, high2, low]
    done = d.job(high)
    assert done["outcome"] == "completed" and done["step"] == 2 and done["loss"] == 0.5
    report = d.http.get(f"/jobs/{high}/report")
    assert wait_for(lambda: d.http.get(f"/jobs/{high}/report").status_code == 200)
    report = d.http.get(f"/jobs/{high}/report").json()
    assert report["outcome"] == "completed" and report["steps"]["last"] == 2
    events = sse(d.http.get(f"/jobs/{high}/events", params={"follow": "0"}).text)
    assert [e["event"] for e in events][-1] == "end"
    steps = [e for e in events if e["event"] == "step"]
    assert [(e["data"]["attempt"], e["data"]["step"], e["data"]["avg_loss"]) for e in steps
            ] == [(1, 1, 1.0), (1, 2, 0.5)]
    later = sse(d.http.get(f"/jobs/{high}/events", params={"follow": "0"},
                           headers={"Last-Event-ID": steps[0]["id"]}).text)
    # resumed after the event with that id: step 1 is not sent again, step 2 is (the
    # trainer's exit may be recorded before its last line is read, so not necessarily first)
    assert [e["data"]["step"] for e in later if e["event"] == "step"] == [2]
    assert "started" not in [e["event"] for e in later]
    shown = json.loads(invoke(tmp_path, "show", str(high)).stdout)
    assert shown["job"]["name"] == "high" and shown["report"]["outcome"] == "completed"
    log = subprocess.run(lorasup_argv("logs", str(high), "--events", "--state-dir",
                                      str(tmp_path / "state")), capture_output=True)
    kinds = [json.loads(line)["kind"] for line in log.stdout.splitlines()]
    assert kinds[0] == "started" and kinds[-1] == "outcome" and kinds.count("step") == 2


def test_two_gpu_slots_at_once_and_a_two_gpu_job_waits(daemon, tmp_path: Path) -> None:
    d = daemon().start("--gpus", "0,1")  # without NVML the list is trusted as given
    env_flag = ("--env", "CUDA_VISIBLE_DEVICES")
    a = d.submit_ok(bar_job(60, 0.05, *env_flag, name="a"))
    b = d.submit_ok(bar_job(60, 0.05, *env_flag, name="b"))
    both = d.submit_ok(bar_job(2, 0.02, *env_flag, name="both", gpus=2))
    d.wait_step(a, 1)
    d.wait_step(b, 1)
    assert d.job(both)["state"] == "queued"
    devices = {d.job(a)["devices"], d.job(b)["devices"]}
    assert devices == {"0", "1"}
    for job in (a, b):
        assert d.http.post(f"/jobs/{job}/cancel").status_code == 200
    done = d.wait(both)
    assert done["state"] == "completed"
    trainer_log = Path(done["run_dir"]) / "trainer.log"
    assert "CUDA_VISIBLE_DEVICES=0,1" in trainer_log.read_text()
    assert d.submit(bar_job(2, gpus=3)).json()["error"].startswith("invalid gpus")


def test_cancel_queued_and_running(daemon, tmp_path: Path) -> None:
    d = daemon().start()
    running = d.submit_ok(bar_job(200, 0.05))
    queued = d.submit_ok(bar_job(2))
    d.wait_step(running, 2)
    out = invoke(tmp_path, "cancel", str(queued))
    assert out.returncode == 0 and "cancelled" in out.stdout
    assert d.job(queued)["state"] == "cancelled" and d.job(queued)["attempts"] == []
    trainer = next(e["pid"] for e in events_of(d.job(running)["run_dir"])
                   if e["kind"] == "started")
    assert d.http.post(f"/jobs/{running}/cancel").json()["state"] == "running"
    done = d.wait(running, timeout=20)
    assert (done["state"], done["outcome"]) == ("cancelled", "cancelled")
    assert wait_for(lambda: gone(trainer), timeout=10)
    assert d.http.post(f"/jobs/{running}/cancel").status_code == 409
    assert d.http.post("/jobs/999/cancel").json() == {"error": "no job 999"}


def test_bad_and_duplicate_jobs_are_refused(daemon, tmp_path: Path) -> None:
    d = daemon().start()
    bad = tmp_path / "bad.toml"
    bad.write_text('trainer = "builtin"\n', encoding="utf-8")
    out = cli(tmp_path, "submit", str(bad))
    assert out.returncode == 2
    assert out.stderr.strip() == "lorasup: error: --steps is required for --trainer builtin"
    response = d.submit({"trainer": "nope", "steps": 1})
    assert response.status_code == 400 and "unknown trainer" in response.json()["error"]
    blocker = d.submit_ok(bar_job(200, 0.05))
    builtin = {"trainer": "builtin", "steps": 3, "options": {"output_dir": "lora_a"}}
    first = d.submit_ok(builtin)
    again = d.submit(builtin)
    assert again.status_code == 409
    assert f"job {first}" in again.json()["error"] and "lora_a" in again.json()["error"]
    explicit = bar_job(2, run_dir=str(tmp_path / "myrun"))
    d.submit_ok(explicit)
    assert "run directory" in d.submit(explicit).json()["error"]
    jobs = d.http.get("/jobs").json()["jobs"]
    assert len(jobs) == 3  # nothing of the refused ones was queued
    assert not list((d.state / "runs").glob("validate-*"))
    d.http.post(f"/jobs/{blocker}/cancel")
    d.http.post(f"/jobs/{first}/cancel")


def test_no_daemon_is_one_line_and_exit_2(tmp_path: Path) -> None:
    out = cli(tmp_path, "ps")
    assert out.returncode == 2
    assert out.stderr.startswith("lorasup: error: no lorasup daemon is listening on ")
    assert out.stderr.count("\n") == 1


def test_daemon_sigkill_then_restart_readopts_the_run(daemon, tmp_path: Path) -> None:
    d = daemon().start()
    job = d.submit_ok(bar_job(60, 0.05))
    running = d.wait_step(job, 3)
    supervisor = running["pid"]
    d.signal(signal.SIGKILL)
    d.wait_exit()
    assert not gone(supervisor)  # the run goes on without the daemon
    d.start()
    assert d.job(job)["pid"] == supervisor
    assert any(r.get("event") == "run_adopted" for r in d.log_records())
    done = d.wait(job, timeout=30)
    assert (done["state"], done["outcome"], done["attempt"]) == ("completed", "completed", 1)
    steps = [e["step"] for e in events_of(done["run_dir"]) if e["kind"] == "step"]
    assert steps == list(range(1, 61))


def test_killed_run_supervisor_is_requeued_and_completes(daemon, tmp_path: Path) -> None:
    d = daemon().start()
    marker = tmp_path / "starts"
    job = d.submit_ok(bar_job(40, 0.05, "--marker", str(marker), retries=1))
    running = d.wait_step(job, 2)
    trainer = int(marker.read_text().split()[0])
    os.kill(running["pid"], signal.SIGKILL)
    assert wait_for(lambda: gone(trainer), timeout=15)  # no trainer survives its supervisor
    done = d.wait(job, timeout=40)
    assert (done["state"], done["attempt"], done["retries_used"]) == ("completed", 2, 1)
    attempts = d.job(job)["attempts"]
    assert attempts[0]["outcome"] is None and "without an outcome" in attempts[0]["end_reason"]
    assert len(marker.read_text().split()) == 2
    # Without retries left, the same loss is final: lost.
    lost = d.submit_ok(bar_job(200, 0.05))
    os.kill(d.wait_step(lost, 1)["pid"], signal.SIGKILL)
    assert d.wait(lost)["state"] == "lost"


def test_tcp_listener_needs_the_bearer_token(daemon, tmp_path: Path) -> None:
    import socket

    import httpx

    token = tmp_path / "token"
    token.write_text("t0ken-" + "x" * 20 + "\n", encoding="utf-8")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    d = daemon("--listen", f"127.0.0.1:{port}", "--token-file", str(token)).start()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as tcp:
        refused = tcp.get("/jobs")
        assert refused.status_code == 401 and "bearer token" in refused.json()["error"]
        wrong = tcp.get("/jobs", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = tcp.get("/jobs", headers={"Authorization": f"Bearer t0ken-{'x' * 20}"})
        assert ok.status_code == 200 and ok.json() == {"jobs": []}
    assert d.http is not None and d.http.get("/healthz").json()["ok"] is True
    missing = cli(tmp_path, "serve", "--listen", "127.0.0.1:1")
    assert missing.returncode == 2 and "--token-file" in missing.stderr
    second = cli(tmp_path, "serve", "--gpus", "none")  # one daemon per state directory
    assert second.returncode == 2
    assert second.stderr.strip().startswith("lorasup: error: another lorasup serve is running")
    assert d.http.get("/healthz").json()["ok"] is True


def test_stalled_run_is_retried_then_fails_with_its_outcome(daemon, tmp_path: Path) -> None:
    d = daemon().start()
    marker = tmp_path / "starts"
    job = d.submit_ok(bar_job(20, 0.02, "--hang-after", "2", "--marker", str(marker),
                              retries=1, no_output_timeout=1, grace=0.5))
    done = d.wait(job, timeout=40)
    assert (done["state"], done["outcome"], done["attempt"]) == ("failed", "stalled", 2)
    attempts = d.job(job)["attempts"]
    assert [a["outcome"] for a in attempts] == ["stalled", "stalled"]
    assert attempts[1]["why"] == "retry after stalled"
    assert len(marker.read_text().split()) == 2
    # a deterministic failure is never retried
    # (the trainer ends after 2 of the 5 steps with exit code 3: a deterministic crash)
    failing = d.submit_ok(bar_job(5, 0.02, "--steps", "2", "--fail-code", "3", retries=3))
    failed = d.wait(failing)
    assert (failed["state"], failed["outcome"], failed["attempt"]) == (
        "failed", "trainer_failed", 1)


def test_gpus_auto_through_nvml_and_a_foreign_process_makes_jobs_wait(daemon, tmp_path: Path
                                                                      ) -> None:
    from tests.support import HELPERS

    nvml = tmp_path / "nvml.json"
    nvml.write_text(json.dumps({"count": 2, "holders": {"0": [4242]}}), encoding="utf-8")
    path = os.pathsep.join([str(HELPERS / "fake_nvml"), child_env()["PYTHONPATH"]])
    d = daemon(env={"FAKE_NVML": str(nvml), "PYTHONPATH": path}).start("--gpus", "auto")
    first = d.submit_ok(bar_job(200, 0.05, "--env", "CUDA_VISIBLE_DEVICES"))
    running = d.wait_step(first, 1)
    assert running["devices"] == "1"  # GPU 0 is held by a process that is not ours
    second = d.submit_ok(bar_job(2))
    assert wait_for(lambda: (d.job(second)["waiting"] or "").startswith(
        "GPU 0 is used by pid 4242"), timeout=10)
    assert "waits: GPU 0 is used by pid 4242" in invoke(tmp_path, "ps").stdout
    nvml.write_text(json.dumps({"count": 2, "holders": {}}), encoding="utf-8")
    done = d.wait(second, timeout=30)  # GPU 0 freed: the next scheduling pass starts it
    assert done["state"] == "completed" and done["waiting"] is None
    assert d.job(second)["attempts"][0]["devices"] == "0"
    d.http.post(f"/jobs/{first}/cancel")
    assert d.wait(first)["state"] == "cancelled"


def test_a_job_that_became_invalid_before_it_started_fails_as_usage(daemon, tmp_path: Path
                                                                    ) -> None:
    import sys

    d = daemon().start()
    blocker = d.submit_ok(bar_job(200, 0.05))
    program = tmp_path / "trainer"
    program.write_text(f"#!{sys.executable}\n" + BAR_TRAINER.read_text(), encoding="utf-8")
    program.chmod(0o755)
    victim = d.submit_ok({**bar_job(2), "command": [str(program), "--steps", "2"]})
    d.wait_step(blocker, 1)
    program.unlink()  # gone before the job's turn: `lorasup start` refuses it then
    d.http.post(f"/jobs/{blocker}/cancel")
    done = d.wait(victim)
    assert (done["state"], done["outcome"], done["attempt"]) == ("failed", "usage", 1)
    assert done["reason"] == f"trainer program not found: {program}"
