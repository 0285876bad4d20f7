"""The jobs read straight from ``lorasup.db`` and the run directories, for ``ps``, ``show``
and ``logs`` while no daemon is running.

The database is opened read-only (``file:...?mode=ro``): nothing here writes, locks a
writer out or creates a file that is not there; WAL lets it read beside a daemon that comes
up meanwhile. The views are the daemon's own (``Views``), with no run being followed: the
progress shown is the last one the daemon recorded.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import quote

from lorasup.supervisor.serve import paths
from lorasup.supervisor.serve.store import GuardedConnection, Store
from lorasup.supervisor.serve.views import Views


class NoDatabase(Exception):
    """There is no job database to read (no daemon ever ran on this state directory)."""


class ReadOnlyStore(Store):
    """A Store that only reads: opened with ``mode=ro``, never created, never set up."""

    def _connect(self) -> GuardedConnection:
        if not self.path.is_file():
            raise NoDatabase(str(self.path))
        st = os.stat(self.path)
        db = sqlite3.connect(f"file:{quote(str(self.path))}?mode=ro", uri=True,
                             isolation_level=None, check_same_thread=False,
                             factory=GuardedConnection)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout=2000")
            db.execute("SELECT 1 FROM jobs LIMIT 1").fetchall()  # a job database at all
        except BaseException:
            db.close()
            raise
        self.identity = (st.st_dev, st.st_ino)
        return db

    def check_file(self) -> None:
        """Nothing to notice: this store never writes."""


class OfflineJobs(Views):
    """The daemon's views of the jobs over a read-only store, with no run followed."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.running: dict[int, Any] = {}
        self.store = ReadOnlyStore(state / paths.DB_NAME)

    def close(self) -> None:
        assert self.store is not None
        self.store.close()
