"""The dashboard's routes: the pages (``GET /``, ``/jobs/<id>`` for a browser), their
static files, the series, the log tail, a queued job's priority, the daemon-wide stream.

The pages are static files shipped in the wheel (``static/``: no CDN, no web fonts); they
hold no data, so on ``--listen`` they are served without the token; their data requests
are authorised by the session cookie the token was exchanged for (session.py).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import anyio

from lorasup.supervisor.config import PRIORITY_RANGE
from lorasup.supervisor.serve import curves, hub
from lorasup.supervisor.serve.errors import ApiError, JobsApi
from lorasup.supervisor.serve.runs import LOG_NAME

STATIC_TYPES = {
    "app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8", "uPlot.LICENSE": "text/plain; charset=utf-8",
    "index.html": "text/html; charset=utf-8",
}
DEFAULT_POINTS = 2000
LOG_LINES = 200
#: the trainer's own output, as the run's supervisor writes it (run.py)
TRAINER_LOG = "trainer.log"


def static_bytes(name: str) -> bytes:
    return resources.files("lorasup.supervisor.serve").joinpath("static", name).read_bytes()


def wants_html(headers: Any) -> bool:
    """A browser's navigation: ``Accept`` names text/html (curl, httpx and the CLI don't)."""
    accept = headers.get("accept", "")
    return "text/html" in accept.lower()


def is_page(scope: dict[str, Any]) -> bool:
    """A browser asking for a page (``/`` or ``/jobs/<id>`` with ``Accept: text/html``)."""
    if scope.get("method") not in ("GET", "HEAD"):
        return False
    path = scope.get("path", "")
    if path == "/" or (path.startswith("/jobs/") and path[6:].isdigit()):
        for name, value in scope.get("headers") or []:
            if name.lower() == b"accept" and b"text/html" in value.lower():
                return True
    return False


def is_public(scope: dict[str, Any]) -> bool:
    """Requests served without the token: the static shell (pages and their files), which
    holds no data."""
    if scope.get("method") not in ("GET", "HEAD"):
        return False
    path = scope.get("path", "")
    return (path.startswith("/static/") and path[8:] in STATIC_TYPES) or is_page(scope)


def routes(daemon: JobsApi, job_id: Any, json_response: Any, parse_body: Any) -> list[Any]:
    """starlette routes; ``job_id(request)`` parses the path's id (404 for a bad one); the
    API's own ``json_response`` and ``parse_body`` are handed in (no import cycle)."""
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    cache = curves.CurveCache()

    def page() -> Response:
        return Response(static_bytes("index.html"), media_type=STATIC_TYPES["index.html"],
                        headers={"Cache-Control": "no-cache"})

    async def index(request: Request) -> Response:
        if not wants_html(request.headers):
            return json_response({"dashboard": "/", "jobs": "/jobs", "events": "/events"})
        return page()

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_TYPES or name == "index.html":
            raise ApiError(404, "no such file")
        return Response(static_bytes(name), media_type=STATIC_TYPES[name],
                        headers={"Cache-Control": "no-cache"})

    async def series(request: Request) -> Response:
        ident = job_id(request)
        text = request.query_params.get("points", str(DEFAULT_POINTS))
        if not (text.isascii() and text.isdigit() and 0 < len(text) <= 6 and int(text) > 0):
            raise ApiError(400, f"invalid points {text[:20]!a}: a whole number from 1 "
                                f"to {curves.MAX_POINTS}")
        points = min(int(text), curves.MAX_POINTS)
        dirs = daemon.run_dirs(ident)
        out = await anyio.to_thread.run_sync(cache.series, ident, dirs, points)
        return json_response(out)

    async def tail(request: Request) -> Response:
        ident = job_id(request)
        dirs = daemon.run_dirs(ident)
        name = request.query_params.get("log", "trainer")
        text = "" if not dirs else await anyio.to_thread.run_sync(
            curves.tail_lines, dirs[-1] / (LOG_NAME if name == "lorasup" else TRAINER_LOG),
            LOG_LINES)
        return json_response({"attempt": len(dirs), "lines": text.splitlines()})

    async def priority(request: Request) -> Response:
        ident = job_id(request)
        payload = parse_body(await request.body())
        value = payload.get("priority")
        low, high = PRIORITY_RANGE
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ApiError(400, f"invalid priority: a whole number from {low} to {high}")
        setter = getattr(daemon, "set_priority", None)
        if setter is None:
            raise ApiError(501, "this daemon cannot change a priority")
        return json_response(setter(ident, value))

    async def extend(request: Request) -> Response:
        from lorasup.supervisor.serve.extend import check_steps

        ident = job_id(request)
        steps = check_steps(parse_body(await request.body()).get("steps"))
        extender = getattr(daemon, "extend", None)
        if extender is None:
            raise ApiError(501, "this daemon cannot continue a job")
        return json_response(await extender(ident, steps), 201)

    async def events(request: Request) -> Response:
        given = request.headers.get("last-event-id") or request.query_params.get("from")
        body = await hub.stream(daemon, given)
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return [
        Route("/", index, methods=["GET"]),
        Route("/static/{name}", static, methods=["GET"]),
        Route("/events", events, methods=["GET"]),
        Route("/jobs/{job_id}/series", series, methods=["GET"]),
        Route("/jobs/{job_id}/tail", tail, methods=["GET"]),
        Route("/jobs/{job_id}/priority", priority, methods=["POST"]),
        Route("/jobs/{job_id}/extend", extend, methods=["POST"]),
    ]


def run_page() -> Any:
    from starlette.responses import Response

    return Response(static_bytes("index.html"), media_type=STATIC_TYPES["index.html"],
                    headers={"Cache-Control": "no-cache"})
