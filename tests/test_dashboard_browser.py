"""The dashboard in a real headless Chromium (the system's ``chromium``, driven by pip
``playwright``; never ``playwright install``), against a real daemon on ``--listen`` with
its token (what ``ssh -L`` to the listener gives a laptop). The first visit carries the
token once (``/?token=...``), exchanged for an HttpOnly SameSite=Strict cookie; no request
leaves the daemon's origin, and a page on another port of 127.0.0.1 (same site for cookies)
changes nothing.

Debian: ``apt-get install -y --no-install-recommends chromium fonts-dejavu-core``. Without
a browser the tests are skipped with that line. ``LORASUP_SCREENSHOTS=DIR`` keeps the
screenshots taken on the way (the README's come from there).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.serve_support import bar_job

TOKEN = "br0wser-" + "z" * 24
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no system chromium: apt-get install -y --no-install-recommends "
                    "chromium fonts-dejavu-core")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip playwright missing")
    with sync_api.sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def served(daemons, tmp_path: Path):
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n", encoding="utf-8")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    d = daemons("--listen", f"127.0.0.1:{port}", "--token-file", str(token)).start()
    return d, f"http://127.0.0.1:{port}"


def shot(page: Any, tmp_path: Path, name: str) -> None:
    keep = os.environ.get("LORASUP_SCREENSHOTS")
    target = Path(keep) if keep else tmp_path
    target.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(target / f"{name}.png"), full_page=True)


def test_live_list_run_page_nan_marker_and_cancel(browser, served, tmp_path: Path) -> None:
    d, origin = served
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    # without the token: the shell loads and says what to do; no data
    page.goto(f"{origin}/")
    page.wait_for_selector('#conn:has-text("not signed in")')
    assert context.cookies() == []
    page.goto(f"{origin}/?token={TOKEN}")
    assert page.url == f"{origin}/"  # the exchange took it off the address bar
    page.wait_for_selector("#conn.live")
    [cookie] = context.cookies()
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (True, "Strict", "/")
    assert TOKEN not in cookie["value"]
    assert page.evaluate("document.cookie") == ""  # out of the page's scripts' reach

    # a run that hangs after step 3 (stalled twice: a retry, then failed)
    hung = d.submit_ok(bar_job(20, 0.02, "--hang-after", "3", retries=1,
                               no_output_timeout=1, grace=0.5))
    # a job submitted after the page loaded appears and reaches completed, live
    quick = d.submit_ok(bar_job(20, 0.05))
    row = f'[data-testid=job-row][data-job-id="{quick}"]'
    page.wait_for_selector(row, timeout=10_000)
    page.wait_for_selector(f'{row}[data-state="completed"]', timeout=40_000)
    assert d.wait(hung, timeout=40)["outcome"] == "stalled"

    nan = d.submit_ok(bar_job(60, 0.02, "--nan-at", "40"))
    d.wait(nan)
    long = d.submit_ok(bar_job(3000, 0.05))
    d.wait_step(long, 2)
    queued = d.submit_ok(bar_job(3, 0.0))
    page.wait_for_selector(f'[data-testid=job-row][data-job-id="{queued}"]'
                           '[data-state="queued"]')
    page.wait_for_selector(f'[data-testid=job-row][data-job-id="{long}"] td:nth-child(8)'
                           ':not(:empty)')
    shot(page, tmp_path, "list")
    # the queued job's priority, from the list, with confirmation
    page.click(f'[data-testid=job-row][data-job-id="{queued}"] [data-testid=priority-up]')
    page.click("[data-testid=confirm]")
    page.wait_for_function(f"() => document.querySelector('[data-testid=job-row]"
                           f"[data-job-id=\"{queued}\"] td:nth-child(4)').textContent == '1'")
    assert d.job(queued)["priority"] == 1

    # the hung run: the stall panel, the retry's marker
    page.goto(f"{origin}/jobs/{hung}")
    page.wait_for_selector(".stall:not([hidden])", timeout=10_000)
    page.wait_for_selector('[data-testid=marker][data-kind="resume"]')
    page.wait_for_selector("[data-testid=loss-chart] canvas")
    shot(page, tmp_path, "run-hung")

    # the NaN run: its marker, its outcome
    page.goto(f"{origin}/jobs/{nan}")
    page.wait_for_selector('[data-testid=marker][data-kind="nan"]', timeout=10_000)
    page.wait_for_selector('[data-testid=marker][data-kind="outcome"]')
    page.wait_for_selector("[data-testid=loss-chart] canvas")
    shot(page, tmp_path, "run-nan")

    # a running job: the chart's newest step follows the trainer within 2 s
    page.goto(f"{origin}/jobs/{long}")
    chart = page.locator("[data-testid=loss-chart]")
    page.wait_for_function("() => Number(document.querySelector("
                           "'[data-testid=loss-chart]').dataset.lastStep) > 0")
    page.wait_for_selector("[data-testid=loss-chart] canvas")
    page.wait_for_selector('[data-testid=fact-loss]')
    first = int(chart.get_attribute("data-last-step") or 0)
    printed = max(first, d.job(long)["step"])
    started = time.monotonic()
    page.wait_for_function(f"() => Number(document.querySelector("
                           f"'[data-testid=loss-chart]').dataset.lastStep) > {printed}",
                           timeout=5_000)
    assert time.monotonic() - started < 2.5
    assert int(chart.get_attribute("data-points") or 0) <= 2000 + 4 * 2000
    page.wait_for_function("() => document.querySelector('[data-testid=log-tail]')"
                           ".textContent.includes('steps:')")
    shot(page, tmp_path, "run-live")

    # cancel, with the on-page confirmation: the job ends cancelled, with its report
    page.click("[data-testid=cancel]")
    page.click("[data-testid=confirm]")
    done = d.wait(long, timeout=30)
    assert (done["state"], done["outcome"]) == ("cancelled", "cancelled")
    assert (Path(done["run_dir"]) / "report.json").exists()
    page.wait_for_selector('[data-testid=fact-state]:has-text("cancelled")', timeout=10_000)
    page.wait_for_selector('[data-testid=marker][data-kind="outcome"]', timeout=10_000)

    context.close()
    foreign = [u for u in requests if not u.startswith(origin + "/")]
    assert foreign == []
    # the token was in one request only: the first visit, answered with the redirect
    assert [u for u in requests if "token=" in u] == [f"{origin}/?token={TOKEN}"]


EVIL_PAGE = """<!doctype html><html><body><form id="f" method="POST" target="sink"
action="{origin}/jobs/{job}/cancel"><input name="a" value="1"></form>
<iframe name="sink"></iframe><script>
const opts = {{method: "POST", mode: "no-cors", credentials: "include",
              headers: {{"Content-Type": "text/plain"}}}};
