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
    d = daemons("--until-empty", "--idle", "5").start()
    job = d.submit_ok(bar_job(2))  # after the start, as `serve --until-empty & submit` does
    assert d.wait(job)["state"] == "completed"
    ended = time.monotonic()
    assert d.proc is not None and d.proc.poll() is None  # not at once: --idle first
    assert d.wait_exit(timeout=30) == 0
    assert time.monotonic() - ended >= 3  # ~5 s after the job's end, less our polling
    idle = [r for r in d.log_records() if r.get("event") == "queue_empty"]
    assert idle and idle[0]["idle_s"] == 5


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


# -- 9: ps shows what one decides with, and why a queued job waits ----------------------------

def _rows(stdout: str) -> dict[int, dict[str, str]]:
    """``ps``'s table by job id: the header's names → each row's cells."""
    lines = stdout.splitlines()
    header = lines[0]
    starts = [header.index(name) for name in header.split()]
    out: dict[int, dict[str, str]] = {}
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        out[int(cells[0])] = dict(zip(header.split(), cells, strict=True))
    return out


def test_ps_columns_and_why_each_queued_job_waits(daemons, tmp_path: Path) -> None:
    d = daemons("--slots", "2").start("--retry-backoff", "60")
    blocker = d.submit_ok(bar_job(2000, 0.05, name="blocker", priority=3))
    staller = d.submit_ok(bar_job(20, 0.02, "--hang-after", "2", name="staller", retries=1,
                                  no_output_timeout=1, grace=0.5))
    assert wait_for(lambda: d.job(staller)["state"] == "queued"
                    and d.job(staller)["attempt"] == 1, timeout=30)
    runner = d.submit_ok(bar_job(2000, 0.05, name="runner"))
    d.wait_step(runner, 1)
    first = d.submit_ok(bar_job(2, name="first", priority=1))
    second = d.submit_ok(bar_job(2, name="second"))
    assert wait_for(lambda: d.job(second)["waiting"] == f"after job {first}", timeout=10)
    d.wait_step(blocker, 5)
    out = lorasup(tmp_path, "ps")
    assert out.returncode == 0, out.stderr
    rows = _rows(out.stdout)
    assert rows[blocker]["STATE"] == "running" and rows[blocker]["PRI"] == "3"
    assert rows[blocker]["SLOT"].startswith("cpu") and rows[blocker]["TRY"] == "1"
    step, total = rows[blocker]["STEP"].split("/")
    assert int(step) >= 5 and total == "2000" and rows[blocker]["LOSS"] != "-"
    assert rows[blocker]["ELAPSED"].endswith("s") and rows[blocker]["ETA"] != "-"
    assert rows[staller]["STATE"] == "queued" and rows[staller]["TRY"] == "1/2"
    assert rows[staller]["WHY"].startswith("waits: retry in ")
    assert int(rows[staller]["WHY"].split()[3]) > 30  # about 60 s of backoff
    assert rows[first]["WHY"] == "waits: no free slot"
    assert rows[second]["WHY"] == f"waits: after job {first}"
    assert rows[first]["ETA"] == "-" and rows[first]["ELAPSED"] == "-"  # not started: absent
    as_json = {j["id"]: j for j in json.loads(lorasup(tmp_path, "ps", "--json").stdout)}
    assert as_json[blocker]["eta_s"] > 0 and as_json[first]["eta_s"] is None
    for job in (blocker, runner, staller):
        assert d.http is not None and d.http.post(f"/jobs/{job}/cancel").status_code == 200
    for job in (blocker, runner, staller, first, second):
        d.wait(job)
    # by default the active jobs and the newest finished ones; --all: every job
    assert d.http is not None
    listed = [j["id"] for j in d.http.get("/jobs", params={"finished": "1"}).json()["jobs"]]
    assert listed == [second]
    every = _rows(lorasup(tmp_path, "ps", "--all").stdout)
    assert set(every) == {blocker, staller, runner, first, second}
    assert every[blocker]["WHY"] == "cancelled: cancelled by request"


# -- 7: ps, show and logs with no daemon running ----------------------------------------------

def test_ps_show_and_logs_read_the_database_when_no_daemon_runs(daemons, tmp_path: Path
                                                                ) -> None:
    import os
    import signal

    d = daemons().start()
    done = d.submit_ok(bar_job(3, name="done"))
    assert d.wait(done)["state"] == "completed"
    running = d.submit_ok(bar_job(2000, 0.05, name="busy"))
    d.wait_step(running, 2)
    d.signal(signal.SIGKILL)  # its -wal is left behind: read as it is
    d.wait_exit()
    files = sorted(p.name for p in d.state.iterdir())
    db_before = os.stat(d.state / "lorasup.db").st_mtime_ns
    out = lorasup(tmp_path, "ps")
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("\n") == 1 and "daemon is not running" in out.stderr
    rows = _rows(out.stdout)
    assert rows[done]["STATE"] == "completed" and rows[running]["STATE"] == "running"
    shown = lorasup(tmp_path, "show", str(done))
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)  # not a terminal: the JSON document, as online
    assert data["job"]["name"] == "done" and data["report"]["outcome"] == "completed"
    assert data["job"]["attempts"][0]["outcome"] == "completed"
    logs = lorasup(tmp_path, "logs", str(done), "--events")
    kinds = [json.loads(line)["kind"] for line in logs.stdout.splitlines()]
    assert kinds[0] == "started" and kinds[-1] == "outcome", logs.stderr
    followed = lorasup(tmp_path, "logs", str(done), "-f", timeout=30)  # ends: no daemon
    assert followed.returncode == 0 and "not following" in followed.stderr
    assert json.loads(followed.stdout.splitlines()[-1])["event"], followed.stdout[-500:]
    missing = lorasup(tmp_path, "show", "99")
    assert missing.returncode == 2 and "no job 99" in missing.stderr
    # read-only: nothing written, no file made
    assert sorted(p.name for p in d.state.iterdir()) == files
    assert os.stat(d.state / "lorasup.db").st_mtime_ns == db_before
    # a state directory that never had a daemon: the one-line error, exit 2
    empty = subprocess.run(lorasup_argv("ps", "--state-dir", str(tmp_path / "nothing")),
                           capture_output=True, text=True, env=child_env(), timeout=60)
    assert empty.returncode == 2 and empty.stderr.count("\n") == 1
    assert empty.stderr.startswith("lorasup: error: no lorasup daemon is listening on ")


