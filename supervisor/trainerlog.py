"""trainer.log: the raw bytes of both of the trainer's pipes, as they came, unfiltered.

A failing disk never ends a run: a failed write is counted in the sink's tally (logged
once per file), the first one becomes a note in events.jsonl, and the run goes on.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from lorasup.supervisor.events import Note
from lorasup.supervisor.safefs import WriteFaults, open_append, write_all_fd


def fault_note(faults: WriteFaults, name: str, exc: OSError) -> Note | None:
    """Count a failed write of lorasup's own (in the sink's tally, logged once); the first
    one per file also becomes a note in events.jsonl."""
    first = name not in faults.counts
    faults.record(name, exc)
    if not first:
        return None
    reason = exc.strerror or str(exc)
    return Note(message=f"could not write {name}: {reason}; the run goes on")


class TrainerLog:
    """The run's trainer.log; writes to a file that could not be opened are dropped."""

    NAME = "trainer.log"

    def __init__(self, faults: WriteFaults) -> None:
        self.faults = faults
        self._fd: int | None = None

    def open(self, path: Path) -> Note | None:
        """Open it (0600, never through a symlink); a failure is a note, the run goes on."""
        try:
            self._fd = open_append(path)
        except OSError as exc:
            return fault_note(self.faults, path.name, exc)
        return None

    def write(self, chunk: bytes) -> Note | None:
        """Append a read; the note of the first failure, else None."""
        if self._fd is None:
            return None
        try:
            write_all_fd(self._fd, chunk)
        except OSError as exc:
            return fault_note(self.faults, self.NAME, exc)
        return None

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