Promise.allSettled([
  fetch("{origin}/jobs/{job}/cancel", Object.assign({{body: "{{}}"}}, opts)),
  fetch("{origin}/jobs", Object.assign({{body: {submit}}}, opts)),
]).then(() => {{ document.getElementById("f").submit(); document.title = "sent"; }});
</script></body></html>"""


def test_a_page_on_another_port_cannot_use_the_session(browser, served) -> None:
    """Cookies are shared by every port of a host, and SameSite treats them as one site: a
    signed-in browser opening a page on another port of 127.0.0.1 sends the session cookie
    with that page's requests. The Origin check and the CSRF header still refuse them."""
    import http.server
    import json
    import threading

    d, origin = served
    job = d.submit_ok(bar_job(400, 0.05))
    d.wait_step(job, 1)
    submit = json.dumps('{"job": {"trainer": "command", "steps": 1, "command": ["true"]}}')
    html = EVIL_PAGE.format(origin=origin, job=job, submit=submit).encode()

    class Evil(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(html)))
            self.end_headers()
            self.wfile.write(html)

        def log_message(self, *args: Any) -> None:
            pass

    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Evil)
    thread = threading.Thread(target=evil.serve_forever, daemon=True)
    thread.start()
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{origin}/?token={TOKEN}")
        page.wait_for_selector("#conn.live")
        assert len(context.cookies()) == 1
        answers: list[tuple[str, int]] = []
        page.on("response", lambda r: answers.append((r.url, r.status)))
        page.goto(f"http://127.0.0.1:{evil.server_address[1]}/")
        page.wait_for_function("() => document.title === 'sent'")
        page.wait_for_function(
            "() => { try { return frames[0].location.href !== 'about:blank'; }"
            " catch (e) { return true; } }")  # the form's answer came (cross-origin now)
        assert d.job(job)["state"] == "running"
        assert [j["id"] for j in d.http.get("/jobs").json()["jobs"]] == [job]
        to_daemon = [status for url, status in answers if url.startswith(origin)]
        assert to_daemon and all(status == 403 for status in to_daemon), answers
    finally:
        context.close()
        evil.shutdown()
        evil.server_close()


def test_the_page_over_tls_signs_in_with_a_secure_cookie(browser, daemons, tmp_path: Path
                                                         ) -> None:
    """``--tls-cert/--tls-key``: the same page over HTTPS; the session cookie is ``Secure``
    with the ``__Host-`` prefix (the certificate is trustme's, so the context skips its
    check; tests/test_serve_session.py checks it with its CA)."""
    trustme = pytest.importorskip("trustme", reason="pip trustme (the test extra) missing")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    issued.private_key_pem.write_to_path(str(key))
    for i, pem in enumerate(issued.cert_chain_pems):
        pem.write_to_path(str(chain), append=i > 0)
    token = tmp_path / "token"
    token.write_text(TOKEN, encoding="utf-8")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    d = daemons("--listen", f"127.0.0.1:{port}", "--token-file", str(token),
                "--tls-cert", str(chain), "--tls-key", str(key)).start()
    job = d.submit_ok(bar_job(5, 0.01))
    d.wait(job)
    origin = f"https://127.0.0.1:{port}"
    context = browser.new_context(ignore_https_errors=True)
    try:
        page = context.new_page()
        page.goto(f"{origin}/?token={TOKEN}")
        assert page.url == f"{origin}/"
        page.wait_for_selector("#conn.live")
        page.wait_for_selector(f'[data-testid=job-row][data-job-id="{job}"]'
                               '[data-state="completed"]')
        [cookie] = context.cookies()
        assert cookie["name"] == f"__Host-lorasup_{port}"
        assert (cookie["secure"], cookie["httpOnly"], cookie["sameSite"]) == (
            True, True, "Strict")
    finally:
        context.close()
