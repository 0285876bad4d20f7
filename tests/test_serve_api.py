"""The daemon's HTTP door (issue 16, items 4, 8, 10, 12): every bad request is a JSON 4xx
naming what is wrong, never a 500 or a traceback; numbers are bounded at submit; a submit
with an Idempotency-Key is queued once however often it is sent; a client whose connection
breaks says so in one line and exits 75.

The property test drives the ASGI app of a real (not started) daemon object with a real
store; the others a real ``lorasup serve`` through its socket, with raw sockets where a
well-behaved client cannot send what is tested.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.from_thread import start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorasup.supervisor.serve.api import make_app
from lorasup.supervisor.serve.daemon import Daemon as DaemonObject
from lorasup.supervisor.serve.daemon import DaemonConfig
from lorasup.supervisor.serve.door import MAX_BODY
from lorasup.supervisor.serve.jobspec import to_toml
from lorasup.supervisor.serve.store import Store
from tests.serve_support import bar_job
from tests.support import child_env, lorasup_argv


def cli(tmp: Path, state: Path, *args: str, timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(lorasup_argv(*args, "--state-dir", str(state)), capture_output=True,
                          text=True, cwd=tmp, env=child_env(), timeout=timeout)


def raw_request(sock_path: Path, data: bytes, *, read: bool = True, timeout: float = 20.0
                ) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are on a new connection; (status, headers, body) of the reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(sock_path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        if not read:
            return 0, {}, b""
        return read_response(sock)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a reply: {buf!r}")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def post(path: str, body: bytes, *headers: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: lorasup", f"Content-Length: {len(body)}",
            "Connection: close", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def assert_json_error(response: httpx.Response, status: int, *words: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["error"]
    assert isinstance(message, str) and "\n" not in message and "Traceback" not in message
    for word in words:
        assert word in message, (word, message)
    return message


# -- every bad request through the real socket ---------------------------------------------


def test_bad_requests_get_a_json_4xx_naming_the_fault(daemons, tmp_path: Path) -> None:
    d = daemons().start()
    http = d.http
    assert http is not None
    # ids: not a plain small decimal → 404, never a 500
    for ident in ("%C2%B2", "9" * 30, "1e3", "-1", "0x10", "%00"):
        for tail in ("", "/report", "/events", "/log"):
            assert_json_error(http.get(f"/jobs/{ident}{tail}"), 404, "no job")
        assert_json_error(http.post(f"/jobs/{ident}/cancel"), 404, "no job")
    assert_json_error(http.get("/jobs/123456789012345678"), 404, "no job")
    assert_json_error(http.get("/jobs?limit=%C2%B2"), 400, "limit")
    # bodies: nested 200k deep, numbers Python will not read, not an object, not JSON
    deep = b'{"job": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    headers = {"Content-Type": "application/json"}
    assert_json_error(http.post("/jobs", content=deep, headers=headers), 400, "nested")
    too_long = b'{"job": {"steps": ' + b"9" * 5000 + b"}}"
    assert_json_error(http.post("/jobs", content=too_long, headers=headers), 400, "number")
    assert_json_error(http.post("/jobs", content=b"[1]", headers=headers), 400, "object")
    assert_json_error(http.post("/jobs", content=b"{nope", headers=headers), 400, "not JSON")
    assert_json_error(http.post("/jobs", content=b"\xff{}", headers=headers), 400)
    # poison numbers, each named, in JSON and in TOML
    poison = {"steps": 9223372036854775808, "timeout": 1e300, "grace": 10**12,
              "no_output_timeout": 0, "nan_patience": 10**30, "priority": 10**7,
              "retries": 101, "gpus": 65, "finish_timeout": 10**19}
    for key, value in poison.items():
        assert_json_error(d.submit({**bar_job(2), key: value}), 400, key)
    four_thousand = int("9" * 4000)
    assert_json_error(d.submit({**bar_job(2), "steps": four_thousand}), 400, "steps")
    for text in ("steps = 9223372036854775808", "steps = " + "9" * 4000,
                 "steps = " + "9" * 5000, "timeout = nan", "timeout = inf", "grace = -inf",
                 "a = " + "[" * 5000 + "]" * 5000):
        job = to_toml(bar_job(2)) + text + "\n"
        if text.startswith("steps"):
            job = job.replace("steps = 2\n", "", 1)
        response = http.post("/jobs", json={"toml": job, "cwd": str(tmp_path)})
        assert_json_error(response, 400)
    nan = b'{"job": {"trainer": "command", "command": ["x"], "steps": 2, "timeout": NaN}}'
    assert_json_error(http.post("/jobs", content=nan, headers=headers), 400, "timeout")
    # names with control characters; a lone surrogate
    for name in ("a\x00b", "two\nlines", "\x1b[2Jclear", "tab\there", "del\x7f", "\u2028"):
        assert_json_error(d.submit(bar_job(2), name=name), 400, "name")
    surrogate = b'{"job": {}, "name": "\\ud800"}'
    assert_json_error(http.post("/jobs", content=surrogate, headers=headers), 400, "name")
    # content types: JSON only (the README's API), with or without a charset
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/toml"):
        response = http.post("/jobs", content=b"{}", headers={"Content-Type": content_type})
        assert_json_error(response, 415, "application/json")
    assert_json_error(http.post("/jobs", content=b"{}"), 415)
    ok_type = http.post("/jobs", content=b"{}",
                        headers={"Content-Type": "application/json; charset=utf-8"})
    assert_json_error(ok_type, 400, "job")  # past the door: the job itself is missing
    # unknown routes and methods
    assert_json_error(http.get("/nope"), 404)
    assert_json_error(http.delete("/jobs"), 405)
    # Last-Event-ID
    assert_json_error(http.get("/jobs/1/events", headers={"Last-Event-ID": "x"}), 404)
    job = d.submit_ok(bar_job(2, 0.01))
    d.wait(job)
    for bad in ("junk", "1:", ":5", "1:" + "9" * 40, "²:1"):
        response = http.get(f"/jobs/{job}/events", headers={"Last-Event-ID": bad.encode()},
                            params={"follow": "0"})
        assert_json_error(response, 400, "Last-Event-ID")
    good = http.get(f"/jobs/{job}/events", headers={"Last-Event-ID": "1:0"},
                    params={"follow": "0"})
    assert good.status_code == 200 and "event: end" in good.text
    # the daemon is fine and queued only the one good job
    assert http.get("/healthz").json()["ok"] is True
    assert [j["id"] for j in http.get("/jobs").json()["jobs"]] == [job]
    assert "Traceback" not in d.log.read_text()


def test_a_body_over_the_limit_is_refused_unread(daemons, tmp_path: Path) -> None:
    d = daemons().start()
    sock = d.state / "lorasup.sock"
    # Content-Length says 2 MiB; only the head is sent: the 413 comes without the body
    head = (b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n{" % (2 * MAX_BODY))
    status, headers, body = raw_request(sock, head)
    assert status == 413 and headers["content-type"] == "application/json"
    assert "larger than" in json.loads(body)["error"]
    # chunked: counted as it comes, refused once past the limit
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(20)
        conn.connect(str(sock))
        conn.sendall(b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        piece = b"7" * 65536
        sent = 0
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, TimeoutError):
            while sent <= 4 * MAX_BODY:
                conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
        status, _, body = read_response(conn)
    assert status == 413 and "larger than" in json.loads(body)["error"]
    assert sent < 4 * MAX_BODY  # refused while it was still being sent
    assert d.http is not None and d.http.get("/healthz").json()["ok"] is True


def test_unparseable_http_gets_a_json_400(daemons, tmp_path: Path) -> None:
    d = daemons().start()
    sock = d.state / "lorasup.sock"
    for data in (b"GARBAGE\r\n\r\n", b"GET /jobs HTTP/1.1\r\nHost: localhost\r\nBad Header\r\n\r\n",
                 b"GET /jobs HTTP/1.1\r\nHost: localhost\r\nX: " + b"a" * 2_000_000 + b"\r\n\r\n",
                 b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Length: x1\r\n\r\n"):
        status, headers, body = raw_request(sock, data)
        assert status == 400 and headers["content-type"] == "application/json", (data[:40], body)
        assert json.loads(body)["error"].startswith("bad HTTP request")
    assert d.http is not None and d.http.get("/healthz").json()["ok"] is True


# -- idempotent submits --------------------------------------------------------------------


def test_cut_connections_with_one_key_queue_one_job(daemons, tmp_path: Path) -> None:
    d = daemons().start()
    sock = d.state / "lorasup.sock"
    body = json.dumps({"job": bar_job(2, 0.01), "cwd": str(tmp_path)}).encode()
    key = "Idempotency-Key: 3f1c0a52-1d0e-4a8e-9e55-0d8c9f3b7a11"
    request = post("/jobs", body, "Content-Type: application/json", key)
    for _ in range(12):  # the client goes before the reply: its submit may or may not land
        raw_request(sock, request, read=False)
    status, _, reply = raw_request(sock, request)
    assert status in (200, 201), reply
    job = json.loads(reply)["id"]
    assert d.http is not None
    again = d.http.post("/jobs", content=body, headers={
        "Content-Type": "application/json", "Idempotency-Key": key.split(": ")[1]})
    assert again.status_code == 200 and again.json()["id"] == job
    assert [j["id"] for j in d.http.get("/jobs").json()["jobs"]] == [job]
    d.wait(job)  # every cut request has long been handled by now
    assert [j["id"] for j in d.http.get("/jobs").json()["jobs"]] == [job]
    assert len([r for r in d.log_records() if r.get("event") == "job_queued"]) == 1
    # a different key is another submit (refused here: the same output, already queued)
    other = d.http.post("/jobs", content=body, headers={
        "Content-Type": "application/json", "Idempotency-Key": "another"})
    assert other.status_code in (201, 409)
    assert_json_error(d.http.post("/jobs", content=body, headers={
        "Content-Type": "application/json", "Idempotency-Key": "bad key"}), 400,
        "Idempotency-Key")


class Proxy:
    """A UNIX socket in front of the daemon's: the first ``drops`` connections are forwarded
    to the daemon and then closed before the reply reaches the client (a reply lost in
    flight); the others are passed through. Records each request's head."""

    def __init__(self, listen: Path, target: Path, drops: int) -> None:
        self.listen, self.target, self.drops = listen, target, drops
        self.heads: list[str] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(listen))
        self.server.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.server.accept()
                with conn:
                    self._one(conn)

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(20)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            body += conn.recv(65536)
        self.heads.append(head.decode("latin-1"))
        head = b"\r\n".join(ln for ln in head.split(b"\r\n")
                            if not ln.lower().startswith(b"connection:"))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as up:
            up.settimeout(20)
            up.connect(str(self.target))
            up.sendall(head + b"\r\nConnection: close\r\n\r\n" + body)
            status, _headers, reply = read_response(up)
        if len(self.heads) <= self.drops:
            return  # the daemon answered; the client never hears it
        text = "\r\n".join([f"HTTP/1.1 {status} X", "Content-Type: application/json",
                            f"Content-Length: {len(reply)}", "Connection: close"])
        conn.sendall(text.encode() + b"\r\n\r\n" + reply)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Any]:
    made: list[Proxy] = []

    def make(target: Path, drops: int) -> Proxy:
        state = tmp_path / f"proxy{len(made)}"
        state.mkdir()
        made.append(Proxy(state / "lorasup.sock", target, drops))
        return made[-1]

    yield make
    for p in made:
        p.close()


