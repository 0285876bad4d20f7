"""Where a hung trainer is stuck: the Python stack of every process of its tree, by py-spy.

A stalled run is killed; without its stacks the user learns *that* it hung, never *where*
(a collective, a dataloader worker, a lock). py-spy reads another interpreter's stack from
outside, without the trainer's help; it needs ptrace, which the default Yama scope grants
to an ancestor, and lorasup is the ancestor of the whole tree (it is the child subreaper).

Every process is dumped at once (one ``py-spy dump`` each, concurrently) and the whole
capture is bounded (:data:`STACKS_SECONDS`): a py-spy that does not answer in time is
killed and its process is reported with that reason, so a capture never holds the kill
back by more than that. The full stacks go to ``stacks.txt`` in the run directory; the
innermost frames go into a ``stacks`` event (and so into the report).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import psutil
import structlog
from anyio.abc import ByteReceiveStream

from lorasup.supervisor.events import Stacks
from lorasup.supervisor.process import ProcessTree
from lorasup.supervisor.redact import redact_argv

log = structlog.get_logger(__name__)

#: the most one capture may take, discovery of the tree included
STACKS_SECONDS = 5.0
STACKS_TXT = "stacks.txt"
#: what one py-spy may write before the rest is dropped (a torch process with a hundred
#: threads writes well under a megabyte)
MAX_OUTPUT_BYTES = 4 * 1024 * 1024
MAX_ERROR_BYTES = 64 * 1024
#: processes dumped per capture (a data-loading tree can have hundreds), and at once
MAX_PROCESSES = 64
CONCURRENT_DUMPS = 16
#: what the report keeps per process: threads, and innermost frames per thread
REPORT_THREADS = 8
REPORT_FRAMES = 5
COMMAND_CHARS = 200

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


# ---------------------------------------------------------------------------- pure parts


def find_py_spy() -> str | None:
    """py-spy next to this interpreter (the wheel installs it there), else on PATH."""
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = folder / "py-spy"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("py-spy")


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


# ---------------------------------------------------------------------------- processes


def _describe(pid: int, proc: psutil.Process | None, role: str) -> Target | None:
    """pid, role and (redacted) command of a live process; None when it is gone."""
    try:
        proc = proc or psutil.Process(pid)
        if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        command = " ".join(redact_argv(proc.cmdline())) or proc.name()
        if role != "trainer":
            rank = proc.environ().get("RANK")
            if rank is not None and rank.isdigit():
                role = f"rank {rank}"
    except psutil.AccessDenied:
        command = "?"
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    return Target(pid=pid, role=role, command=command[:COMMAND_CHARS])


def describe_tree(leader: int, seen: Iterable[tuple[int, psutil.Process]]) -> list[Target]:
    """The live processes of the tree, the trainer first (reads /proc: run in a thread)."""
    targets: list[Target] = []
    first = _describe(leader, None, "trainer")
    if first is not None:
        targets.append(first)
    for pid, proc in seen:
        if len(targets) >= MAX_PROCESSES:
            break
        target = _describe(pid, proc, "child")
        if target is not None:
            targets.append(target)
    return targets


async def _drain(stream: ByteReceiveStream | None, into: bytearray, cap: int) -> None:
    """Read to EOF, keeping at most ``cap`` bytes (py-spy must never block on a full pipe)."""
    if stream is None:
        return
    while True:
        try:
            chunk = await stream.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            return
        if len(into) < cap:
            into.extend(chunk[: cap - len(into)])


async def _spy(py_spy: str, target: Target, results: dict[int, ProcessStack],
               spies: set[int], limiter: anyio.CapacityLimiter) -> None:
    argv = [py_spy, "dump", "--json", "--pid", str(target.pid)]
    env = {**os.environ, "RUST_BACKTRACE": "0"}
    async with limiter:
        try:
            process = await anyio.open_process(argv, stdin=subprocess.DEVNULL,
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                               env=env)
        except OSError as exc:
            results[target.pid] = ProcessStack(target,
                                               error=f"py-spy could not be started: {exc}")
            return
        spies.add(process.pid)
        out, err = bytearray(), bytearray()
        # Leaving this block on cancellation kills py-spy and reaps it.
        async with process:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_drain, process.stdout, out, MAX_OUTPUT_BYTES)
                tg.start_soon(_drain, process.stderr, err, MAX_ERROR_BYTES)
            returncode = await process.wait()
    threads = parse_dump(out.decode("utf-8", errors="replace")) if returncode == 0 else []
    if threads:
        results[target.pid] = ProcessStack(target, threads=tuple(threads))
    elif returncode == 0:
        results[target.pid] = ProcessStack(target, error="py-spy found no Python thread")
    else:
        results[target.pid] = ProcessStack(
            target, error=explain_failure(err.decode("utf-8", errors="replace"), returncode))


async def capture(targets: Sequence[Target], *, py_spy: str | None, seconds: float,
                  spies: set[int] | None = None) -> list[ProcessStack]:
    """One py-spy per target, all at once; whatever has not answered after ``seconds`` is
    killed and reported as such. Never raises for a process that cannot be dumped."""
    if py_spy is None:
        why = "py-spy is not installed (pip install py-spy)"
        return [ProcessStack(target, error=why) for target in targets]
    results: dict[int, ProcessStack] = {}
    spies = set() if spies is None else spies
    limiter = anyio.CapacityLimiter(CONCURRENT_DUMPS)
    with anyio.move_on_after(seconds):
        async with anyio.create_task_group() as tg:
            for target in targets:
                tg.start_soon(_spy, py_spy, target, results, spies, limiter)
    late = f"no stack within the {seconds:g} s bound of a capture"
    return [results.get(target.pid) or ProcessStack(target, error=late) for target in targets]


async def take_stacks(tree: ProcessTree, run_dir: Path, reason: str, *,
                      seconds: float = STACKS_SECONDS,
                      py_spy: str | None = None) -> tuple[Stacks, list[ProcessStack]]:
    """Dump the tree's stacks into stacks.txt; the ``stacks`` event and the stacks.

    Bounded by ``seconds`` in all (the tree scan included), then stacks.txt is written in
    a worker thread. Call it on the event loop's thread (it updates the tree).
    """
    began = anyio.current_time()
    wall = time.time()
    py_spy = py_spy or find_py_spy()
    targets: list[Target] = []
    spies: set[int] = set()
    with anyio.move_on_after(seconds) as scope:
        tree.remember(await anyio.to_thread.run_sync(tree.discover))
        targets = await anyio.to_thread.run_sync(describe_tree, tree.pid,
                                                 list(tree.seen.items()))
    if scope.cancelled_caught:
        why = f"the process tree could not be read within {seconds:g} s"
        stacks = [ProcessStack(Target(tree.pid, "trainer", "?"), error=why)]
    else:
        left = max(0.0, seconds - (anyio.current_time() - began))
        stacks = await capture(targets, py_spy=py_spy, seconds=left, spies=spies)
    # py-spy ran as our child: a scan of the tree meanwhile may have taken it for a trainer's.
    for pid in spies:
        tree.seen.pop(pid, None)
    took = anyio.current_time() - began
    text = format_text(stacks, reason, wall, took)
    written: str | None = None
    try:
        await anyio.to_thread.run_sync(write_stacks_file, run_dir, text)
        written = STACKS_TXT
    except OSError as exc:
        log.error("stacks_write_failed", error=str(exc))
    event = Stacks(reason=reason, processes=tuple(to_record(s) for s in stacks),
                   file=written, seconds=round(took, 3))
    log.warning("stacks_taken", reason=reason, seconds=round(took, 3), file=written,
                where=[evidence(s) for s in stacks[:8]])
    return event, stacks
