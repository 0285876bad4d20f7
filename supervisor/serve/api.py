"""The HTTP API (an ASGI app on starlette, served by uvicorn inside the daemon's loop).

On the UNIX socket, access to the socket (mode 0660) is the authorisation; on the optional
TCP listener every request needs ``Authorization: Bearer <token>``. Errors are JSON:
``{"error": "one line"}``. ``GET /jobs/{id}/events`` streams events.jsonl of every attempt
as server-sent events (``event:`` the kind, ``data:`` the JSON record with its
``attempt``, ``id:`` a resumable position), so a web page can draw live loss curves.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from lorasup.supervisor.serve.daemon import ApiError
from lorasup.supervisor.serve.runs import LOG_NAME
from lorasup.supervisor.serve.store import StoreUnavailable

if TYPE_CHECKING:
    from lorasup.supervisor.serve.daemon import Daemon

#: bytes read per step while streaming a file
STREAM_BLOCK = 256 * 1024
FOLLOW_SECONDS = 0.25
#: an SSE comment this often keeps proxies from closing an idle stream
KEEPALIVE_SECONDS = 15.0


def _read_lines(path: Path, offset: int) -> tuple[bytes, int]:
    """Complete lines from ``offset`` (at most one block); the new offset."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read(STREAM_BLOCK)
    except OSError:
        return b"", offset
    end = data.rfind(b"\n")
    if end < 0:
        # a single line longer than a block is passed through in pieces
        return (data, offset + len(data)) if len(data) == STREAM_BLOCK else (b"", offset)
    return data[:end + 1], offset + end + 1


def _position(text: str | None) -> tuple[int, int]:
    """``Last-Event-ID`` → (attempt index, byte offset); the start when absent or odd."""
    if text:
        left, _, right = text.partition(":")
        if left.isdigit() and right.isdigit():
            return max(int(left) - 1, 0), int(right)
    return 0, 0


async def follow_files(daemon: Daemon, job_id: int, name: str, follow: bool,
                       start: tuple[int, int] = (0, 0)
                       ) -> AsyncIterator[tuple[int, int, bytes] | None]:
    """(attempt number, offset after, lines) of ``name`` in each attempt's run directory, in
    order; None as a keep-alive tick while waiting. Ends when the job is final and read."""
    index, offset = start
    idle = 0.0
    while True:
        dirs = daemon.run_dirs(job_id)
        final = daemon.is_final(job_id)
        moved = False
        while index < len(dirs):
            data, offset_after = await anyio.to_thread.run_sync(
                _read_lines, dirs[index] / name, offset)
            if data:
                offset = offset_after
                moved = True
                yield index + 1, offset, data
                continue
            if index + 1 < len(dirs):
                index, offset = index + 1, 0
                continue
            break
        if not follow or (final and not moved):
            return
        if moved:
            idle = 0.0
        else:
            idle += FOLLOW_SECONDS
            if idle >= KEEPALIVE_SECONDS:
                idle = 0.0
                yield None
        await anyio.sleep(FOLLOW_SECONDS)


