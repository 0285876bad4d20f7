"""Where a hung trainer is stuck: the Python stack of every process of its tree, by py-spy.

A stalled run is killed; without its stacks the user learns *that* it hung, never *where*
(a collective, a dataloader worker, a lock). py-spy reads another interpreter's stack from
outside, without the trainer's help; it needs ptrace, which the default Yama scope grants
to an ancestor, and lorasup is the ancestor of the whole tree (it is the child subreaper).

Every process is dumped at once (one ``py-spy dump`` each, concurrently) and the whole
capture is bounded (:data:`STACKS_SECONDS`): a py-spy that does not answer in time is
killed and its process is reported with that reason, so a capture never holds the kill
back by more than that. The full stacks go to ``stacks.txt`` in the run directory; the
innermost frames go into a ``stacks`` event (and so into the report). Reading a dump and
telling where a process is stuck is supervisor/stackdump.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import anyio
import psutil
import structlog
from anyio.abc import ByteReceiveStream

from lorasup.supervisor.events import Stacks
from lorasup.supervisor.process import ProcessTree
from lorasup.supervisor.redact import redact_argv
from lorasup.supervisor.rundir import STACKS_TXT
from lorasup.supervisor.stackdump import (
    Frame,
    ProcessStack,
    Target,
    ThreadStack,
    evidence,
    explain_failure,
    format_text,
    parse_dump,
    to_record,
    where,
    write_stacks_file,
)

__all__ = [
    "STACKS_TXT",
    "Frame",
    "ProcessStack",
    "Target",
    "ThreadStack",
    "capture",
    "evidence",
    "explain_failure",
    "find_py_spy",
    "parse_dump",
    "take_stacks",
    "where",
    "write_stacks_file",
]

log = structlog.get_logger(__name__)

#: the most one capture may take, discovery of the tree included
STACKS_SECONDS = 5.0
#: what one py-spy may write before the rest is dropped (a torch process with a hundred
#: threads writes well under a megabyte)
MAX_OUTPUT_BYTES = 4 * 1024 * 1024
MAX_ERROR_BYTES = 64 * 1024
#: processes dumped per capture (a data-loading tree can have hundreds), and at once
MAX_PROCESSES = 64
CONCURRENT_DUMPS = 16
COMMAND_CHARS = 200


def find_py_spy() -> str | None:
    """py-spy next to this interpreter (the wheel installs it there), else on PATH."""
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = folder / "py-spy"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("py-spy")


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