def test_submit_retries_a_lost_reply_with_the_same_key(daemons, proxy, tmp_path: Path
                                                       ) -> None:
    d = daemons().start()
    front = proxy(d.state / "lorasup.sock", drops=1)
    job_file = tmp_path / "job.toml"
    job_file.write_text(to_toml(bar_job(400, 0.05)), encoding="utf-8")
    out = cli(tmp_path, front.listen.parent, "submit", str(job_file))
    assert out.returncode == 0, out.stderr
    job = int(out.stdout.strip())
    keys = [ln.split(":", 1)[1].strip() for h in front.heads for ln in h.split("\r\n")
            if ln.lower().startswith("idempotency-key:")]
    assert len(front.heads) == 2 and len(keys) == 2 and keys[0] == keys[1] and len(keys[0]) == 36
    assert d.http is not None
    assert [j["id"] for j in d.http.get("/jobs").json()["jobs"]] == [job]
    # a second invocation is a new submit (a new key): a second job
    again = cli(tmp_path, front.listen.parent, "submit", str(job_file))
    assert again.returncode == 0, again.stderr
    second = int(again.stdout.strip())
    assert second != job
    assert [j["id"] for j in d.http.get("/jobs").json()["jobs"]] == [job, second]
    assert len({ln for h in front.heads for ln in h.split("\r\n")
                if ln.lower().startswith("idempotency-key:")}) == 2
    for ident in (job, second):
        d.http.post(f"/jobs/{ident}/cancel")


