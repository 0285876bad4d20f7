"""The trainer's process tree: spawn it in its own session, remember every descendant, stop it.

A group signal (``os.killpg``) reaches everything that stayed in the trainer's session,
but launchers such as torchrun start workers in sessions of their own, and once a parent
dies its orphans are no longer findable through it. So lorasup makes itself the child
subreaper (Linux): orphans of the trainer's tree are re-parented to lorasup instead of
init, where a scan still finds them. The tree is scanned while it runs, every descendant
ever seen is remembered, stopping signals the group *and* each of those, and "gone"
means none of them is left.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import anyio
import psutil
import structlog
from anyio.abc import Process

log = structlog.get_logger(__name__)

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux ≥ 3.4); False where the platform has no such thing."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


#: lorasup's own helper processes (the plot child): never part of a trainer's tree
_EXCLUDED: set[int] = set()


def exclude_from_tree(pid: int) -> None:
    """Keep one of lorasup's own children out of every trainer tree (never signalled)."""
    _EXCLUDED.add(pid)


def _reap(pid: int) -> None:
    """Collect an adopted orphan's exit status so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


@dataclass
class ProcessTree:
    """The leader process plus every descendant seen so far."""

    process: Process
    pgid: int
    seen: dict[int, psutil.Process] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def discover(self) -> list[psutil.Process]:
        """Descendants not yet remembered (reads /proc; run it in a worker thread).

        lorasup's own descendants are the trainer's tree (orphans are re-parented to us,
        the subreaper); descendants of remembered processes that were re-parented
        elsewhere are found through those.
        """
        found: dict[int, psutil.Process] = {}
        roots = [psutil.Process(), *list(self.seen.values())]
        for root in roots:
            try:
                for child in root.children(recursive=True):
                    if (child.pid != self.pid and child.pid not in self.seen
                            and child.pid not in _EXCLUDED):
                        found.setdefault(child.pid, child)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return list(found.values())

    def remember(self, processes: list[psutil.Process]) -> list[int]:
        """Add to the tree (on the event loop's thread); returns the pids that were new."""
        new = [p.pid for p in processes if p.pid not in self.seen]
        for proc in processes:
            self.seen.setdefault(proc.pid, proc)
        return new

    def survivors(self) -> list[int]:
        """Pids of the tree that still run (zombies of other parents count as gone)."""
        alive: list[int] = []
        if self.process.returncode is None:
            alive.append(self.pid)
        me = os.getpid()
        for pid, proc in self.seen.items():
            try:
                if not proc.is_running():
                    continue
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
                elif proc.ppid() == me:
                    _reap(pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        if not alive and _group_exists(self.pgid):
            alive.append(-self.pgid)
        return alive

    def signal(self, sig: signal.Signals, only: set[int] | None = None) -> list[int]:
        """Send ``sig`` to the group and every remembered descendant; "already gone" is fine.

        ``only``: just these remembered pids, not the group (for late-found descendants,
        which must not get a second SIGINT when the group already had one).
        """
        reached: list[int] = []
        if only is None:
            try:
                os.killpg(self.pgid, sig)
                reached.append(-self.pgid)
            except ProcessLookupError:
                pass
            except PermissionError:
                log.warning("signal_refused", target="group", pgid=self.pgid, signal=sig.name)
        for pid, proc in self.seen.items():
            if only is not None and pid not in only:
                continue
            try:
                if proc.is_running():
                    proc.send_signal(sig)
                    reached.append(pid)
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            except psutil.AccessDenied:
                log.warning("signal_refused", pid=pid, signal=sig.name)
        return reached


def _group_exists(pgid: int) -> bool:
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
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


async def spawn(argv: Sequence[str], env: Mapping[str, str], cwd: str | None = None) -> ProcessTree:
    """Start ``argv`` (a list, never a shell) in a new session with stdin closed."""
    process = await anyio.open_process(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=dict(env),
        start_new_session=True,
    )
    return ProcessTree(process=process, pgid=process.pid)


async def wait_gone(tree: ProcessTree, timeout: float, poll: float = 0.05) -> bool:
    """Wait until no process of the tree runs; False when ``timeout`` passed first.

    The leader's exit is awaited directly; descendants that are not our children cannot
    be awaited, so they are checked at a short interval for the bounded time of a stop.
    """
    with anyio.move_on_after(timeout):
        await tree.process.wait()
        while tree.survivors():
            await anyio.sleep(poll)
        return True
    return False
