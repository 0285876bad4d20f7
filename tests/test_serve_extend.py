"""``POST /jobs/<id>/extend`` ("add N steps"): a new job continues a finished one from its
newest save, by the resume rule the daemon's retries use. Real daemon, real trainers: the
builtin trainer saves its state and continues from it."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from lorasup.supervisor.cli import app
from tests.serve_support import bar_job, events_of


def _steps(run_dir: str) -> list[int]:
    return [e["step"] for e in events_of(run_dir) if e["kind"] == "step"]


def test_a_completed_job_continues_by_n_steps_each_step_once(daemons, tmp_path: Path) -> None:
    d = daemons().start()
    first = d.submit_ok({"trainer": "builtin", "steps": 20, "grace": 10,
                         "options": {"output_dir": "lora_out"}}, name="demo")
    assert d.wait(first, timeout=90)["state"] == "completed"
    for bad in ({"steps": 0}, {"steps": True}, {"steps": "5"}, {}, {"steps": 10**9}):
        refused = d.http.post(f"/jobs/{first}/extend", json=bad)
        assert refused.status_code == 400 and "invalid steps" in refused.json()["error"], bad
    answer = d.http.post(f"/jobs/{first}/extend", json={"steps": 15})
    assert answer.status_code == 201, answer.text
    new = answer.json()
    assert new["id"] != first and new["name"] == "demo+15" and new["steps"] == 35
    assert new["state"] in ("queued", "running")
    # the same job again while its continuation is queued or running: one output folder
    again = d.http.post(f"/jobs/{first}/extend", json={"steps": 5})
    assert again.status_code == 409 and "lora_out" in again.json()["error"]
    done = d.wait(new["id"], timeout=90)
    assert (done["state"], done["step"], done["steps"]) == ("completed", 35, 35)
    run_dir = d.job(new["id"])["run_dir"]
    assert [e["step"] for e in events_of(run_dir) if e["kind"] == "resumed"] == [20]
    assert _steps(run_dir) == list(range(21, 36))  # each step once, none again
    assert _steps(d.job(first)["run_dir"]) == list(range(1, 21))
    report = d.http.get(f"/jobs/{new['id']}/report").json()
    assert report["outcome"] == "completed"
    assert report["steps"]["resumed_from"] == 20
    assert (report["steps"]["first"], report["steps"]["last"]) == (21, 35)
    assert report["series"]["step"] == list(range(21, 36))
    # the CLI: the continuation continued once more, through the same route
    result = CliRunner().invoke(app, ["extend", str(new["id"]), "--steps", "5",
                                      "--state-dir", str(tmp_path / "state")])
    assert result.exit_code == 0, result.output
    third = max(j["id"] for j in d.http.get("/jobs").json()["jobs"])
    assert result.stdout.strip() == (f"job {third} (demo+15+5) queued: continues job "
                                     f"{new['id']} to 40 steps")
    done = d.wait(third, timeout=90)
    assert (done["state"], done["step"]) == ("completed", 40)
    assert _steps(d.job(third)["run_dir"]) == list(range(36, 41))


def test_jobs_that_cannot_continue_are_refused_saying_why(daemons, tmp_path: Path) -> None:
    d = daemons().start()
    plain = d.submit_ok(bar_job(2))
    assert d.wait(plain)["state"] == "completed"
    refused = d.http.post(f"/jobs/{plain}/extend", json={"steps": 5})
    assert refused.status_code == 409
    assert refused.json()["error"] == (f"job {plain} cannot be continued: the command trainer "
                                       "cannot resume from a checkpoint")
    result = CliRunner().invoke(app, ["extend", str(plain), "--steps", "5",
                                      "--state-dir", str(tmp_path / "state")])
    assert result.exit_code != 0
    assert "the command trainer cannot resume from a checkpoint" in result.stderr
    running = d.submit_ok(bar_job(600, 0.05))
    d.wait_step(running, 1)
    refused = d.http.post(f"/jobs/{running}/extend", json={"steps": 5})
    assert refused.status_code == 409 and refused.json()["error"] == (
        f"job {running} is running: only a completed, cancelled or preempted job can be "
        "continued")
    d.http.post(f"/jobs/{running}/cancel")
    failing = d.submit_ok(bar_job(5, 0.02, "--steps", "2", "--fail-code", "3"))
    assert d.wait(failing)["state"] == "failed"
    refused = d.http.post(f"/jobs/{failing}/extend", json={"steps": 5})
    assert refused.status_code == 409 and "is failed (trainer_failed)" in refused.json()["error"]
    assert d.http.post("/jobs/999/extend", json={"steps": 5}).status_code == 404
    assert len(d.http.get("/jobs").json()["jobs"]) == 3  # nothing was queued