def test_a_dropped_connection_is_one_line_and_exit_75(daemons, proxy, tmp_path: Path) -> None:
    d = daemons().start()
    front = proxy(d.state / "lorasup.sock", drops=100)
    state = front.listen.parent
    job = d.submit_ok(bar_job(2, 0.01))
    for args in (("ps",), ("show", str(job)), ("cancel", str(job))):
        out = cli(tmp_path, state, *args)
        assert out.returncode == 75, (args, out.stderr)
        assert out.stderr.startswith("lorasup: error: the connection to the daemon broke")
        assert out.stderr.count("\n") == 1
    job_file = tmp_path / "job.toml"
    job_file.write_text(to_toml(bar_job(2, 0.01, name="other")), encoding="utf-8")
    out = cli(tmp_path, state, "submit", str(job_file))
    assert out.returncode == 75 and out.stderr.count("\n") == 1
    assert len(front.heads) == 3 + 2  # the submit was tried twice


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_logs_follow_when_the_daemon_dies_is_one_line_and_exit_75(
        daemons, tmp_path: Path, sig: signal.Signals) -> None:
    d = daemons().start()
    job = d.submit_ok(bar_job(400, 0.05))
    d.wait_step(job, 1)
    argv = lorasup_argv("logs", str(job), "-f", "--state-dir", str(d.state))
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
                          env=child_env()) as follow:
        try:
            assert follow.stdout is not None and follow.stderr is not None
            assert follow.stdout.readline()  # following
            d.signal(sig)
            code = follow.wait(timeout=60)
            err = follow.stderr.read().decode()
        finally:
            if follow.poll() is None:
                follow.kill()
    assert code == 75, err
    assert err.startswith("lorasup: error: the connection to the daemon broke"), err
    assert err.count("\n") == 1 and "Traceback" not in err


