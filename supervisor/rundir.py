"""The run directory: the names of the files a run leaves, and how a run claims its folder.

One place for the layout, so that the writer (the sink, the report) and the readers
(``lorasup ls``/``show``, ``lorasup report``, the daemon) agree on it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lorasup.trainers.base import UsageError

#: every record of the run, one JSON line each; created first, with O_EXCL: the claim
EVENTS_JSONL = "events.jsonl"
#: the report, rewritten atomically while the run goes on and at its end
REPORT_JSON = "report.json"
#: every recorded step at full resolution, streamed as the report folds steps
LOSSES_CSV = "losses.csv"
#: the loss curves, drawn at the end in a child process
LOSS_CURVES_PNG = "loss_curves.png"
#: the raw bytes the trainer wrote, both streams
TRAINER_LOG = "trainer.log"
#: the Python stacks of a hung trainer's tree (supervisor/stacks.py)
STACKS_TXT = "stacks.txt"
#: a resumed attempt's link to the job: its total and the save it continues (resume.py)
RESUME_JSON = "resume.json"

__all__ = [
    "EVENTS_JSONL",
    "LOSSES_CSV",
    "LOSS_CURVES_PNG",
    "REPORT_JSON",
    "RESUME_JSON",
    "STACKS_TXT",
    "TRAINER_LOG",
    "claim_run_dir",
]


def _refuse_foreign_symlink(path: Path) -> None:
    """A run directory that is someone else's symlink (a shared /tmp) is not followed."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISLNK(st.st_mode) and st.st_uid != os.getuid():
        raise UsageError(f"{path} is a symlink owned by another user; refusing to follow it")


def claim_run_dir(run_dir: Path, *, private: bool = False) -> None:
    """Make the run directory ours alone: ``events.jsonl`` created with O_EXCL (0600, never
    through a symlink), so of two starts on one directory exactly one gets it. ``private``:
    the directory is made 0700 first, so nothing the run writes in it is reachable by
    another user (whatever the umask and the files' own modes)."""
    _refuse_foreign_symlink(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if private:
            os.chmod(run_dir, 0o700)
        fd = os.open(run_dir / EVENTS_JSONL,
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise UsageError(f"{run_dir} already holds a run ({EVENTS_JSONL}); "
                         "choose another --run-dir") from None
    except OSError as exc:
        reason = exc.strerror or exc
        raise UsageError(f"cannot write the run directory {run_dir}: {reason}") from exc
    os.close(fd)
