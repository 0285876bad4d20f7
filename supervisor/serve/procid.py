"""Who a process is, across a restart of the daemon: pid + start time + boot id.

A pid alone is reused by the kernel; together with the start time (clock ticks since boot,
from /proc/<pid>/stat) and the boot id it names one process for the life of the machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass

from lorasup.supervisor.liveness import (
    boot_id,
    group_exists,
    running,
)
from lorasup.supervisor.liveness import process_start_time as start_time

__all__ = ["Identity", "boot_id", "group_exists", "kill_group", "running", "start_time"]


@dataclass(frozen=True)
class Identity:
    pid: int
    start_time: int | None
    boot_id: str | None

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
