"""The HTTP API (an ASGI app on starlette, served by uvicorn inside the daemon's loop).

On the UNIX socket, access to the socket (mode 0660) is the authorisation; on the optional
TCP listener every request needs ``Authorization: Bearer <token>``. Errors are JSON:
``{"error": "one line"}``, for every status; no request, however malformed, gets a
traceback: the outermost layer (``Guard``) turns anything unexpected into a JSON 500 and logs
it. ``GET /jobs/{id}/events`` streams events.jsonl of every attempt as server-sent events
(``event:`` the kind, ``data:`` the JSON record with its ``attempt``, ``id:`` a resumable
position), so a web page can draw live loss curves.

The API is handed a ``JobsApi`` (errors.py), not the daemon: it imports nothing of it.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import structlog

from lorasup.supervisor.serve import dashboard
from lorasup.supervisor.serve.door import Guard, _internal, json_response
from lorasup.supervisor.serve.errors import ApiError, JobsApi
from lorasup.supervisor.serve.runs import LOG_NAME, read_lines
from lorasup.supervisor.serve.security import Shield
from lorasup.supervisor.serve.session import PUBLIC_KEY, TokenAuth
from lorasup.supervisor.serve.store import StoreUnavailable

log = structlog.get_logger("lorasup.serve.api")

#: JSON nesting a job may have ({"job": {"options": {...}}} is 3)
MAX_DEPTH = 32
#: a job id in a path: a plain decimal that fits SQLite's integer
JOB_ID = re.compile(r"[0-9]{1,18}")
#: ``Last-Event-ID`` / ``?from=``: attempt:offset, as the stream writes them
POSITION = re.compile(r"([0-9]{1,9}):([0-9]{1,18})")
#: an ``Idempotency-Key``: visible ASCII (a uuid4 from ``lorasup submit``)
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
#: bytes read per step while streaming a file
STREAM_BLOCK = 256 * 1024
FOLLOW_SECONDS = 0.25
#: an SSE comment this often keeps proxies from closing an idle stream
KEEPALIVE_SECONDS = 15.0


def _read_lines(path: Path, offset: int) -> tuple[bytes, int]:
    """Complete lines from ``offset`` (at most one block; a longer line in pieces)."""
    return read_lines(path, offset, STREAM_BLOCK, split_long=True)


def _position(text: str | None) -> tuple[int, int] | None:
    """``Last-Event-ID`` → (attempt index, byte offset); the start when absent or empty;
    None when malformed (the request is refused: a client that sends a position it did not
    get from us would otherwise silently get the whole stream again)."""
    if not text:
        return 0, 0
    found = POSITION.fullmatch(text)
    if found is None:
        return None
    return max(int(found[1]) - 1, 0), int(found[2])


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (iteratively)."""
    deepest = 0
    todo = [(value, 1)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            if level > MAX_DEPTH:
                return level
            todo.extend((v, level + 1) for v in (item.values() if isinstance(item, dict)
                                                  else item))
    return deepest


def parse_body(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or ApiError(400) naming what is wrong with it."""
    try:
        payload = json.loads(body)
    except RecursionError:
        raise ApiError(400, f"the body is nested too deeply (at most {MAX_DEPTH} levels)"
                       ) from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"the body is not JSON: {exc}") from None
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not UTF-8 text") from None
    except ValueError as exc:  # an integer of more than 4300 digits
        raise ApiError(400, f"the body holds a number too long to read: "
                            f"{str(exc).splitlines()[0][:120]}") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "the body must be a JSON object")
    if _depth(payload) > MAX_DEPTH:
        raise ApiError(400, f"the body is nested too deeply (at most {MAX_DEPTH} levels)")
    return payload


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/")
                                            and media.endswith("+json"))


def _shown(text: str) -> str:
    """A piece of a request in an error message: short, and escaped (no control bytes)."""
    return ascii(text[:40]) + ("..." if len(text) > 40 else "")


async def follow_files(daemon: JobsApi, job_id: int, name: str, follow: bool,
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


def make_app(daemon: JobsApi, token: str | None = None, listen: str | None = None) -> Any:
    """The ASGI app: starlette's routes inside ``Guard`` and ``Shield`` (security.py: Host,
    Origin, CSRF), and ``TokenAuth`` on TCP (session.py). ``listen``: the --listen address,
    whose host the API answers to (by default the daemon's ``listen_address``)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    def job_id(request: Request) -> int:
        text = request.path_params["job_id"]
        if JOB_ID.fullmatch(text) is None:
            raise ApiError(404, f"no job {_shown(text)} (a job id is a plain decimal number)")
        return int(text)

    async def submit(request: Request) -> Response:
        if not _is_json(request.headers.get("content-type", "")):
            raise ApiError(415, "the body must be JSON (Content-Type: application/json): "
                                '{"job": {...}} or {"toml": "..."}')
        key = request.headers.get("idempotency-key")
        if key is not None and IDEMPOTENCY_KEY.fullmatch(key) is None:
            raise ApiError(400, "invalid Idempotency-Key: 1 to 255 visible ASCII characters")
        payload = parse_body(await request.body())
        job, new = await daemon.submit(payload, key)
        return json_response(job, 201 if new else 200)

    async def jobs(request: Request) -> Response:
        counts: dict[str, int | None] = {}
        for name in ("limit", "finished"):
            text = request.query_params.get(name, "")
            if text and not (text.isascii() and text.isdigit() and len(text) <= 9):
                raise ApiError(400, f"invalid {name} {_shown(text)}: a whole number of jobs")
            counts[name] = int(text) if text else None
        return json_response({"jobs": daemon.list_jobs(counts["limit"], counts["finished"])})

    async def job(request: Request) -> Response:
        if dashboard.wants_html(request.headers):  # a browser: the run page
            ident = job_id(request)
            if not request.scope.get(PUBLIC_KEY):  # without the token, no word on the job
                daemon.show(ident)  # a missing job is a JSON 404 for it too
            return dashboard.run_page()
        return json_response(daemon.show(job_id(request)))

    async def cancel(request: Request) -> Response:
        return json_response(daemon.cancel(job_id(request)))

    async def report(request: Request) -> Response:
        ident = job_id(request)
        dirs = daemon.run_dirs(ident)
        for run_dir in reversed(dirs):
            path = run_dir / "report.json"
            data = await anyio.to_thread.run_sync(_read_or_none, path)
            if data is not None:
                return Response(data, media_type="application/json")
        raise ApiError(404, f"job {ident} has no report yet")

    def _follow_flag(request: Request) -> bool:
        return request.query_params.get("follow", "1") not in ("0", "false", "no")

    async def events(request: Request) -> Response:
        ident = job_id(request)
        daemon.run_dirs(ident)  # 404 before the stream starts
        given = request.headers.get("last-event-id") or request.query_params.get("from")
        start = _position(given)
        if start is None:
            raise ApiError(400, f"invalid Last-Event-ID {_shown(given or '')}: "
                                "ATTEMPT:OFFSET as an id: line of this stream gave it")

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
        body, content_type = daemon.metrics()
        return Response(body, media_type=content_type)

    async def healthz(request: Request) -> Response:
        return json_response(daemon.health())

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        body: dict[str, Any] = {"error": exc.message}
        if exc.errors:
            body["errors"] = exc.errors
        return json_response(body, exc.status, close=exc.status == 413)

    async def store_error(request: Request, exc: Exception) -> Response:
        # The database is locked by another process or the disk is full: try again later.
        assert isinstance(exc, StoreUnavailable)
        return json_response({"error": exc.message}, exc.status,
                             headers={"Retry-After": str(exc.retry_after)})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return json_response({"error": str(exc.detail)}, exc.status_code)

    async def internal_error(request: Request, exc: Exception) -> Response:
        # starlette's last resort answers with this, then re-raises to Guard, which logs
        return json_response({"error": _internal(exc)}, 500)

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
        *dashboard.routes(daemon, job_id, json_response, parse_body),
    ]
    app = Starlette(routes=routes, exception_handlers={
        ApiError: api_error, HTTPException: http_error, StoreUnavailable: store_error,
        Exception: internal_error})
    if listen is None:
        given = getattr(daemon, "listen_address", None)
        listen = given if isinstance(given, str) else None
    inner = app if token is None else TokenAuth(app, token, is_page=dashboard.is_page,
                                                is_public=dashboard.is_public)
    return Guard(Shield(inner, listen))


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


def make_server(daemon: JobsApi, token: str | None = None,
                tls: tuple[str, str] | None = None) -> Any:
    """A uvicorn server for one socket, without its own signal handling (the daemon's);
    ``tls``: (certificate, key) files, checked by listening.check_tls."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            yield

    config = uvicorn.Config(make_app(daemon, token), lifespan="off", log_config=None,
                            access_log=False, ws="none", timeout_graceful_shutdown=1,
                            log_level="warning", http=_json_400_protocol(),
                            ssl_certfile=tls[0] if tls else None,
                            ssl_keyfile=tls[1] if tls else None)
    return Server(config)


def _json_400_protocol() -> Any:
    """uvicorn's h11 protocol, answering a request it cannot parse (a malformed request
    line or header) in JSON like every other error. Plain "h11" where uvicorn's internals
    differ from what this was written against."""
    try:
        import h11
        from uvicorn.protocols.http.h11_impl import H11Protocol
    except ImportError:  # pragma: no cover - uvicorn without h11
        return "auto"
    if not hasattr(H11Protocol, "send_400_response"):  # pragma: no cover
        return "h11"

    class JsonErrorsH11(H11Protocol):  # type: ignore[misc]
        def send_400_response(self, msg: str) -> None:
            body = json.dumps({"error": f"bad HTTP request: {msg}"}).encode()
            for event in (
                    h11.Response(status_code=400, reason=b"Bad Request", headers=[
                        (b"content-type", b"application/json"), (b"connection", b"close"),
                        (b"content-length", str(len(body)).encode())]),
                    h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return JsonErrorsH11
