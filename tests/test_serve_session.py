"""The token of ``--listen`` and what a browser exchanges it for (serve/session.py), and
``--tls-cert/--tls-key``: real daemons, real HTTP(S), a certificate made by trustme."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasup.supervisor.serve.session import cookie_name, session_value
from tests.serve_support import bar_job
from tests.test_serve import invoke

TOKEN = "s3ssion-" + "q" * 24
PAGE = {"Accept": "text/html"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n", encoding="utf-8")
    return path


def refused(response: httpx.Response, status: int, word: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    assert word in response.json()["error"], response.text


def test_the_token_is_exchanged_once_for_a_strict_httponly_cookie(daemons, tmp_path: Path
                                                                   ) -> None:
    port = free_port()
    d = daemons("--listen", f"127.0.0.1:{port}", "--token-file", str(token_file(tmp_path))
                ).start()
    job = d.submit_ok(bar_job(400, 0.05))
    d.wait_step(job, 1)
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=20) as http:
        # a wrong token in the address, or the token on a route that is not a page
        refused(http.get("/?token=nope" + "x" * 24, headers=PAGE), 401, "wrong token")
        refused(http.get(f"/jobs?token={TOKEN}"), 401, "Authorization: Bearer")
        refused(http.get(f"/jobs/{job}/series?token={TOKEN}"), 401, "Authorization")
        assert not http.cookies
        # the exchange: a redirect to the same page without the token, and the cookie
        answer = http.get(f"/jobs/{job}?token={TOKEN}", headers=PAGE)
        assert answer.status_code == 303 and answer.headers["location"] == f"/jobs/{job}"
        cookie = answer.headers["set-cookie"]
        name = cookie_name(port, tls=False)
        assert cookie.startswith(f"{name}={session_value(TOKEN)};"), cookie
        for attribute in ("HttpOnly", "SameSite=Strict", "Path=/"):
            assert attribute in cookie, cookie
        assert "Secure" not in cookie and TOKEN not in cookie
        # the cookie opens the data routes ...
        assert http.get("/jobs").status_code == 200
        assert http.get(f"/jobs/{job}").json()["id"] == job
        assert http.get(f"/jobs/{job}/series?points=10").status_code == 200
        # ... and a change made with it alone needs the CSRF header (JSON is not enough)
        refused(http.post(f"/jobs/{job}/cancel", json={}), 403, "X-Lorasup-CSRF")
        refused(http.post("/jobs", json={"job": bar_job(1, 0.0), "cwd": str(tmp_path)}), 403,
                "X-Lorasup-CSRF")
        assert d.job(job)["state"] == "running"
        assert [j["id"] for j in d.http.get("/jobs").json()["jobs"]] == [job]
    # a wrong cookie, or the right value under another listener's name: 401
    for jar in ({name: "0" * 64}, {cookie_name(port + 1, tls=False): session_value(TOKEN)},
                {name: TOKEN}):
        with httpx.Client(base_url=base, timeout=20, cookies=jar) as http:
            refused(http.get("/jobs"), 401, "bearer")
            refused(http.post(f"/jobs/{job}/cancel", json={},
                              headers={"X-Lorasup-CSRF": "1"}), 401, "bearer")
    # a page fetched with the bearer header gets the cookie too; the API does not
    with httpx.Client(base_url=base, timeout=20,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        assert name in http.get("/", headers=PAGE).headers.get("set-cookie", "")
        assert "set-cookie" not in http.get("/jobs").headers
    with httpx.Client(base_url=base, timeout=20,
                      cookies={name: session_value(TOKEN)}) as http:
        ok = http.post(f"/jobs/{job}/cancel", json={}, headers={"X-Lorasup-CSRF": "1"})
        assert ok.status_code == 200, ok.text
    assert d.wait(job)["state"] == "cancelled"
    assert TOKEN not in d.log.read_text()  # the address that carried it was never logged


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(certificate chain, key, CA) for 127.0.0.1 and localhost."""
    trustme = pytest.importorskip("trustme", reason="pip trustme (the test extra) missing")
    where = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    chain, key, authority = where / "chain.pem", where / "key.pem", where / "ca.pem"
    issued.private_key_pem.write_to_path(str(key))
    issued.cert_chain_pems[0].write_to_path(str(chain))
    for extra in issued.cert_chain_pems[1:]:
        extra.write_to_path(str(chain), append=True)
    ca.cert_pem.write_to_path(str(authority))
    return chain, key, authority


