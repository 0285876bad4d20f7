"""The trainer's process tree: spawn it in its own session, remember every descendant, stop it.

A group signal (``os.killpg``) reaches everything that stayed in the trainer's session,
but launchers such as torchrun start workers in sessions of their own, and once a parent
dies its orphans are no longer findable through it. So the trainer's parent is a guard
(``supervisor/guard.py``) that is the child subreaper (Linux): orphans of the trainer's tree
are re-parented to it instead of init, where a scan still finds them, and it kills the tree
if lorasup itself dies. lorasup is a subreaper too, the second line should the guard die.
The tree is scanned while it runs, every descendant ever seen is remembered, stopping
signals the group *and* each of those, and "gone" means none of them is left.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import psutil
import structlog
from anyio.abc import Process, UNIXSocketStream

from lorasup.supervisor.liveness import group_exists, running

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


def _reap(pid: int) -> None:
    """Collect an adopted orphan's exit status so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


class GuardLost(RuntimeError):
    """The guard process ended or stopped talking before the trainer's exit was known."""


@dataclass
class ProcessTree:
    """The trainer (leader) plus every descendant seen so far, behind its guard.

    ``process`` is the guard (see ``supervisor/guard.py``): the trainer's parent, whose
    stdout/stderr pipes the trainer writes to. The leader's pid and exit status come over
    the guard's control socket.
    """

    process: Process
    control: UNIXSocketStream
    pid: int
    seen: dict[int, psutil.Process] = field(default_factory=dict)
    returncode: int | None = None
    _buffer: bytes = b""
    _reading: anyio.Lock = field(default_factory=anyio.Lock)

    @property
    def pgid(self) -> int:
        return self.pid

    @property
    def guard_pid(self) -> int:
        return self.process.pid

    async def wait(self) -> int:
        """The trainer's exit status (negative: killed by that signal), told by the guard."""
        async with self._reading:  # one reader of the control socket at a time
            while self.returncode is None:
                message = await _receive_line(self)
                if message is None:
                    raise GuardLost("the guard ended before the trainer's exit was known")
                if message.startswith("exit "):
                    self.returncode = int(message.split()[1])
        return self.returncode

    def discover(self) -> list[psutil.Process]:
        """Descendants not yet remembered (reads /proc; run it in a worker thread).

        The guard's descendants are the trainer's tree (orphans are re-parented to the
        guard, the subreaper); descendants of remembered processes that were re-parented
        elsewhere are found through those.
        """
        found: dict[int, psutil.Process] = {}
        roots: list[psutil.Process] = list(self.seen.values())
        with contextlib.suppress(psutil.Error):
            roots.insert(0, psutil.Process(self.guard_pid))
        for root in roots:
            try:
                for child in root.children(recursive=True):
                    if child.pid != self.pid and child.pid not in self.seen:
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
        """Pids of the tree that still run (zombies count as gone)."""
        alive: list[int] = []
        if self.returncode is None and running(self.pid):
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
        if not alive and group_exists(self.pgid):
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

    def kill_now(self) -> None:
        """SIGKILL to everything of the tree that is known, synchronously: the last resort."""
        self.signal(signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)

    async def release(self) -> None:
        """Tell the guard the run is over (it kills anything left) and collect it."""
        with contextlib.suppress(Exception):
            await self.control.send(b"done\n")
        with contextlib.suppress(Exception):
            await self.control.aclose()
        with anyio.move_on_after(5.0, shield=True):
            await self.process.wait()
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        with anyio.CancelScope(shield=True):
            await self.process.aclose()



async def _receive_line(tree: ProcessTree) -> str | None:
    """The next line from the guard, or None at end of stream."""
    while b"\n" not in tree._buffer:
        try:
            data = await tree.control.receive(4096)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return None
        tree._buffer += data
    line, _, tree._buffer = tree._buffer.partition(b"\n")
    return line.decode("utf-8", "replace")


class SpawnError(OSError):
    """The trainer could not be started (the guard reported exec's error)."""


GUARD = Path(__file__).with_name("guard.py")


async def spawn(argv: Sequence[str], env: Mapping[str, str], cwd: str | None = None) -> ProcessTree:
    """Start ``argv`` (a list, never a shell) under its guard, in a new session, stdin closed.

    The guard is started in a session of its own (a kill of lorasup's process group does
    not reach it) and starts the trainer; see ``supervisor/guard.py``.
    """
    ours, theirs = socket.socketpair()
    try:
        process = await anyio.open_process(
            [sys.executable, "-I", "-S", str(GUARD), str(theirs.fileno()), "--", *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=dict(env),
            start_new_session=True,
            pass_fds=(theirs.fileno(),),
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    control = await UNIXSocketStream.from_socket(ours)
    tree = ProcessTree(process=process, control=control, pid=0)
    first = await _receive_line(tree)
    if first is None or not first.startswith("pid "):
        await process.wait()
        await process.aclose()
        await control.aclose()
        errno_text = (first or "error 0 the guard ended before it started the trainer").split(
            " ", 2)
        code = int(errno_text[1]) if len(errno_text) > 1 and errno_text[1].isdigit() else 0
        raise SpawnError(code, errno_text[2] if len(errno_text) > 2 else "unknown error")
    tree.pid = int(first.split()[1])
    return tree


async def wait_gone(tree: ProcessTree, timeout: float, poll: float = 0.05) -> bool:
    """Wait until no process of the tree runs; False when ``timeout`` passed first.

    The leader's exit is awaited directly; descendants that are not our children cannot
    be awaited, so they are checked at a short interval for the bounded time of a stop.
    """
    with anyio.move_on_after(timeout):
        with contextlib.suppress(GuardLost):
            await tree.wait()
        while tree.survivors():
            await anyio.sleep(poll)
        return True
    return False
