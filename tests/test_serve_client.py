"""The daemon's client (issue 17, items 7-14): ``submit -- CMD`` with flags, every mistake
of a job at once, ``--until-empty --idle``, GPU jobs on a daemon without GPUs, webhook
events, and ``ps``/``show``/``logs`` with and without a daemon, on a terminal and not.

Real daemons (tests/serve_support.py), real ``lorasup`` processes, a pty for the terminal.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

from tests.serve_support import BAR_TRAINER, bar_job
from tests.support import child_env, lorasup_argv, wait_for


def lorasup(tmp: Path, command: str, *args: str, cwd: Path | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``lorasup COMMAND --state-dir ... ARGS`` as its own process (the state directory
    before ARGS: whatever follows ``--`` belongs to the trainer)."""
    return subprocess.run(lorasup_argv(command, "--state-dir", str(tmp / "state"), *args),
                          capture_output=True, text=True, cwd=cwd or tmp, env=child_env(),
                          timeout=timeout)


# -- 10: submit -- CMD, with the job's options as flags ---------------------------------------

def test_submit_a_command_with_flags_runs_in_the_submitters_folder(daemons, tmp_path: Path
                                                                    ) -> None:
    d = daemons().start()
    work = tmp_path / "work"
    work.mkdir()
    # a relative path: it only resolves in the submitter's folder
    (work / "train.py").write_text(BAR_TRAINER.read_text(encoding="utf-8"), encoding="utf-8")
    out = lorasup(tmp_path, "submit", "--trainer", "command", "--steps", "3",
                  "--name", "mine", "--priority", "5", "--no-output-timeout", "30",
                  "--grace", "2", "--", sys.executable, "train.py", "--steps", "3",
                  "--step-seconds", "0.02", cwd=work)
    assert out.returncode == 0, out.stderr
    job = int(out.stdout.strip())
    done = d.wait(job)
    assert (done["state"], done["outcome"], done["name"], done["priority"]) == (
        "completed", "completed", "mine", 5)
    assert done["cwd"] == str(work) and done["step"] == 3
    assert done["job"]["trainer_argv"][1:3] == ["train.py", "--steps"]
    assert done["job"]["grace"] == 2 and done["job"]["no_output_timeout"] == 30
    # neither a job file nor a command: one line, exit 2
    bare = lorasup(tmp_path, "submit", "--steps", "3")
    assert bare.returncode == 2 and "after `--`" in bare.stderr


def test_a_submit_without_cwd_is_refused(daemons, tmp_path: Path) -> None:
    d = daemons().start()
    assert d.http is not None
    response = d.http.post("/jobs", json={"job": bar_job(2)})
    assert response.status_code == 400
    assert response.json()["error"].startswith("missing cwd")
    assert d.http.get("/jobs").json()["jobs"] == []


# -- 11: every mistake of a job file at once ---------------------------------------------------

def test_a_job_file_with_several_mistakes_names_each_with_its_line(daemons, tmp_path: Path
                                                                   ) -> None:
    daemons().start()
    job = tmp_path / "job.toml"
    job.write_text('trainer = "command"\ncommand = ["true"]\nsteps = -3\n'
                   'grace = "soon"\npriority = 10000000\nstepz = 4\n', encoding="utf-8")
    out = lorasup(tmp_path, "submit", str(job))
    assert out.returncode == 2, out
    lines = out.stderr.splitlines()
    assert lines[0] == "lorasup: error: 4 mistakes in the job:", out.stderr
    found = {line.split(":")[0].strip(): line for line in lines[1:]}
    assert "line 3" in found["invalid steps"] and "line 4" in found["invalid grace"]
    assert "line 5" in found["invalid priority"]
    assert any("'stepz'" in line and "line 6" in line for line in lines[1:]), lines
    assert "Traceback" not in out.stderr


# -- 12: --until-empty waits --idle seconds -----------------------------------------------------

