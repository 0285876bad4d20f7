"""File writes in the run directory that never end a run and never follow a planted link.

A full disk, an I/O error, a read-only or vanished directory must not cost a run its
outcome: every write here raises :class:`OSError` only to its caller, which hands it to
:class:`WriteFaults` (counted, logged once per file, named in ``unwritten``) and goes on.

The run directory may sit in a shared ``/tmp``: files are opened with ``O_NOFOLLOW`` (a
symlink someone planted there is an error, not a redirection), created ``0600`` (they can
hold secrets), and replaced atomically through a temporary file with a random name created
with ``O_EXCL`` (a fixed ``*.tmp`` name could be a planted link).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def open_append(path: str | os.PathLike[str], mode: int = 0o600) -> int:
    """An fd appending to ``path`` (created ``mode`` if new), never through a symlink."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC, mode)


def open_new(path: str | os.PathLike[str], mode: int = 0o600) -> int:
    """An fd writing ``path`` from empty (created ``mode`` if new), never through a symlink."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW | _CLOEXEC, mode)


def write_all_fd(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until all of ``data`` is written (a pipe or a full disk writes less)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Readers see the old file or the new one, never half of one.

    The temporary file has a random name and is created with ``O_EXCL`` (``mkstemp``), so
    a link planted in the directory is never written through; ``os.replace`` then swaps
    the name itself (a planted link at ``path`` is replaced, not followed).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            write_all_fd(fd, data)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable; not possible everywhere, not essential
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def exists(path: str | os.PathLike[str]) -> bool:
    """``Path.exists`` that says False instead of raising (ENAMETOOLONG, EACCES, ...)."""
    try:
        os.stat(path)
    except (OSError, ValueError):
        return False
    return True


class WriteFaults:
    """Failed writes by file name: counted, logged once per file, never raised."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.errors: dict[str, str] = {}

    def record(self, name: str, exc: BaseException) -> None:
        count = self.counts.get(name, 0) + 1
        self.counts[name] = count
        if count == 1:
            self.errors[name] = f"{type(exc).__name__}: {exc}"
            log.error("write_failed", file=name, error=str(exc),
                      errno=getattr(exc, "errno", None), action="the run goes on")

    @property
    def unwritten(self) -> list[str]:
        return sorted(self.counts)

    def note(self) -> str | None:
        """One sentence for the report, or None when every write succeeded."""
        if not self.counts:
            return None
        parts = [f"{name} ({self.counts[name]} failed write(s), first: {self.errors[name]})"
                 for name in self.unwritten]
        return "could not write: " + "; ".join(parts)