# -- a finished job's report is there ------------------------------------------------------


def test_completed_means_the_report_can_be_read(daemons, tmp_path: Path) -> None:
    d = daemons().start()
    assert d.http is not None
    for _ in range(2):
        job = d.submit_ok(bar_job(2, 0.01))
        seen = d.wait(job)
        assert seen["state"] == "completed"
        report = d.http.get(f"/jobs/{job}/report")
        assert report.status_code == 200, report.text
        assert report.json()["outcome"] == "completed"


# -- lorasup start refuses the same numbers -------------------------------------------------


@pytest.mark.parametrize(("text", "field"), [
    ("steps = 9223372036854775808", "steps"),
    ("steps = " + "9" * 4000, "steps"),
    ("steps = " + "9" * 5000, "digits"),
    ("timeout = nan", "timeout"),
    ("grace = inf", "grace"),
    ("no_output_timeout = 1e12", "no_output_timeout"),
])
def test_start_refuses_poison_numbers_with_exit_2(tmp_path: Path, text: str, field: str) -> None:
    job = tmp_path / "job.toml"
    steps = "" if text.startswith("steps") else "steps = 1\n"
    job.write_text(f'trainer = "command"\ncommand = ["true"]\n{steps}{text}\n')
    out = subprocess.run(lorasup_argv("start", "--config", str(job), "--run-dir",
                                      str(tmp_path / "run")),
                         capture_output=True, text=True, cwd=tmp_path, env=child_env(),
                         timeout=60)
    assert out.returncode == 2, out.stderr
    assert field in out.stderr and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_start_flags_are_bounded_too(tmp_path: Path) -> None:
    for flag, value in (("--steps", "9223372036854775808"), ("--timeout", "nan"),
                        ("--grace", "1e300"), ("--nan-patience", "10000000000")):
        out = subprocess.run(lorasup_argv("start", "--trainer", "command", "--steps", "2",
                                          flag, value, "--run-dir", str(tmp_path / "r"),
                                          "--", "true"),
                             capture_output=True, text=True, cwd=tmp_path, env=child_env(),
                             timeout=60)
        assert out.returncode == 2, (flag, out.stderr)
        assert flag.lstrip("-").replace("-", "_") in out.stderr, out.stderr


