"""Who may use the API on ``--listen`` (TCP): the bearer token, or the browser session it
was exchanged for. The UNIX socket needs neither: its file mode is the authorisation.

- ``Authorization: Bearer <token>``: scripts and curl.
- A browser's first visit carries the token once, in the address of a page
  (``/?token=...`` or ``/jobs/<id>?token=...``). It is answered ``303`` to the same page
  without it, setting an ``HttpOnly; SameSite=Strict`` cookie (``Secure`` and the
  ``__Host-`` prefix under TLS), so the address bar, the history and any Referer never hold
  the token after that first request. A page fetched with the bearer header gets the cookie
  too.
- The cookie holds an HMAC of the token, not the token: stateless (it survives a daemon
  restart) and void as soon as the token changes. Its name carries the listener's port,
  because cookies are shared by every port of a host.
- A request that changes state and is authorised only by the cookie must also carry
  ``X-Lorasup-CSRF``: a browser attaches a cookie on its own, a custom header only the
  page's own script can add (security.Shield already refuses it from other origins).
- The static shell (the pages and their files) holds no data: served to anyone, and a page
  served that way says nothing about which jobs exist (``PUBLIC_KEY`` in the scope).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from lorasup.supervisor.serve.door import send_json
from lorasup.supervisor.serve.security import CSRF_HEADER, SAFE_METHODS

#: set in a request's scope when it was let through without credentials (a page shell)
PUBLIC_KEY = "lorasup.public"
_PURPOSE = b"lorasup dashboard session v1"


async def _refuse(send: Any, status: int, message: str) -> None:
    """A JSON refusal; a 401 names the way in (``WWW-Authenticate: Bearer``)."""
    challenge = [(b"www-authenticate", b"Bearer")] if status == 401 else None
    await send_json(send, status, {"error": message}, challenge)


def session_value(token: str) -> str:
    """What the cookie holds for ``token``."""
    return hmac.new(token.encode(), _PURPOSE, hashlib.sha256).hexdigest()


def cookie_name(port: int | None, tls: bool) -> str:
    base = f"lorasup_{port}" if port else "lorasup"
    return f"__Host-{base}" if tls else base


def _cookies(header: bytes) -> dict[str, str]:
    """``Cookie: a=1; b=2`` as a dict (the first of a repeated name wins)."""
    out: dict[str, str] = {}
    for part in header.decode("latin-1").split(";"):
        name, eq, value = part.strip().partition("=")
        if eq and name and name not in out:
            out[name] = value.strip().strip('"')
    return out


class TokenAuth:
    """ASGI layer of the TCP listener applying the module's rules. ``is_page(scope)``: a
    browser asking for a page; ``is_public(scope)``: served without credentials."""

    def __init__(self, app: Callable[..., Any], token: str, *,
                 is_page: Callable[[dict[str, Any]], bool],
                 is_public: Callable[[dict[str, Any]], bool]) -> None:
        self.app = app
        self.bearer = f"Bearer {token}".encode()
        self.token = token.encode()
        self.session = session_value(token).encode()
        self.is_page = is_page
        self.is_public = is_public

    def _cookie_name(self, scope: dict[str, Any]) -> str:
        """This listener's cookie name (its port; ``__Host-`` under TLS)."""
        server = scope.get("server")
        port = server[1] if isinstance(server, tuple | list) and len(server) > 1 else None
        return cookie_name(port if isinstance(port, int) else None,
                           scope.get("scheme") == "https")

    def _set_cookie(self, scope: dict[str, Any]) -> tuple[bytes, bytes]:
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        value = (f"{self._cookie_name(scope)}={self.session.decode()}; Path=/; HttpOnly; "
                 f"SameSite=Strict{secure}")
        return b"set-cookie", value.encode()

    def _cookie_ok(self, scope: dict[str, Any], headers: dict[bytes, bytes]) -> bool:
        raw = headers.get(b"cookie")
        value = None if raw is None else _cookies(raw).get(self._cookie_name(scope))
        return value is not None and hmac.compare_digest(value.encode(), self.session)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, bytes] = {}
        for name, value in scope.get("headers") or []:
            headers.setdefault(name.lower(), value)
        query = dict(parse_qsl((scope.get("query_string") or b"").decode("latin-1"),
                               keep_blank_values=True))
        if "token" in query:
            await self._exchange(scope, send, query["token"])
            return
        if hmac.compare_digest(headers.get(b"authorization", b""), self.bearer):
            if self.is_page(scope):  # a first visit with the header: the cookie too
                await self.app(scope, receive, self._with_cookie(scope, send))
            else:
                await self.app(scope, receive, send)
            return
        if self._cookie_ok(scope, headers):
            if scope.get("method") not in SAFE_METHODS and CSRF_HEADER not in headers:
                await _refuse(send, 403, "a change made with the dashboard's cookie needs "
                                         "the X-Lorasup-CSRF header")
                return
            await self.app(scope, receive, send)
            return
        if self.is_public(scope):
            await self.app({**scope, PUBLIC_KEY: True}, receive, send)
            return
        await _refuse(send, 401, "a bearer token is required (Authorization: Bearer ..., "
                                 "or open the dashboard once as /?token=...)")

    async def _exchange(self, scope: dict[str, Any], send: Any, given: str) -> None:
        """``?token=``: only on a page, answered with the cookie and a redirect that takes
        the token off the address."""
        if not self.is_page(scope):
            await _refuse(send, 401, "the token goes in an Authorization: Bearer header; "
                                     "?token= is taken only by the dashboard's pages")
            return
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.token):
            await _refuse(send, 401, "wrong token in the address (?token=...)")
            return
        path = scope.get("raw_path") or scope.get("path", "/").encode()
        location = path if path.startswith(b"/") and not path.startswith(b"//") else b"/"
        await send({"type": "http.response.start", "status": 303, "headers": [
            (b"location", location), self._set_cookie(scope), (b"cache-control", b"no-store"),
            (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    def _with_cookie(self, scope: dict[str, Any], send: Any) -> Callable[[Any], Any]:
        cookie = self._set_cookie(scope)

        async def sending(message: Any) -> None:
            if message.get("type") == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), cookie]}
            await send(message)

        return sending
