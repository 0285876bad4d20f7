"""The API's browser-facing rules (serve/security.py), with real HTTP against a real daemon
on its UNIX socket and on ``--listen``: a rebound Host, another origin, a simple (text/plain
or empty) POST are refused with a JSON 4xx and change nothing; the series and priority
routes answer what they promise."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lorasup.supervisor.serve.hub import format_positions, parse_positions
from lorasup.supervisor.serve.security import host_name
from tests.serve_support import bar_job, events_of

TOKEN = "t0ken-" + "y" * 24


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def served(daemons, tmp_path: Path):
    """A daemon with --listen on 127.0.0.1 and a token: (daemon, tcp client, port)."""
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n", encoding="utf-8")
    port = free_port()
    d = daemons("--listen", f"127.0.0.1:{port}", "--token-file", str(token)).start()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as tcp:
        yield d, tcp, port


def refused(response: httpx.Response, status: int, word: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    assert word in response.json()["error"], response.text


def test_rebound_host_and_other_origins_are_refused(served, tmp_path: Path) -> None:
    d, tcp, port = served
    unix = httpx.Client(transport=httpx.HTTPTransport(uds=str(d.state / "lorasup.sock")),
                        base_url="http://localhost", timeout=20)
    with unix:
        for client in (unix, tcp):
            refused(client.get("/jobs", headers={"Host": "evil.example"}), 403, "Host")
            refused(client.get("/", headers={"Host": f"evil.example:{port}",
                                             "Accept": "text/html"}), 403, "Host")
            # a fetch from a page on another origin (another port of 127.0.0.1 too)
            for origin in ("http://evil.example", f"http://127.0.0.1:{port + 1}", "null"):
                refused(client.get("/jobs", headers={"Origin": origin}), 403, "cross-origin")
            refused(client.get("/jobs", headers={"Sec-Fetch-Site": "cross-site",
                                                 "Sec-Fetch-Mode": "cors"}), 403, "cross-site")
            refused(client.get("/jobs", headers={"Sec-Fetch-Site": "same-site",
                                                 "Sec-Fetch-Mode": "no-cors"}), 403,
                    "cross-site")
            for host in ("localhost", "127.0.0.1", f"127.0.0.1:{port}", f"[::1]:{port}"):
                ok = client.get("/jobs", headers={"Host": host})
                assert ok.status_code == 200, (host, ok.text)
                assert "default-src 'self'" in ok.headers["content-security-policy"]
        same = tcp.get("/jobs", headers={"Origin": f"http://127.0.0.1:{port}",
                                         "Sec-Fetch-Site": "same-origin"})
        assert same.status_code == 200
        # a cross-site link to a page is a plain navigation: allowed, it changes nothing
        page = tcp.get("/", headers={"Accept": "text/html", "Sec-Fetch-Site": "cross-site",
                                     "Sec-Fetch-Mode": "navigate",
                                     "Sec-Fetch-Dest": "document"})
        assert page.status_code == 200 and "app.js" in page.text

        # state-changing requests a page on another origin could make: nothing changes
        job = d.submit_ok(bar_job(400, 0.05))
        d.wait_step(job, 1)
        body = '{"job": {"trainer": "command", "steps": 1, "command": ["true"]}}'
        for client in (unix, tcp):
            refused(client.post("/jobs", content=body,
                                headers={"Content-Type": "text/plain"}), 415, "Content-Type")
            refused(client.post(f"/jobs/{job}/cancel"), 415, "Content-Type")
            refused(client.post(f"/jobs/{job}/cancel", content=b"x",
                                headers={"Content-Type": "text/plain"}), 415, "Content-Type")
            refused(client.post(f"/jobs/{job}/cancel", headers={
                "Origin": "http://evil.example", "Content-Type": "application/json"}), 403,
                "cross-origin")
            refused(client.post("/jobs", content=body, headers={
                "Origin": "http://evil.example", "Content-Type": "application/json"}), 403,
                "cross-origin")
        assert [j["id"] for j in d.http.get("/jobs").json()["jobs"]] == [job]
        assert d.job(job)["state"] == "running"
        # the token on --listen: missing or wrong is 401, even with the right headers
        for auth in ({}, {"Authorization": "Bearer nope"}):
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as bare:
                refused(bare.get("/jobs", headers=auth), 401, "bearer")
                refused(bare.get(f"/jobs/{job}", headers=auth), 401, "bearer")
                refused(bare.get("/events", headers=auth), 401, "bearer")
                refused(bare.post(f"/jobs/{job}/cancel", headers={
                    **auth, "Content-Type": "application/json"}), 401, "bearer")
                # the static shell holds no data: served without the token
                assert bare.get(f"/jobs/{job}", headers={"Accept": "text/html"}
                                ).status_code == 200
                assert bare.get("/static/app.js").status_code == 200
                # ... and says nothing about which jobs exist
                assert bare.get("/jobs/999", headers={"Accept": "text/html"}
                                ).status_code == 200
        assert d.job(job)["state"] == "running"
        ok = unix.post(f"/jobs/{job}/cancel", headers={"Content-Type": "application/json"})
        assert ok.status_code == 200, ok.text
        assert d.wait(job)["state"] == "cancelled"


def test_series_priority_and_the_page(daemons, tmp_path: Path) -> None:
    d = daemons().start()
    done = d.submit_ok(bar_job(300, 0.0, "--nan-at", "120"))
    d.wait(done)
    blocker = d.submit_ok(bar_job(400, 0.05))
    d.wait_step(blocker, 1)
    queued = d.submit_ok(bar_job(3, 0.0), priority=5)
    http = d.http
    assert http is not None
    series = http.get(f"/jobs/{done}/series", params={"points": "7"}).json()
    assert series["points"] <= 7 and len(series["mean"]) == series["points"]
    # the NaN at step 120 ends the run (diverged); the series holds every recorded step
    steps = [e for e in events_of(d.job(done)["run_dir"]) if e["kind"] == "step"]
    last = max(e["step"] for e in steps)
    assert last >= 120 and series["first"][0] == 1 and series["last"][-1] == last
    assert sum(series["count"]) == len(steps) and sum(series["nonfinite"]) == 1
    finite = [e["avg_loss"] for e in steps if e["avg_loss"] != "nan"]
    assert max(v for v in series["max"] if v is not None) == max(finite)
    assert min(v for v in series["min"] if v is not None) == min(finite)
    assert [m["step"] for m in series["markers"] if m["kind"] == "nan"] == [120]
    assert any(m["kind"] == "outcome" for m in series["markers"])
    assert series["outcome"]["outcome"] == "diverged"
    full = http.get(f"/jobs/{done}/series").json()
    assert full["points"] == last and full["nonfinite"][119] == 1
    assert full["mean"][119] is None and full["min"][119] is None
    for bad in ("0", "-1", "x", "1e3"):
        refused(http.get(f"/jobs/{done}/series", params={"points": bad}), 400, "points")
    refused(http.get("/jobs/999/series"), 404, "no job")
    assert len(http.get(f"/jobs/{done}/tail").json()["lines"]) <= 200

    up = http.post(f"/jobs/{queued}/priority", json={"priority": 9})
    assert up.status_code == 200 and up.json()["priority"] == 9
    assert d.job(queued)["priority"] == 9
    for bad in (10**7, "1", 1.5, True, None):
        refused(http.post(f"/jobs/{queued}/priority", json={"priority": bad}), 400,
                "priority")
    refused(http.post(f"/jobs/{blocker}/priority", json={"priority": 1}), 409, "queued")
    refused(http.post(f"/jobs/{queued}/priority", content=b'{"priority": 1}', headers={
        "Origin": "http://evil.example", "Content-Type": "application/json"}), 403,
        "cross-origin")
    assert d.job(queued)["priority"] == 9

    page = http.get(f"/jobs/{done}", headers={"Accept": "text/html,*/*"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert http.get(f"/jobs/{done}").json()["id"] == done  # every other client: JSON
    refused(http.get("/jobs/999", headers={"Accept": "text/html"}), 404, "no job")
    for name in ("app.js", "style.css", "uPlot.iife.min.js", "uPlot.min.css"):
        asset = http.get(f"/static/{name}")
        assert asset.status_code == 200 and b"http://" not in asset.content.replace(
            b"http://www.w3.org", b"")
    refused(http.get("/static/../daemon.py"), 404, "")
    for job in (blocker, queued):
        http.post(f"/jobs/{job}/cancel")


def test_the_event_stream_multiplexes_and_resumes(daemons, tmp_path: Path) -> None:
    d = daemons().start()
    http = d.http
    assert http is not None
    job = d.submit_ok(bar_job(30, 0.05))
    events: list[tuple[str, str, str]] = []
    last_id = ""
    with http.stream("GET", "/events") as stream:
        kind = ident = ""
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("id: "):
                ident = last_id = line[4:]
            elif line.startswith("data: "):
                events.append((kind, ident, line[6:]))
                if kind == "job" and '"state":"completed"' in line:
                    break
    kinds = [k for k, _, _ in events]
    assert kinds[0] == "jobs" and "step" in kinds and kinds[-1] == "job"
    steps = [data for k, _, data in events if k == "step"]
    assert all(f'"job":{job},' in s for s in steps)
    assert parse_positions(last_id) is not None
    refused(http.get("/events", headers={"Last-Event-ID": "garbage"}), 400, "Last-Event-ID")


@given(st.dictionaries(st.integers(0, 10**12), st.tuples(st.integers(1, 10**6),
                                                          st.integers(0, 10**15)),
                       max_size=64))
def test_property_positions_round_trip(positions: dict[int, tuple[int, int]]) -> None:
    assert parse_positions(format_positions(positions)) == positions


@given(st.text(max_size=80))
def test_property_host_names_never_raise(text: str) -> None:
    name = host_name(text)
    assert name is None or (":" not in name or text.strip().startswith("["))
    assert host_name("[::1]:8080") == "::1" and host_name("LocalHost:1") == "localhost"


class Forward:
    """A TCP port forwarded to the daemon's UNIX socket: what ``ssh -L PORT:SOCKET`` makes
    (no token there). One thread per direction per connection; closed with the test."""

    def __init__(self, target: Path) -> None:
        import threading

        self.target = str(target)
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.open: list[socket.socket] = []
        self.accepting = threading.Thread(target=self._accept, daemon=True)
        self.accepting.start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.target)
            self.open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                thread = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                thread.start()
                self.threads.append(thread)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.server.close()
        for sock in self.open:
            sock.close()
        self.accepting.join(timeout=5)
        for thread in self.threads:
            thread.join(timeout=5)


def test_a_forwarded_socket_refuses_what_another_origin_sends(daemons, tmp_path: Path
                                                              ) -> None:
    """The issue's measurement: through ``ssh -L`` to the socket, a page on another origin
    cancelled a running job and submitted one with no-cors text/plain bodies."""
    d = daemons().start()
    job = d.submit_ok(bar_job(400, 0.05))
    d.wait_step(job, 1)
    forward = Forward(d.state / "lorasup.sock")
    base = f"http://127.0.0.1:{forward.port}"
    try:
        with httpx.Client(base_url=base, timeout=20) as http:
            page = http.get("/", headers={"Accept": "text/html"})
            assert page.status_code == 200 and "app.js" in page.text
            assert http.get("/jobs").status_code == 200  # the socket's trust: no token
            # what fetch(..., {mode: "no-cors"}) from http://evil.example sends
            evil = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site",
                    "Sec-Fetch-Mode": "no-cors", "Content-Type": "text/plain"}
            body = '{"job": {"trainer": "command", "steps": 1, "command": ["true"]}}'
            refused(http.post(f"/jobs/{job}/cancel", headers=evil), 403, "cross-origin")
            refused(http.post("/jobs", content=body, headers=evil), 403, "cross-origin")
            # an HTML form post from another page on this machine (another port)
            form = {"Origin": f"http://127.0.0.1:{forward.port + 1}",
                    "Content-Type": "application/x-www-form-urlencoded"}
            refused(http.post(f"/jobs/{job}/cancel", content=b"a=1", headers=form), 403,
                    "cross-origin")
            # a rebound name pointing at the forward
            refused(http.get("/jobs", headers={"Host": f"evil.example:{forward.port}"}), 403,
                    "Host")
            # without Origin (an old browser, a script): the body type still decides
            refused(http.post(f"/jobs/{job}/cancel", content=b"{}",
                              headers={"Content-Type": "text/plain"}), 415, "Content-Type")
            assert d.job(job)["state"] == "running"
            assert [j["id"] for j in http.get("/jobs").json()["jobs"]] == [job]
            same = http.post(f"/jobs/{job}/cancel", headers={
                "Origin": base, "Sec-Fetch-Site": "same-origin",
                "Content-Type": "application/json"})
            assert same.status_code == 200, same.text
        assert d.wait(job)["state"] == "cancelled"
    finally:
        forward.close()


def test_the_event_stream_resumes_without_gap_or_repeat(daemons, tmp_path: Path) -> None:
    d = daemons().start()
    http = d.http
    assert http is not None
    job = d.submit_ok(bar_job(400, 0.02))
    d.wait_step(job, 1)

    def read(headers: dict[str, str], count: int) -> tuple[list[int], str, list[str]]:
        steps: list[int] = []
        kinds: list[str] = []
        last = ""
        with http.stream("GET", "/events", headers=headers) as stream:
            kind, carried = "", False
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                    kinds.append(kind)
                elif line.startswith("id: "):
                    last, carried = line[4:], True  # on a batch's last event
                elif line.startswith("data: ") and kind == "step":
                    steps.append(int(line.split('"step":')[1].split(",")[0].rstrip("}")))
                elif line == "":
                    if carried and len(steps) >= count:
                        break  # at the end of a batch: its id covers every step read
                    carried = False
        return steps, last, kinds

    first, last_id, _ = read({}, 20)
    assert first == list(range(first[0], first[0] + len(first)))
    again, _, kinds = read({"Last-Event-ID": last_id}, 5)
    assert kinds[0] == "jobs"  # a fresh list, then the file from where it stopped
    assert again[0] == first[-1] + 1, (first[-3:], again[:3])
    http.post(f"/jobs/{job}/cancel")
    d.wait(job)