def make_app(daemon: Daemon, token: str | None = None) -> Any:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    def job_id(request: Request) -> int:
        text = request.path_params["job_id"]
        if not text.isdigit():
            raise ApiError(404, f"no job {text}")
        return int(text)

    async def submit(request: Request) -> Response:
        try:
            payload = await request.json()
        except ValueError:
            raise ApiError(400, "the body is not JSON") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "the body must be a JSON object")
        return JSONResponse(await daemon.submit(payload), status_code=201)

    async def jobs(request: Request) -> Response:
        limit = request.query_params.get("limit", "")
        return JSONResponse({"jobs": daemon.list_jobs(int(limit) if limit.isdigit() else None)})

    async def job(request: Request) -> Response:
        return JSONResponse(daemon.show(job_id(request)))

    async def cancel(request: Request) -> Response:
        return JSONResponse(daemon.cancel(job_id(request)))

    async def report(request: Request) -> Response:
        dirs = daemon.run_dirs(job_id(request))
        for run_dir in reversed(dirs):
            path = run_dir / "report.json"
            data = await anyio.to_thread.run_sync(_read_or_none, path)
            if data is not None:
                return Response(data, media_type="application/json")
        raise ApiError(404, f"job {job_id(request)} has no report yet")

    def _follow_flag(request: Request) -> bool:
        return request.query_params.get("follow", "1") not in ("0", "false", "no")

    async def events(request: Request) -> Response:
        ident = job_id(request)
        daemon.run_dirs(ident)  # 404 before the stream starts
        start = _position(request.headers.get("last-event-id")
                          or request.query_params.get("from"))

        async def stream() -> AsyncIterator[bytes]:
            async for item in follow_files(daemon, ident, "events.jsonl",
                                           _follow_flag(request), start):
                if item is None:
                    yield b": keep-alive\n\n"
                    continue
                attempt, offset, data = item
                position = offset - len(data)  # the id is the offset after each line
                out: list[bytes] = []
                for line in data.splitlines(keepends=True):
                    position += len(line)
                    line = line.rstrip(b"\r\n")
                    if not line.startswith(b"{") or len(line) < 3:
                        continue
                    kind = _kind(line)
                    out.append(b"id: %d:%d\nevent: %s\ndata: {\"attempt\":%d,%s\n\n"
                               % (attempt, position, kind, attempt, line[1:]))
                yield b"".join(out)
            yield b"event: end\ndata: {}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def logs(request: Request) -> Response:
        ident = job_id(request)
        daemon.run_dirs(ident)
        name = "events.jsonl" if request.query_params.get("events") in ("1", "true") \
            else LOG_NAME

        async def stream() -> AsyncIterator[bytes]:
            async for item in follow_files(daemon, ident, name, _follow_flag(request)):
                if item is not None:
                    yield item[2]

        return StreamingResponse(stream(), media_type="text/plain; charset=utf-8")

    async def metrics(request: Request) -> Response:
        from lorasup.supervisor.serve.metrics import render

        body, content_type = render(daemon)
        return Response(body, media_type=content_type)

    async def healthz(request: Request) -> Response:
        return JSONResponse(daemon.health())

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    async def store_error(request: Request, exc: Exception) -> Response:
        # The database is locked by another process or the disk is full: try again later.
        assert isinstance(exc, StoreUnavailable)
        return JSONResponse({"error": exc.message}, status_code=exc.status,
                            headers={"Retry-After": str(exc.retry_after)})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    routes = [
        Route("/jobs", submit, methods=["POST"]),
        Route("/jobs", jobs, methods=["GET"]),
        Route("/jobs/{job_id}", job, methods=["GET"]),
        Route("/jobs/{job_id}/cancel", cancel, methods=["POST"]),
        Route("/jobs/{job_id}/report", report, methods=["GET"]),
        Route("/jobs/{job_id}/events", events, methods=["GET"]),
        Route("/jobs/{job_id}/log", logs, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={ApiError: api_error,
                                                        HTTPException: http_error,
                                                        StoreUnavailable: store_error})
    return app if token is None else BearerAuth(app, token)


def _kind(line: bytes) -> bytes:
    start = line.find(b'"kind":"')
    if start < 0:
        return b"event"
    start += 8
    end = line.find(b'"', start)
    kind = line[start:end]
    return kind if kind.isalnum() or kind.replace(b"_", b"").isalnum() else b"event"


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


class BearerAuth:
    """ASGI middleware for the TCP listener: ``Authorization: Bearer <token>`` or 401."""

    def __init__(self, app: Callable[..., Any], token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = b'{"error":"a bearer token is required (Authorization: Bearer ...)"}'
                await send({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"),
                    (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def make_server(daemon: Daemon, token: str | None = None) -> Any:
    """A uvicorn server for one socket, without its own signal handling (the daemon's)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            yield

    config = uvicorn.Config(make_app(daemon, token), lifespan="off", log_config=None,
                            access_log=False, ws="none", timeout_graceful_shutdown=1,
                            log_level="warning")
    return Server(config)