# -- property: no request makes a 500 ------------------------------------------------------


@pytest.fixture(scope="module")
def asgi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real daemon object and its store (not serving: no runs start), its ASGI app, and a
    portal into the event loop it lives in."""
    state = tmp_path_factory.mktemp("asgi")
    (state / "runs").mkdir()
    with start_blocking_portal() as portal:

        def build() -> tuple[DaemonObject, Any]:
            daemon = DaemonObject(DaemonConfig(state_dir=state, gpus="none"))
            daemon.store = Store(state / "lorasup.db")
            return daemon, make_app(daemon)

        daemon, app = portal.call(build)
        yield portal, app, state
        assert daemon.store is not None
        daemon.store.close()
        daemon.hooks.close()
        daemon.hooks._receive.close()  # the worker that would drain it never ran


_ident = st.one_of(st.integers(-5, 10**20).map(str), st.text(max_size=12),
                   st.sampled_from(["²", "1" * 30, "01", "1.0", "%00", "..", "1/2"]))
_path = st.one_of(
    _ident.map(lambda i: f"/jobs/{i}"),
    st.tuples(_ident, st.sampled_from(["report", "events", "log", "cancel", "x"])).map(
        lambda t: f"/jobs/{t[0]}/{t[1]}"),
    st.sampled_from(["/jobs", "/healthz", "/metrics", "/", "/jobs/", "//jobs"]),
    st.text(max_size=20).map(lambda t: "/" + t),
)
_header_text = st.text(st.characters(min_codepoint=32, max_codepoint=255,
                                     blacklist_characters="\x7f"), max_size=40)
_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                       st.text(max_size=10))
_json = st.recursive(_json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=12)
_job_keys = st.sampled_from(["steps", "timeout", "grace", "priority", "retries", "gpus",
                             "nan_patience", "name", "trainer", "command", "options", "cwd"])
_body = st.one_of(
    st.binary(max_size=64),
    _json.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(_job_keys, _json, max_size=5).map(
        lambda job: json.dumps({"job": job}).encode()),
    st.integers(1, 300).map(lambda n: b'{"job":' + b"[" * n + b"]" * n + b"}"),
    st.integers(4000, 5000).map(lambda n: b'{"job":{"steps":' + b"7" * n + b"}}"),
    st.text(max_size=60).map(lambda t: json.dumps({"toml": t}).encode()),
    # a job that is valid but for one number: the bounds, through the daemon's validation
    st.tuples(st.sampled_from(["steps", "timeout", "grace", "priority", "retries", "gpus",
                               "nan_patience", "no_output_timeout", "finish_timeout"]),
              st.one_of(st.integers(), st.floats(), st.integers(-(10**40), 10**40))).map(
        lambda kv: json.dumps({"cwd": "/", "job": {"trainer": "command", "command": ["true"],
                                                   "steps": 2, kv[0]: kv[1]}}).encode()),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD"]), path=_path,
       body=_body, content_type=st.one_of(st.none(), st.just("application/json"),
                                          _header_text),
       last_event_id=st.one_of(st.none(), _header_text),
       key=st.one_of(st.none(), _header_text),
       query=st.dictionaries(st.sampled_from(["limit", "follow", "from", "events"]),
                             _header_text, max_size=2))
def test_property_no_request_gets_a_500(asgi, method: str, path: str, body: bytes,
                                        content_type: str | None, last_event_id: str | None,
                                        key: str | None, query: dict[str, str]) -> None:
    portal, app, _state = asgi
    headers = {name: value.encode("latin-1") for name, value in (
        ("content-type", content_type), ("last-event-id", last_event_id),
        ("idempotency-key", key)) if value is not None}
    query = {**query, "follow": "0"}  # a stream of a queued job would follow for ever

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://lorasup") as client:
            with anyio.fail_after(30):
                return await client.request(method, path, content=body if method in (
                    "POST", "PUT") else None, headers=headers, params=query)

    try:
        response = portal.call(call)
    except httpx.InvalidURL:
        return  # the client refuses to send it: nothing reached the server
    assert response.status_code != 500, response.text
    assert response.status_code < 500 or response.status_code == 503
    if response.status_code >= 400 and method != "HEAD":
        assert response.headers["content-type"] == "application/json", response.text
        assert isinstance(response.json()["error"], str)


def test_an_unexpected_fault_is_a_json_500_and_logged(tmp_path: Path) -> None:
    """Whatever the API's operations raise, the client gets one JSON line, not a trace."""

    class Broken:
        def __getattr__(self, name: str) -> Any:
            def fail(*args: Any, **kwargs: Any) -> Any:
                raise RuntimeError("boom\nsecond line")
            return fail

    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=make_app(Broken()))  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            return await client.get("/jobs")

    response = anyio.run(main)
    assert response.status_code == 500
    assert response.json() == {"error": "internal: RuntimeError: boom"}


