"""A folder of event files followed while the trainer writes them, in the run's event loop.

Trainers create their run folder (and so their event files) after they start, so the
folder is looked at again on every poll; each file is read from where the last poll left
it (:class:`EventFileReader`).
"""

from __future__ import annotations

import inspect
import math
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import anyio
import structlog

from lorasup.supervisor.events import Scalar
from lorasup.supervisor.numbers import read_step
from lorasup.supervisor.tensorboard.records import (
    MAX_RECORD_BYTES,
    EventFileReader,
    ScalarRecord,
)

log = structlog.get_logger()

EVENT_FILE_PREFIX = "events.out.tfevents."
SWEEP_RECORDS = 50_000
"""Records per file per poll in ``EventFileFollower.run``: bounds memory and batch size."""


def find_event_files(root: Path) -> list[Path]:
    """Every ``events.out.tfevents.*`` file under ``root``, sorted by relative path.

    Trainers create their timestamped run folder after they start (e.g.
    ``logs/NAME/<timestamp>/network_train/``), so this is called again on every poll;
    a missing root is simply empty. Symlinked folders are not followed (no cycles).
    """
    root = Path(root)
    found: list[tuple[tuple[str, ...], Path]] = []
    for folder, _dirs, names in os.walk(root):
        for name in names:
            if name.startswith(EVENT_FILE_PREFIX):
                path = Path(folder, name)
                if path.is_file():
                    found.append((path.relative_to(root).parts, path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


#: takes each non-empty batch: synchronous (must not block), or async (awaited, shielded)
Emit = Callable[[list[Scalar]], object]
#: told of an exception a poll raised (the follower goes on); without one, it is raised
OnError = Callable[[Exception], object]


class EventFileFollower:
    """Follows every event file under ``root``, including ones created later.

    ``poll()`` is synchronous and thread-safe; ``run()`` calls it in a worker thread every
    ``interval`` seconds. The engine calls ``poll()`` once more after the trainer exits
    (or lets ``run()`` make its final sweep) so records written just before exit count.

    ``not_before`` (epoch seconds, e.g. the run's start) ignores files last modified
    before it: a trainer may reuse ``logs/NAME/`` and earlier runs' files stay there. A file
    ignored once stays ignored (writers never append to an old event file).
    """

    def __init__(
        self,
        root: Path,
        *,
        source: str = "tensorboard",
        not_before: float | None = None,
        max_record_bytes: int = MAX_RECORD_BYTES,
    ) -> None:
        self.root = Path(root)
        self.source = source
        self.not_before = not_before
        self.max_record_bytes = max_record_bytes
        self.more_pending = False
        """The last poll stopped at its per-file cap somewhere; poll again soon."""
        self._readers: dict[Path, EventFileReader] = {}
        self._ignored: set[Path] = set()
        self._lock = threading.Lock()

    @property
    def files(self) -> list[Path]:
        """The event files found so far, in the order they are read."""
        return list(self._readers)

    @property
    def readers(self) -> list[EventFileReader]:
        return list(self._readers.values())

    @property
    def corrupt_records(self) -> int:
        return sum(reader.corrupt_records for reader in self._readers.values())

    def poll(self, max_records_per_file: int | None = None) -> list[Scalar]:
        """Discover new files and return every scalar written since the last poll.

        With ``max_records_per_file`` a poll reads at most that many records of each file
        and sets ``more_pending`` if any file had more.
        """
        with self._lock:
            self._discover()
            out: list[Scalar] = []
            pending = False
            for path, reader in self._readers.items():
                try:
                    records = reader.read_new(max_records_per_file)
                except OSError as exc:  # permissions, NFS hiccup: try again next poll
                    log.warning("tensorboard.read_failed", path=str(path), error=str(exc))
                    continue
                pending = pending or reader.more_pending
                out.extend(self._scalars(records))
            self.more_pending = pending
            return out

    def _discover(self) -> None:
        for path in find_event_files(self.root):
            if path in self._readers or path in self._ignored:
                continue
            if self.not_before is not None:
                try:
                    mtime = path.stat().st_mtime
                except OSError:
                    continue  # gone again; look next time
                if mtime < self.not_before:
                    self._ignored.add(path)
                    log.info("tensorboard.old_file_ignored", path=str(path), mtime=mtime)
                    continue
            self._readers[path] = EventFileReader(path, max_record_bytes=self.max_record_bytes)
            log.info("tensorboard.file_found", path=str(path))

    def _scalars(self, records: Iterable[ScalarRecord]) -> Iterable[Scalar]:
        source = self.source
        for r in records:
            step = read_step(r.step)
            if step is None:
                continue  # a negative or absurd int64 step is no step of this run
            # proto3 writes no wall_time when it is 0: absent, not the epoch
            wall_time = r.wall_time if math.isfinite(r.wall_time) and r.wall_time > 0 else None
            yield Scalar(tag=r.tag, step=step, value=r.value, source=source,
                         wall_time=wall_time)

    async def run(
        self, emit: Emit, *, interval: float = 1.0, stop: anyio.Event | None = None,
        on_error: OnError | None = None,
    ) -> None:
        """Poll every ``interval`` s and hand each non-empty batch to ``emit``.

        A synchronous ``emit`` must not block (e.g. ``send_nowait`` on a memory object
        stream, a list append); an async one (e.g. ``send`` on a bounded stream, the
        engine's) is awaited, so a slow consumer slows the follower instead of growing
        memory. ``on_error`` is told of an exception a poll raises (odd files must not end
        a run) and the follower goes on; without it, the exception ends ``run``.

        Returns after a final sweep once ``stop`` is set; on cancellation it makes the
        final sweep too (shielded) before re-raising. Each poll is shielded, so
        records already consumed from a file always reach ``emit``. A backlog (a big file
        found late) is read in batches of ``SWEEP_RECORDS`` per file, back to back.
        """
        if interval <= 0:
            raise ValueError("interval must be positive")
        try:
            while stop is None or not stop.is_set():
                await self._sweep(emit, on_error)
                if self.more_pending:
                    await anyio.sleep(0)  # a checkpoint, then the next batch
                elif stop is None:
                    await anyio.sleep(interval)
                else:
                    with anyio.move_on_after(interval):
                        await stop.wait()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._final_sweep(emit, on_error)
            raise
        await self._final_sweep(emit, on_error)

    async def _sweep(self, emit: Emit, on_error: OnError | None) -> None:
        with anyio.CancelScope(shield=True):
            try:
                scalars = await anyio.to_thread.run_sync(self.poll, SWEEP_RECORDS)
            except Exception as exc:
                if on_error is None:
                    raise
                self.more_pending = False  # no backlog loop on a file that fails each time
                on_error(exc)
                return
            if scalars:
                result = emit(scalars)
                if inspect.isawaitable(result):
                    await result

    async def _final_sweep(self, emit: Emit, on_error: OnError | None) -> None:
        await self._sweep(emit, on_error)
        while self.more_pending:
            await self._sweep(emit, on_error)


async def follow_event_files(
    root: Path,
    emit: Emit,
    *,
    interval: float = 1.0,
    stop: anyio.Event | None = None,
    not_before: float | None = None,
) -> EventFileFollower:
    """Follow ``root`` until ``stop`` is set (or cancelled); see ``EventFileFollower.run``."""
    follower = EventFileFollower(root, not_before=not_before)
    await follower.run(emit, interval=interval, stop=stop)
    return follower
