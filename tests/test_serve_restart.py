"""``lorasup serve`` stopped and started again; what it tells systemd, webhooks and
Prometheus."""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serve_support import Daemon, bar_job, events_of
from tests.support import wait_for


def collect(sock: socket.socket, into: list[str]) -> threading.Thread:
    """Read datagrams as they come (a UNIX datagram queue holds only ~10)."""

    def read() -> None:
        while True:
            try:
                into.append(sock.recv(4096).decode())
            except OSError:
                return

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_sigterm_requeues_and_the_next_daemon_continues_the_steps(daemons, tmp_path: Path
                                                                  ) -> None:
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        got: list[str] = []
        reader = collect(notify, got)
        first = daemons(env={"NOTIFY_SOCKET": str(notify_path),
                             "WATCHDOG_USEC": "200000"}).start()
        builtin = first.submit_ok({"trainer": "builtin", "steps": 300, "grace": 10,
                                   "options": {"output_dir": "lora_out"}})
        other = first.submit_ok(bar_job(2))
        first.wait_step(builtin, 30, timeout=30)
        assert wait_for(lambda: any("STATUS=1 running, 1 queued" in m for m in got),
                        timeout=5), got
        assert "READY=1" in got[0] and "WATCHDOG=1" in got
        first.signal(signal.SIGTERM)
        began = time.monotonic()
        assert first.wait_exit() == 0
        assert time.monotonic() - began < 10 + 15  # the job's grace plus the margin
        notify.shutdown(socket.SHUT_RDWR)
        reader.join(timeout=5)
    stopping = [m for m in got if "STOPPING=1" in m]
    assert stopping and "EXTEND_TIMEOUT_USEC=" in stopping[0]
    second = daemons("--until-empty", "--idle", "1").start()
    assert second.wait_exit(timeout=60) == 0  # ran both jobs, then the queue was empty
    import sqlite3

    with sqlite3.connect(tmp_path / "state" / "lorasup.db") as db:
        rows = db.execute("SELECT id, state, attempts FROM jobs ORDER BY id").fetchall()
        attempts = db.execute("SELECT run_dir, why, outcome FROM attempts WHERE job_id = ? "
                              "ORDER BY n", (builtin,)).fetchall()
    assert rows == [(builtin, "completed", 2), (other, "completed", 1)]
    assert attempts[0][2] == "interrupted" and attempts[1][2] == "completed"
    assert attempts[1][1] == "re-queued: the daemon was stopped"
    saved = max(e["step"] for e in events_of(attempts[0][0]) if e["kind"] == "checkpoint")
    second_events = events_of(attempts[1][0])
    assert [e["step"] for e in second_events if e["kind"] == "resumed"] == [saved]
    steps = [e["step"] for e in second_events if e["kind"] == "step"]
    assert steps[0] == saved + 1 and steps[-1] == 300
    info = json.loads((Path(attempts[1][0]) / "attempt.json").read_text())
    assert info["attempt"] == 2 and info["resumed_from_step"] == saved


class Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, dict[str, str], bytes]]] = []
    fail_first = 1

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.received.append((self.path, dict(self.headers), body))
        refuse = Receiver.fail_first > 0
        Receiver.fail_first -= 1
        self.send_response(503 if refuse else 204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_webhooks_and_metrics(daemons, tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    config = tmp_path / "daemon.toml"
    config.write_text(f'[notify]\nwebhook = "{url}/all"\nsecret = "s3cret"\n',
                      encoding="utf-8")
    try:
        d = daemons("--config", str(config)).start()
        job = d.submit_ok(bar_job(40, 0.05, notify={"webhook": f"{url}/mine",
                                                    "format": "slack"}))
        d.wait_step(job, 5)
        live = metrics(d)
        assert live["lorasup_run_step"][(("job", str(job)),)] >= 5
        assert live["lorasup_run_final_step"][(("job", str(job)),)] == 40
        assert live["lorasup_jobs"][(("state", "running"),)] == 1
        assert live["lorasup_slots"][(("state", "busy"),)] == 1
        assert d.wait(job)["state"] == "completed"
        assert wait_for(lambda: len(Receiver.received) >= 3, timeout=15)
    finally:
        server.shutdown()
        server.server_close()
    by_path: dict[str, list] = {}
    for path, headers, body in Receiver.received:
        by_path.setdefault(path, []).append((headers, body))
    headers, body = by_path["/all"][-1]
    payload = json.loads(body)
    assert payload["job"] == job and payload["state"] == "completed"
    assert payload["steps"] == 40 and payload["final_loss"] == pytest.approx(1 / 40)
    expected = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert headers["X-Lorasup-Signature"] == expected
    assert headers["X-Lorasup-Event"] == "job.finished"
    # one of the two was refused once (503) and delivered on the retry
    assert len(by_path["/all"]) + len(by_path["/mine"]) == 3
    assert "X-Lorasup-Signature" not in by_path["/mine"][-1][0]
    assert "completed" in json.loads(by_path["/mine"][-1][1])["text"]
    done = metrics(d)
    assert done["lorasup_jobs"][(("state", "completed"),)] == 1
    assert done["lorasup_jobs_finished_total"][(("outcome", "completed"),)] == 1
    assert done["lorasup_run_duration_seconds_count"][()] == 1
    assert done["lorasup_steps_total"][()] == 40
    assert done["process_resident_memory_bytes"][()] > 10e6
    assert "lorasup_run_step" not in done or not done["lorasup_run_step"]


def metrics(d: Daemon) -> dict[str, dict[tuple, float]]:
    assert d.http is not None
    response = d.http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out
