"""A py-spy dump read and told: the stacks of one process, where it is stuck, its record.

Pure functions of py-spy's JSON output (and the file they are written to); the capture
itself, running py-spy against the trainer's tree, is supervisor/stacks.py.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorasup.supervisor.rundir import STACKS_TXT

#: what the report keeps per process: threads, and innermost frames per thread
REPORT_THREADS = 8
REPORT_FRAMES = 5

#: the Python standard library in a frame's path (``.../lib/python3.11/threading.py``)
_STDLIB = re.compile(r"[/\\]lib[/\\]python3\.\d+t?[/\\]")
_SITE = ("site-packages", "dist-packages")
#: py-spy's message when the target holds no Python interpreter
_CAUSE_NUMBER = re.compile(r"^\d+:\s*")
_NOT_PYTHON = ("python version", "python interpreter", "python binary")


@dataclass(frozen=True)
class Frame:
    function: str
    #: the short, package-relative name py-spy shows (``torch/distributed/...py``)
    file: str
    path: str
    line: int | None


@dataclass(frozen=True)
class ThreadStack:
    name: str
    thread_id: int | None
    active: bool | None
    #: innermost first
    frames: tuple[Frame, ...]


@dataclass(frozen=True)
class Target:
    pid: int
    #: ``trainer`` (the process lorasup started), ``rank N`` (RANK in its environment), ``child``
    role: str
    command: str


@dataclass(frozen=True)
class ProcessStack:
    target: Target
    threads: tuple[ThreadStack, ...] = ()
    #: why no stack could be taken (None when it was)
    error: str | None = None

    @property
    def main(self) -> ThreadStack | None:
        """The thread that says where the process is: MainThread, else the first."""
        for thread in self.threads:
            if thread.name == "MainThread":
                return thread
        return self.threads[0] if self.threads else None


def _text(value: Any, default: str = "?") -> str:
    return value if isinstance(value, str) else default


def _maybe_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_dump(text: str) -> list[ThreadStack]:
    """The threads of one ``py-spy dump --json``; anything malformed is skipped, never raised."""
    try:
        records = json.loads(text)
    except ValueError:
        return []
    if not isinstance(records, list):
        return []
    threads: list[ThreadStack] = []
    for record in records:
        if not isinstance(record, dict):
            continue
        raw_frames = record.get("frames")
        frames: list[Frame] = []
        for raw in raw_frames if isinstance(raw_frames, list) else ():
            if not isinstance(raw, dict):
                continue
            path = _text(raw.get("filename"))
            frames.append(Frame(function=_text(raw.get("name")),
                                file=_text(raw.get("short_filename"), path), path=path,
                                line=_maybe_int(raw.get("line"))))
        active = record.get("active")
        threads.append(ThreadStack(
            name=_text(record.get("thread_name"), ""),
            thread_id=_maybe_int(record.get("os_thread_id")) or _maybe_int(
                record.get("thread_id")),
            active=active if isinstance(active, bool) else None,
            frames=tuple(frames)))
    return threads


def explain_failure(stderr: str, returncode: int | None) -> str:
    """One line saying why py-spy took no stack, in its own words where it gave any."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    message = next((line[len("Error:"):].strip() for line in lines if line.startswith("Error:")),
                   None)
    if message is None:
        message = lines[0] if lines else f"py-spy exited with {returncode} and said nothing"
    if "Caused by:" in lines:
        causes = lines[lines.index("Caused by:") + 1:]
        if causes and not causes[0].startswith("Stack backtrace"):
            message += f" ({_CAUSE_NUMBER.sub('', causes[0])})"
    message = message[:300]
    if any(needle in message.lower() for needle in _NOT_PYTHON):
        return f"not a Python process (py-spy: {message})"
    return f"py-spy could not take the stack: {message}"


