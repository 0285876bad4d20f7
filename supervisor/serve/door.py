"""The daemon's outer ASGI layers, what every request passes first: ``Guard`` (bodies over
1 MiB refused unread, any fault answered as a JSON 500 and logged, never a traceback) and
the JSON response every answer is. (The token of a TCP listener: session.py.)"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import structlog

from lorasup.supervisor.serve.errors import ApiError

log = structlog.get_logger("lorasup.serve.api")

#: the largest request body (a job is a few KiB); larger ones get 413 unread
MAX_BODY = 1024 * 1024


def json_response(content: Any, status: int = 200, close: bool = False,
                  headers: dict[str, str] | None = None) -> Any:
    """A JSON response that any value the API holds can be written as: text that is not
    valid Unicode (a lone surrogate from a ``\\ud800`` escape) is sent escaped. ``close``:
    the connection ends after it (a refused body is not read to its end first)."""
    from starlette.responses import Response

    try:
        body = json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        body = json.dumps(content, separators=(",", ":")).encode()
    extra = {**(headers or {}), **({"Connection": "close"} if close else {})}
    return Response(body, status_code=status, media_type="application/json",
                    headers=extra or None)


def _internal(exc: BaseException) -> str:
    """The one line a client gets for a fault of the daemon's own (no traceback)."""
    text = (str(exc).splitlines() or [""])[0][:200]
    return f"internal: {type(exc).__name__}" + (f": {text}" if text else "")


async def send_json(send: Any, status: int, content: dict[str, Any],
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A JSON answer written by an ASGI layer itself (Guard, Shield, TokenAuth), before any
    route; the connection is closed after it (a body may be left unread)."""
    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """The outermost ASGI layer: a body over MAX_BODY is refused (413) from its
    Content-Length before a byte of it is read, or, sent in chunks, as soon as the count
    passes the limit; any exception that reaches here is logged and answered with a JSON
    500 (when the response has not started), so no request ever gets a traceback."""

    def __init__(self, app: Callable[..., Any], max_body: int = MAX_BODY) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = ApiError(413, f"the body is larger than {self.max_body} bytes")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or len(length) > 18):
            await send_json(send, 400, {"error": "invalid Content-Length"})
            return
        if length is not None and int(length) > self.max_body:
            await send_json(send, too_big.status, {"error": too_big.message})
            return
        started = False
        received = 0

        async def counting_receive() -> Any:
            nonlocal received
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body") or b"")
                if received > self.max_body:
                    raise too_big
            return message

        async def watching_send(message: Any) -> None:
            nonlocal started
            if message.get("type") == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except ApiError as exc:  # raised outside starlette's handlers (none today)
            if not started:
                await send_json(send, exc.status, {"error": exc.message})
        except Exception as exc:
            from starlette.requests import ClientDisconnect

            if isinstance(exc, ClientDisconnect):  # the client left before its body came
                log.info("api_client_gone", method=scope.get("method"),
                         path=ascii(str(scope.get("path", ""))[:200]))
                return
            log.error("api_internal_error", method=scope.get("method"),
                      path=ascii(str(scope.get("path", ""))[:200]), error=_internal(exc),
                      exc_info=exc)
            if not started:
                await send_json(send, 500, {"error": _internal(exc)})
