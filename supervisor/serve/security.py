"""The browser-facing rules of the API, checked before any route (an ASGI layer).

A browser is a confused deputy: a page on another origin can make it send requests to the
daemon (through ``ssh -L``, or to ``--listen``), and DNS rebinding can make another site's
name point at 127.0.0.1. So, for every request:

- ``Host`` must be a loopback name (``localhost``, ``127.0.0.1``, ``[::1]``, any port), the
  ``--listen`` host, the address the connection arrived on, or ``lorasup`` (the name the
  CLI sends over the UNIX socket; a single label that no public DNS answers): a rebound
  name is refused (403).
- ``Origin``, when sent, must be this very origin (scheme, host and port: another port on
  127.0.0.1 is another origin); ``Sec-Fetch-Site`` must be ``same-origin`` or ``none``,
  except for a plain top-level navigation to a page (harmless: it changes nothing and the
  other site cannot read the answer). Refused: 403.
- A state-changing request (any method but GET/HEAD) carries what a simple cross-origin
  request cannot: ``Content-Type: application/json`` or an ``X-Lorasup-CSRF`` header;
  else 415. Authorisation is the socket's mode, or on ``--listen`` the bearer token or the
  session cookie it was exchanged for (session.py, which also asks the cookie's changes for
  ``X-Lorasup-CSRF``).

Every answer gets ``Content-Security-Policy: default-src 'self'`` and friends, so the
dashboard can never load anything from another origin.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from lorasup.supervisor.serve.door import send_json

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "lorasup"})
SAFE_METHODS = frozenset({"GET", "HEAD"})
#: a header a cross-origin "simple" request cannot carry
CSRF_HEADER = b"x-lorasup-csrf"
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
     b"form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


def host_name(host: str) -> str | None:
    """The name of a ``Host`` value without its port (``[::1]:8080`` → ``::1``); None when
    it is malformed."""
    host = host.strip().lower()
    if not host or any(c.isspace() or c in "/@?#\\" for c in host):
        return None
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return None
        rest = host[end + 1:]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
        return host[1:end]
    name, colon, port = host.partition(":")
    if colon and not port.isdigit():
        return None
    return name or None


def listen_host(listen: str | None) -> str | None:
    """The host part of ``--listen HOST:PORT`` (None for a wildcard: 0.0.0.0, ::)."""
    if not listen:
        return None
    host = listen.rpartition(":")[0].strip("[]").lower()
    try:
        if ipaddress.ip_address(host).is_unspecified:
            return None
    except ValueError:
        pass
    return host or None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class Shield:
    """ASGI layer applying the module's rules; ``is_navigation`` says which GETs are pages
    (a cross-site link to them is allowed)."""

    def __init__(self, app: Callable[..., Any], listen: str | None = None) -> None:
        self.app = app
        self.allowed = set(LOOPBACK_NAMES)
        extra = listen_host(listen)
        if extra:
            self.allowed.add(extra)

    def refusal(self, scope: dict[str, Any]) -> tuple[int, str] | None:
        """(status, message) for a request that breaks a rule; None when it may pass."""
        headers: dict[bytes, bytes] = {}
        for name, value in scope.get("headers") or []:
            headers.setdefault(name.lower(), value)
        raw_host = headers.get(b"host")
        if raw_host is None:
            return 400, "a Host header is required"
        host_text = raw_host.decode("latin-1")
        name = host_name(host_text)
        server = scope.get("server")
        arrived = server[0].lower() if isinstance(server, tuple | list) and server and \
            isinstance(server[0], str) and _is_ip(server[0]) else None
        if name is None or (name not in self.allowed and name != arrived):
            return 403, (f"refused Host {host_text[:60]!a}: this daemon answers only "
                         "to localhost, 127.0.0.1, [::1] or its --listen host")
        method = scope.get("method", "GET")
        navigation = (method in SAFE_METHODS
                      and headers.get(b"sec-fetch-mode", b"navigate") == b"navigate"
                      and headers.get(b"sec-fetch-dest", b"document") == b"document")
        origin = headers.get(b"origin")
        if origin is not None:
            scheme = scope.get("scheme", "http")
            expected = f"{scheme}://{host_text.strip().lower()}"
            given = origin.decode("latin-1").strip().lower()
            if given != expected and given.removesuffix(":80") != expected.removesuffix(
                    ":80"):
                return 403, (f"refused a cross-origin request (Origin {given[:60]!a}); "
                             "use the dashboard's own page or the CLI")
        site = headers.get(b"sec-fetch-site")
        if site is not None and site not in (b"same-origin", b"none") and not navigation:
            return 403, (f"refused a cross-site request (Sec-Fetch-Site "
                         f"{site.decode('latin-1')[:30]!a})")
        if method not in SAFE_METHODS:
            media = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
            if media != b"application/json" and CSRF_HEADER not in headers:
                return 415, ("a state-changing request needs Content-Type: "
                             "application/json (or an X-Lorasup-CSRF header)")
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = self.refusal(scope)
        if refused is not None:
            status, message = refused
            await send_json(send, status, {"error": message}, SECURITY_HEADERS)
            return

        async def secured_send(message: Any) -> None:
            if message.get("type") == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, secured_send)
