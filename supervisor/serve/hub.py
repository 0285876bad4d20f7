"""``GET /events``: one daemon-wide server-sent event stream for the dashboard.

Each connection starts with ``event: jobs`` (the whole job list, as ``GET /jobs`` shows
it), then sends ``event: job`` for every job whose row changed, and the ``events.jsonl``
records of running jobs (``event:`` the record's kind, ``data:`` the record with ``job``
and ``attempt``). The ``id:`` of each batch is the position in every running job's file
(``JOB.ATTEMPT.OFFSET`` joined by ``~``), so a reconnect with ``Last-Event-ID`` continues
each file where it stopped, and gets a fresh job list.

Bounded by construction: the stream is pulled by the client's socket (each ``yield``
waits for the previous bytes to be taken), each tick reads at most :data:`TICK_BYTES` per
job, and a client that fell more than :data:`BEHIND_BYTES` behind a file is moved to its
end with ``event: resync`` (the page refetches the series) instead of being fed the gap.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio

from lorasup.supervisor.serve.errors import ApiError, JobsApi
from lorasup.supervisor.serve.runs import read_lines

TICK_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0
TICK_BYTES = 256 * 1024
BEHIND_BYTES = 4 * 1024 * 1024
#: the most running jobs a Last-Event-ID may name
MAX_POSITIONS = 64
MAX_LINE = 64 * 1024
LIST_LIMIT = 500
POSITION = re.compile(r"([0-9]{1,18})\.([0-9]{1,9})\.([0-9]{1,18})")
#: the fields of a job row whose change is worth an ``event: job``
SHOWN = ("state", "priority", "attempt", "slot", "step", "steps", "loss", "outcome",
         "reason", "waiting", "steps_per_second", "gpu_memory", "gpu_memory_absent")


def parse_positions(text: str | None) -> dict[int, tuple[int, int]] | None:
    """``Last-Event-ID`` → {job: (attempt, offset)}; {} when absent; None when malformed."""
    if not text:
        return {}
    parts = text.split("~")
    if len(parts) > MAX_POSITIONS:
        return None
    out: dict[int, tuple[int, int]] = {}
    for part in parts:
        if part == "-":
            continue
        found = POSITION.fullmatch(part)
        if found is None:
            return None
        out[int(found[1])] = (int(found[2]), int(found[3]))
    return out


def format_positions(positions: dict[int, tuple[int, int]]) -> str:
    return "~".join(f"{j}.{a}.{o}" for j, (a, o) in sorted(positions.items())) or "-"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read(path: Path, offset: int) -> tuple[bytes, int]:
    """Whole lines from ``offset``, at most TICK_BYTES (a longer line is skipped)."""
    return read_lines(path, offset, TICK_BYTES, split_long=False)


def _event(kind: bytes, data: bytes, ident: str | None = None) -> bytes:
    head = b"id: %s\n" % ident.encode() if ident is not None else b""
    return head + b"event: " + kind + b"\ndata: " + data + b"\n\n"


def _changed(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    return old is None or any(old.get(k) != new.get(k) for k in SHOWN)


def _kind(line: bytes) -> bytes:
    start = line.find(b'"kind":"')
    if start < 0:
        return b"record"
    start += 8
    end = line.find(b'"', start)
    kind = line[start:end]
    return kind if kind.replace(b"_", b"").isalnum() and kind not in (
        b"job", b"jobs", b"resync") else b"record"


async def stream(daemon: JobsApi, last_event_id: str | None) -> AsyncIterator[bytes]:
    """The daemon-wide stream (see the module's docstring); raises ApiError(400) before
    the first byte for a malformed ``Last-Event-ID``."""
    positions = parse_positions(last_event_id)
    if positions is None:
        raise ApiError(400, "invalid Last-Event-ID: JOB.ATTEMPT.OFFSET~... as an id: line "
                            "of this stream gave it")
    resumed = bool(last_event_id)
    return _stream(daemon, positions, resumed)


async def _stream(daemon: JobsApi, positions: dict[int, tuple[int, int]], resumed: bool
                  ) -> AsyncIterator[bytes]:
    rows = {job["id"]: job for job in daemon.list_jobs(LIST_LIMIT)}
    first = True
    idle = 0.0
    while True:
        out: list[bytes] = []
        if first:
            jobs = list(rows.values())
            out.append(_event(b"jobs", json.dumps({"jobs": jobs}, separators=(",", ":"),
                                                  default=str).encode()))
        else:
            fresh = {job["id"]: job for job in daemon.list_jobs(LIST_LIMIT)}
            for ident, job in fresh.items():
                if _changed(rows.get(ident), job):
                    out.append(_event(b"job", json.dumps(job, separators=(",", ":"),
                                                         default=str).encode()))
            rows = fresh
        running = [ident for ident, job in rows.items() if job.get("state") == "running"]
        for ident in running:
            try:
                dirs = daemon.run_dirs(ident)
            except ApiError:
                continue
            if not dirs:
                continue
            attempt, path = len(dirs), dirs[-1] / "events.jsonl"
            known = positions.get(ident)
            if known is None or known[0] != attempt:
                # a job already running when the page connected: its history comes from
                # the series; one that started since (or a new attempt): from its start
                start = await anyio.to_thread.run_sync(_size, path) if (
                    first and not resumed) else 0
                positions[ident] = known = (attempt, start)
            offset = known[1]
            size = await anyio.to_thread.run_sync(_size, path)
            if size - offset > BEHIND_BYTES:
                positions[ident] = (attempt, size)
                out.append(_event(b"resync", b'{"job":%d}' % ident))
                continue
            data, after = await anyio.to_thread.run_sync(_read, path, offset)
            positions[ident] = (attempt, after)
            for line in data.splitlines():
                if not line.startswith(b"{") or len(line) < 3 or len(line) > MAX_LINE:
                    continue
                out.append(_event(_kind(line), b'{"job":%d,"attempt":%d,%s'
                                  % (ident, attempt, line[1:])))
        for ident in [j for j in positions if j not in running]:
            del positions[ident]
        first = False
        if out:
            idle = 0.0
            out[-1] = b"id: " + format_positions(positions).encode() + b"\n" + out[-1]
            yield b"".join(out)
        else:
            idle += TICK_SECONDS
            if idle >= KEEPALIVE_SECONDS:
                idle = 0.0
                yield b": keep-alive\n\n"
        await anyio.sleep(TICK_SECONDS)