def is_library(path: str) -> bool:
    """Whether a frame's file is Python's own (threading.py, <frozen ...>) or an installed
    package's (site-packages): not the trainer's code, where the user would look first."""
    return (path.startswith("<frozen") or bool(_STDLIB.search(path))
            or any(site in path for site in _SITE))


def _frame_text(frame: Frame) -> str:
    line = f" (line {frame.line})" if frame.line is not None else ""
    return f"{frame.file}:{frame.function}{line}"


def thread_where(thread: ThreadStack) -> str | None:
    """``file:function (line N)`` of a thread's innermost frame; when that is library code
    (``threading.py:wait``, ``torch/distributed/...:barrier``), also the innermost frame of
    the trainer's own code that called it."""
    if not thread.frames:
        return None
    innermost = thread.frames[0]
    text = _frame_text(innermost)
    if is_library(innermost.path):
        caller = next((f for f in thread.frames[1:] if not is_library(f.path)), None)
        if caller is not None:
            text += f", called from {_frame_text(caller)}"
    return text


def where(stack: ProcessStack) -> str | None:
    """Where the process is: its main thread's :func:`thread_where`."""
    main = stack.main
    return thread_where(main) if main is not None else None


def evidence(stack: ProcessStack, verb: str = "stalled") -> str:
    """The report's line for one process: where it is stuck, or why that is not known."""
    target = stack.target
    found = where(stack)
    if found is not None:
        return f"{verb} in {found} (pid {target.pid}, {target.role})"
    command = target.command[:80]
    why = stack.error or "no Python frames in its main thread"
    return f"no Python stack for pid {target.pid} ({target.role}: {command}): {why}"


def to_record(stack: ProcessStack) -> dict[str, Any]:
    """The small JSON form the ``stacks`` event carries (bounded threads and frames)."""
    target = stack.target
    record: dict[str, Any] = {"pid": target.pid, "role": target.role, "command": target.command}
    if stack.error is not None:
        record["error"] = stack.error
    found = where(stack)
    if found is not None:
        record["where"] = found
    if stack.threads:
        record["threads"] = [
            {"name": thread.name, "active": thread.active, "where": thread_where(thread),
             "frames": [{"function": f.function, "file": f.file, "line": f.line}
                        for f in thread.frames[:REPORT_FRAMES]]}
            for thread in stack.threads[:REPORT_THREADS]]
        if len(stack.threads) > REPORT_THREADS:
            record["threads_left_out"] = len(stack.threads) - REPORT_THREADS
    return record


def format_text(stacks: Sequence[ProcessStack], reason: str, wall_time: float,
                seconds: float) -> str:
    """stacks.txt's section for one capture: every thread of every process, full paths."""
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall_time))
    out = [f"=== stacks at {when} ({reason}); {len(stacks)} process(es), "
           f"taken in {seconds:.2f} s ===", ""]
    for stack in stacks:
        target = stack.target
        out.append(f"--- pid {target.pid} ({target.role}): {target.command}")
        if stack.error is not None:
            out.append(f"no stack: {stack.error}")
        for thread in stack.threads:
            state = "" if thread.active is None else (" (active)" if thread.active else " (idle)")
            out.append(f'Thread {thread.thread_id}{state}: "{thread.name}"')
            for frame in thread.frames:
                line = f":{frame.line}" if frame.line is not None else ""
                out.append(f"    {frame.function} ({frame.path}{line})")
        out.append("")
    return "\n".join(out) + "\n"


def write_stacks_file(run_dir: Path, text: str) -> Path:
    """Append a capture to stacks.txt, never through a planted link or into a foreign file.

    The first capture creates the file (O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600); later ones
    append to it only when it is a plain file of ours with one link.
    """
    path = run_dir / STACKS_TXT
    flags = os.O_WRONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        fd = os.open(path, flags | os.O_APPEND)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_uid != os.geteuid():
            os.close(fd)
            raise OSError(f"{path} is not a plain file of this run; not written") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(text.encode("utf-8", errors="replace"))
    return path