def test_tls_on_listen(daemons, tmp_path: Path, certificate: tuple[Path, Path, Path]) -> None:
    chain, key, authority = certificate
    port = free_port()
    # a wildcard address: allowed without --insecure-listen because TLS is given
    d = daemons("--listen", f"0.0.0.0:{port}", "--token-file", str(token_file(tmp_path)),
                "--tls-cert", str(chain), "--tls-key", str(key)).start()
    base = f"https://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=20, verify=ssl.create_default_context(
            cafile=str(authority))) as https:
        assert https.get("/jobs", headers={"Authorization": f"Bearer {TOKEN}"}
                         ).status_code == 200
        refused(https.get("/jobs"), 401, "bearer")
        answer = https.get(f"/?token={TOKEN}", headers=PAGE)
        assert answer.status_code == 303 and answer.headers["location"] == "/"
        cookie = answer.headers["set-cookie"]
        assert cookie.startswith(f"__Host-lorasup_{port}=") and "; Secure" in cookie, cookie
        assert https.get("/jobs").status_code == 200
        # the origin of an HTTPS page is https://host:port; the http:// one is another
        job = d.submit_ok(bar_job(400, 0.05))
        csrf = {"X-Lorasup-CSRF": "1"}
        refused(https.post(f"/jobs/{job}/cancel", json={}, headers={
            **csrf, "Origin": f"http://127.0.0.1:{port}"}), 403, "cross-origin")
        ok = https.post(f"/jobs/{job}/cancel", json={}, headers={
            **csrf, "Origin": f"https://127.0.0.1:{port}"})
        assert ok.status_code == 200, ok.text
    assert d.wait(job)["state"] == "cancelled"
    # plain HTTP to the TLS port gets no answer from the API
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as plain:
        try:
            status = plain.get("/jobs", headers={"Authorization": f"Bearer {TOKEN}"}
                               ).status_code
        except httpx.HTTPError:
            status = None
        assert status != 200
    assert d.http.get("/healthz").status_code == 200  # the socket is untouched by it


def test_tls_options_are_checked_before_anything_starts(
        tmp_path: Path, certificate: tuple[Path, Path, Path]) -> None:
    chain, key, authority = certificate
    token = str(token_file(tmp_path))
    listen = ("--listen", f"127.0.0.1:{free_port()}", "--token-file", token)
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n", encoding="utf-8")
    for args, word in (
            (("--tls-cert", str(chain), "--tls-key", str(key)), "need --listen"),
            ((*listen, "--tls-cert", str(chain)), "go together"),
            ((*listen, "--tls-cert", str(tmp_path / "none.pem"), "--tls-key", str(key)),
             "cannot load"),
            ((*listen, "--tls-cert", str(broken), "--tls-key", str(key)), "cannot load"),
            ((*listen, "--tls-cert", str(authority), "--tls-key", str(key)), "cannot load")):
        out = invoke(tmp_path, "serve", "--gpus", "none", *args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert word in out.stderr and out.stderr.count("\n") == 1, (args, out.stderr)
    assert not (tmp_path / "state" / "lorasup.db").exists()


def _call(auth: object, scope: dict) -> list[dict]:
    """One request through an ASGI layer, in this process; the messages it sent."""
    import anyio

    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    anyio.run(auth, scope, receive, send)  # type: ignore[arg-type]
    return sent


@given(cookie=st.binary(max_size=300), query=st.binary(max_size=200),
       method=st.sampled_from(["GET", "POST", "HEAD"]), page=st.booleans())
@settings(max_examples=300, deadline=None)
def test_property_no_cookie_or_address_opens_the_api_without_the_secret(
        cookie: bytes, query: bytes, method: str, page: bool) -> None:
    from lorasup.supervisor.serve import dashboard
    from lorasup.supervisor.serve.session import TokenAuth, _cookies

    _cookies(cookie)  # never raises
    reached: list[bool] = []

    async def inner(scope: dict, receive: object, send: object) -> None:
        reached.append(True)

    headers = [(b"cookie", cookie), (b"x-lorasup-csrf", b"1")]
    if page:
        headers.append((b"accept", b"text/html"))
    scope = {"type": "http", "method": method, "path": "/jobs" if not page else "/",
             "raw_path": b"/", "query_string": query, "headers": headers,
             "server": ("127.0.0.1", 8710), "scheme": "http"}
    sent = _call(TokenAuth(inner, TOKEN, is_page=dashboard.is_page,
                           is_public=lambda s: False), scope)
    assert not reached  # neither the token nor the session value was given
    assert sent[0]["status"] == 401


@given(value=st.text(max_size=80))
def test_property_the_right_session_alone_opens_it(value: str) -> None:
    from lorasup.supervisor.serve.session import TokenAuth

    reached: list[bool] = []

    async def inner(scope: dict, receive: object, send: object) -> None:
        reached.append(True)

    good = session_value(TOKEN)
    for given_value in (value, good):
        reached.clear()
        header = f"a=1; {cookie_name(8710, False)}={given_value}".encode("utf-8", "replace")
        _call(TokenAuth(inner, TOKEN, is_page=lambda s: False, is_public=lambda s: False),
              {"type": "http", "method": "GET", "path": "/jobs", "query_string": b"",
               "headers": [(b"cookie", header)], "server": ("127.0.0.1", 8710)})
        assert reached == ([True] if given_value == good else [])