def test_until_empty_waits_for_the_first_submit_then_exits_after_idle(daemons, tmp_path: Path
                                                                      ) -> None:
    d = daemons("--until-empty", "--idle", "3").start()
    job = d.submit_ok(bar_job(2))  # after the start, as `serve --until-empty & submit` does
    assert d.wait(job)["state"] == "completed"
    ended = time.monotonic()
    assert d.proc is not None and d.proc.poll() is None  # not at once: --idle first
    assert d.wait_exit(timeout=30) == 0
    assert time.monotonic() - ended >= 2  # ~3 s after the job's end, less our polling
    idle = [r for r in d.log_records() if r.get("event") == "queue_empty"]
    assert idle and idle[0]["idle_s"] == 3


# -- 13: a GPU job on a daemon without GPU slots ------------------------------------------------

def test_a_gpu_job_is_refused_by_a_daemon_without_gpus(daemons, tmp_path: Path) -> None:
    cpu = daemons().start()  # --gpus none
    refused = cpu.submit(bar_job(2, gpus=1))
    assert refused.status_code == 400 and "no GPU slots" in refused.json()["error"]
    cpu.signal(__import__("signal").SIGTERM)
    assert cpu.wait_exit() == 0
    # auto finding no GPU (no NVML here): refused as well, not run without a word
    auto = daemons().start("--gpus", "auto")
    refused = auto.submit(bar_job(2, gpus=1))
    assert refused.status_code == 400 and "found none" in refused.json()["error"]
    auto.signal(__import__("signal").SIGTERM)
    assert auto.wait_exit() == 0
    # devices named explicitly: used as given, without NVML
    named = daemons().start("--gpus", "3")
    job = named.submit_ok(bar_job(2, 0.02, "--env", "CUDA_VISIBLE_DEVICES", gpus=1))
    assert named.wait(job)["state"] == "completed"
    log = (Path(named.job(job)["run_dir"]) / "trainer.log").read_text()
    assert "CUDA_VISIBLE_DEVICES=3" in log


# -- 14: webhooks: readable Slack text, started and retrying events -----------------------------

class Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, str, dict]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.received.append((self.path, self.headers["X-Lorasup-Event"],
                                  json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_webhook_events_and_the_slack_text(daemons, tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        d = daemons().start()
        bad = d.submit(bar_job(2, notify={"webhook": url, "events": ["started", "done"]}))
        assert bad.status_code == 400 and "notify.events" in bad.json()["error"]
        every = ["started", "retrying", "completed", "failed", "cancelled", "lost"]
        job = d.submit_ok(bar_job(20, 0.02, "--hang-after", "2", retries=1,
                                  no_output_timeout=1, grace=0.5,
                                  notify={"webhook": f"{url}/slack", "format": "slack",
                                          "events": every}))
        fine = d.submit_ok(bar_job(2, notify={"webhook": f"{url}/json"}))  # the default
        assert d.wait(job, timeout=40)["state"] == "failed"
        assert d.wait(fine)["state"] == "completed"
        assert wait_for(lambda: len(Receiver.received) >= 5, timeout=15), Receiver.received
    finally:
        server.shutdown()
        server.server_close()
    slack = [(event, body["text"]) for path, event, body in Receiver.received
             if path == "/slack"]
    assert [e for e, _ in slack] == ["job.started", "job.retrying", "job.started",
                                     "job.finished"], slack
    assert slack[0][1] == f"lorasup job {job} (command) started, attempt 1"
    assert slack[1][1].startswith(f"lorasup job {job} (command) will be retried in ")
    assert "retry after stalled" in slack[1][1]
    final = slack[3][1]
    assert final.startswith(f"lorasup job {job} (command) failed (stalled): ")
    assert "completed — completed" not in final
    plain = [(event, body) for path, event, body in Receiver.received if path == "/json"]
    assert [e for e, _ in plain] == ["job.finished"]  # the final state only, as before
    assert plain[0][1]["state"] == "completed"