def test_serve_flags_are_bounded(tmp_path: Path) -> None:
    config = tmp_path / "daemon.toml"
    config.write_text("retry_backoff = inf\n")
    for args, word in ((("--slots", "100000"), "--slots"), (("--slots", "0"), "--slots"),
                       (("--retry-backoff", "nan"), "--retry-backoff"),
                       (("--retry-backoff", "1e300"), "--retry-backoff"),
                       (("--config", str(config)), "retry_backoff")):
        out = cli(tmp_path, tmp_path / "state", "serve", "--gpus", "none", *args, timeout=60)
        assert out.returncode == 2, (args, out.stderr)
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
        assert word in out.stderr, out.stderr


def test_listen_beyond_loopback_needs_an_explicit_choice(tmp_path: Path) -> None:
    """Issue 18.5: a non-loopback --listen without --tls-cert/--tls-key is refused unless
    the user says --insecure-listen; loopback addresses (127.0.0.0/8, ::1, localhost) need
    no word. (With TLS: tests/test_serve_session.py.)"""
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123", encoding="utf-8")
    for address in ("0.0.0.0:8710", "192.0.2.7:8710", "[2001:db8::1]:8710", "gpu-box:8710"):
        out = cli(tmp_path, tmp_path / "state", "serve", "--gpus", "none", "--listen", address,
                  "--token-file", str(token), timeout=60)
        assert out.returncode == 2, (address, out.stderr)
        assert "--insecure-listen" in out.stderr and out.stderr.count("\n") == 1, out.stderr
        assert "--tls-cert" in out.stderr, out.stderr
    from lorasup.supervisor.serve.listening import loopback

    assert all(loopback(h) for h in ("localhost", "127.0.0.1", "127.8.9.10", "::1"))
    assert not any(loopback(h) for h in ("0.0.0.0", "192.0.2.7", "::", "gpu-box", ""))
