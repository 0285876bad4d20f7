"""The database file and its faults: a lock held by another process, a full disk, a
damaged, deleted or replaced file. What the store raises for them (StoreUnavailable: the
API answers 503/507 and the daemon waits it out) and how a damaged file is moved aside."""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

#: a write waits this long for a lock held by another process before the store says busy
#: (short: the event loop's thread waits with it; the callers retry with a backoff)
BUSY_MS = 200
#: below this much free space in the state directory new jobs are refused (507)
MIN_FREE = 1 << 20
#: the database files: the main file and SQLite's WAL and shared-memory index
SIDE_FILES = ("-wal", "-shm")


class StoreUnavailable(Exception):
    """The database cannot be written now (locked by another process, disk full, replaced):
    the API answers ``status`` with ``Retry-After``, the daemon retries with a backoff."""

    def __init__(self, status: int, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


def unavailable(exc: BaseException) -> StoreUnavailable | None:
    """What a storage fault means for the user; None for an error that is not one (a bug,
    a bad value: those stay errors of the one job concerned)."""
    if isinstance(exc, StoreUnavailable):
        return exc
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreUnavailable(507, "no space left in the state directory; new jobs are "
                                     "refused until space returns", 5)
    if not isinstance(exc, sqlite3.DatabaseError):
        return None
    text = str(exc).lower()
    if "malformed" in text or "not a database" in text:
        return StoreUnavailable(503, f"the job database is damaged ({exc}); restart the "
                                     "daemon to move it aside and rebuild it", 30)
    if not isinstance(exc, sqlite3.OperationalError):
        return None
    if "locked" in text or "busy" in text:
        return StoreUnavailable(503, "the job database is locked by another process; "
                                     "try again", 1)
    if "full" in text:
        return StoreUnavailable(507, "no space left in the state directory; new jobs are "
                                     "refused until space returns", 5)
    if "i/o" in text or "readonly" in text or "unable to open" in text:
        return StoreUnavailable(503, f"the job database cannot be written: {exc}", 5)
    return None


class GuardedConnection(sqlite3.Connection):
    """A connection whose ``with`` block is one real transaction (``BEGIN IMMEDIATE``: in
    autocommit mode Python's own ``with`` commits nothing) and whose storage faults surface
    as :class:`StoreUnavailable`. ``fault``: the last one, until a write commits again."""

    fault: StoreUnavailable | None = None

    def execute(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:  # type: ignore[override]
        try:
            return super().execute(*args, **kwargs)
        except sqlite3.DatabaseError as exc:
            fault = unavailable(exc)
            if fault is None:
                raise
            self.fault = fault
            raise fault from exc

    def __enter__(self) -> GuardedConnection:
        self.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, kind: Any, value: Any, tb: Any) -> bool:  # type: ignore[override]
        if kind is None:
            try:
                super().execute("COMMIT")
                self.fault = None
                return False
            except sqlite3.OperationalError as exc:
                with contextlib.suppress(sqlite3.Error):
                    super().execute("ROLLBACK")
                fault = unavailable(exc)
                if fault is None:
                    raise
                self.fault = fault
                raise fault from exc
        with contextlib.suppress(sqlite3.Error):
            super().execute("ROLLBACK")
        return False


def _utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def move_aside(path: Path, label: str) -> Path:
    """``path`` and its -wal/-shm renamed to ``<name>.<label>-<UTC time>``; the new name."""
    target = path.with_name(f"{path.name}.{label}-{_utc_stamp()}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{label}-{_utc_stamp()}.{n}")
    for suffix in ("", *SIDE_FILES):
        with contextlib.suppress(FileNotFoundError):
            os.replace(f"{path}{suffix}", f"{target}{suffix}")
    return target


def damage(path: Path) -> str | None:
    """What is wrong with the database file (``PRAGMA quick_check``); None if it is sound
    or absent."""
    if not path.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
            rows = [r[0] for r in db.execute("PRAGMA quick_check").fetchall()]
            if rows != ["ok"]:
                return "; ".join(map(str, rows[:3]))[:300]
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError as exc:
        text = str(exc).lower()
        if "malformed" in text or "not a database" in text or "corrupt" in text:
            return f"{type(exc).__name__}: {exc}"
        return None  # busy, unreadable, no space: not damage; the open itself says what
    except sqlite3.DatabaseError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
