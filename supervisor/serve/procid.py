"""Who a process is, across a restart of the daemon: pid + start time + boot id.

A pid alone is reused by the kernel; together with the start time (clock ticks since boot,
from /proc/<pid>/stat) and the boot id it names one process for the life of the machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    """This boot's id; empty where /proc does not have it (then only pid+start time count)."""
    try:
        return BOOT_ID_PATH.read_text(encoding="ascii").strip()
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces and ')')."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes().decode("ascii", "replace")
    except OSError:
        return None
    end = raw.rfind(")")
    return raw[end + 2:].split() if end >= 0 else None


def start_time(pid: int) -> int | None:
    """The process' start time in clock ticks since boot; None when it is gone."""
    fields = _stat_fields(pid)
    # After ")": state is field 3 of stat(5), starttime is field 22 → index 19 here.
    if fields is None or len(fields) < 20:
        return None
    try:
        return int(fields[19])
    except ValueError:
        return None


def running(pid: int) -> bool:
    """The pid exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and bool(fields) and fields[0] not in ("Z", "X")


@dataclass(frozen=True)
class Identity:
    pid: int
    start_time: int | None
    boot_id: str

    @classmethod
    def of(cls, pid: int) -> Identity:
        return cls(pid, start_time(pid), boot_id())

    def alive(self) -> bool:
        """Still this very process, and still running (a zombie has ended)."""
        if self.boot_id and self.boot_id != boot_id():
            return False
        return start_time(self.pid) == self.start_time and running(self.pid)


def kill_group(pgid: int, sig: signal.Signals, not_before_ticks: int | None = None) -> bool:
    """Signal a process group whose leader (pid == pgid) started no earlier than
    ``not_before_ticks``, so a recycled pid is never hit. True when the signal was sent."""
    leader_start = start_time(pgid)
    if leader_start is None and not group_exists(pgid):
        return False
    if leader_start is not None and not_before_ticks is not None and (
            leader_start < not_before_ticks):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
        return True
    return False


def group_exists(pgid: int) -> bool:
    """A live (non-zombie) process is still in the group."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        # state is fields[0], pgrp is fields[2]
        if fields and len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in "ZX":
            return True
    return False