# -- 8: show and logs for a person at a terminal ------------------------------------------------

def test_show_and_logs_are_readable_on_a_terminal(daemons, tmp_path: Path) -> None:
    from tests.support import run_on_a_terminal

    d = daemons().start()
    job = d.submit_ok(bar_job(3, name="readable"))
    assert d.wait(job)["state"] == "completed"
    run_dir = d.job(job)["run_dir"]
    state = ["--state-dir", str(d.state)]
    code, text = run_on_a_terminal(lorasup_argv("show", str(job), *state))
    lines = text.replace("\r\n", "\n").splitlines()
    assert code == 0, text
    assert lines[0] == f"job {job}  readable  completed"
    assert any(line.startswith("outcome    completed") for line in lines), text
    assert "step       3/3  last loss 0.3333" in text
    assert "  1  completed" in text and run_dir in text
    assert f"report     {run_dir}/report.json" in text
    assert len(lines) < 40 and not text.lstrip().startswith("{")
    code, text = run_on_a_terminal(lorasup_argv("show", str(job), "--json", *state))
    assert code == 0 and json.loads(text)["job"]["id"] == job  # --json: as before
    code, text = run_on_a_terminal(lorasup_argv("logs", str(job), *state))
    lines = [line for line in text.replace("\r\n", "\n").splitlines() if line]
    assert code == 0 and lines, text
    assert not any(line.startswith("{") for line in lines), text
    outcome = [line for line in lines if " outcome " in line]
    assert outcome and "info" in outcome[0] and "outcome=completed" in outcome[0], lines
    assert outcome[0][:2].isdigit() and outcome[0][2] == ":"  # HH:MM:SS first
    code, text = run_on_a_terminal(lorasup_argv("logs", str(job), "--events", *state))
    assert code == 0 and any(" step " in line and "step=3" in line
                             for line in text.splitlines()), text


# -- the pure parts: properties ----------------------------------------------------------------

def test_line_formatter_is_the_same_whatever_the_chunks() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from lorasup.supervisor.serve.present import LineFormatter, log_line

    record = st.dictionaries(st.text(max_size=8), st.one_of(
        st.none(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30),
        st.lists(st.integers(), max_size=3)), max_size=5).map(
        lambda d: json.dumps(d).encode())
    line = st.one_of(record, st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")))

    @settings(max_examples=200, deadline=None)
    @given(lines=st.lists(line, max_size=8), cuts=st.lists(st.integers(0, 400), max_size=6))
    def same(lines: list[bytes], cuts: list[int]) -> None:
        data = b"".join(x + b"\n" for x in lines)
        whole = LineFormatter()
        expected = whole.feed(data) + whole.close()
        pieces, start = LineFormatter(), 0
        got: list[str] = []
        for cut in sorted(min(c, len(data)) for c in cuts):
            got += pieces.feed(data[start:cut])
            start = cut
        got += pieces.feed(data[start:]) + pieces.close()
        assert got == expected
        assert expected == [log_line(x) for x in lines if x.strip()]
        assert all("\n" not in x for x in expected)

    same()


def test_every_queued_job_that_does_not_start_has_a_reason() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from lorasup.supervisor.serve.scheduler import Slot, Waiting, assign, reasons

    jobs = st.lists(st.builds(Waiting, id=st.integers(1, 10**6), priority=st.integers(-3, 3),
                              gpus=st.integers(0, 3), not_before=st.sampled_from([0.0, 50.0])),
                    max_size=8, unique_by=lambda w: w.id)

    @settings(max_examples=300, deadline=None)
    @given(queued=jobs, free=st.integers(0, 4), gpu_mode=st.booleans())
    def check(queued: list[Waiting], free: int, gpu_mode: bool) -> None:
        slots = [Slot(f"s{i}", (str(i),)) for i in range(free)]
        started = {job_id for job_id, _ in assign(queued, slots, 10.0, gpu_mode=gpu_mode)}
        why = reasons(queued, slots, 10.0, gpu_mode=gpu_mode)
        for job in queued:
            backing_off = job.not_before > 10.0
            assert (job.id in why) == (job.id not in started and not backing_off), (job, why)
        holders = [t for t in why.values() if not t.startswith("after job")]
        assert len(holders) <= 1

    check()
