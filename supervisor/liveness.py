"""Is a run's supervisor still alive? A run without an outcome is running only while the
lorasup process that started it lives; otherwise it is ``lost``.

A pid alone can be reused, so the ``started`` event records the supervisor's pid, its start
time in clock ticks since boot (field 22 of /proc/PID/stat) and the boot id; all three must
match for the supervisor to count as alive.
"""

from __future__ import annotations

import os
from typing import Any

_BOOT_ID = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str | None:
    try:
        with open(_BOOT_ID, encoding="ascii") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def stat_fields(pid: int) -> list[bytes] | None:
    """Fields of /proc/PID/stat after the command name (which may hold spaces and ")"):
    ``[0]`` is the state, ``[1]`` the parent, ``[2]`` the process group, ``[19]`` the
    start time in clock ticks since boot. None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    end = stat.rfind(b")")
    return stat[end + 2:].split() if end >= 0 else None


def process_start_time(pid: int | None = None) -> int | None:
    """Start time of ``pid`` (default: this process) in clock ticks since boot, or None
    when it is gone or a zombie."""
    fields = stat_fields(pid or os.getpid())
    try:
        return int(fields[19]) if fields is not None and fields[0] != b"Z" else None
    except (IndexError, ValueError):
        return None


def running(pid: int) -> bool:
    """The pid exists and is not a zombie."""
    fields = stat_fields(pid)
    return bool(fields) and fields[0] not in (b"Z", b"X")  # type: ignore[index]


def group_exists(pgid: int) -> bool:
    """Whether a live (non-zombie) process is still in the group.

    ``killpg(pgid, 0)`` also succeeds for zombies that an init without reaping keeps
    around, so a positive answer is confirmed by looking at the members.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    wanted = str(pgid).encode()
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = stat_fields(int(name))
            if fields and len(fields) > 2 and fields[2] == wanted and fields[0] not in b"ZX":
                return True
    return False


def supervisor_alive(started: dict[str, Any]) -> bool | None:
    """True/False for a ``started`` record that names its supervisor; None when it does not
    (older runs, another machine's run, no /proc) and nothing can be said."""
    pid = started.get("supervisor_pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    recorded_boot = started.get("boot_id")
    current_boot = boot_id()
    if recorded_boot and current_boot and recorded_boot != current_boot:
        return False  # the machine rebooted since: that process is gone for sure
    start = process_start_time(pid)
    if start is None:
        return False if os.path.isdir("/proc") else None
    recorded = started.get("supervisor_start")
    return recorded is None or recorded == start


def lost_reason(started: dict[str, Any], last_step: int | None) -> str:
    pid = started.get("supervisor_pid")
    at = f"after step {last_step}" if last_step else "before any step"
    return f"its supervisor (lorasup pid {pid}) ended without an outcome, {at}"


def lost_record(started: dict[str, Any] | None, has_outcome: bool,
                last_step: int | None) -> dict[str, Any] | None:
    """An ``outcome`` record saying ``lost`` (never written to events.jsonl) for a run
    without an outcome whose supervisor is gone; None otherwise."""
    if has_outcome or not started or supervisor_alive(started) is not False:
        return None
    return {"kind": "outcome", "outcome": "lost", "reason": lost_reason(started, last_step)}
