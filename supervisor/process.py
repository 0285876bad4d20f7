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
import json
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

from lorasup.supervisor.liveness import group_exists, process_start_time, stat_fields

log = structlog.get_logger(__name__)

_PR_SET_CHILD_SUBREAPER = 36
#: how long the guard may take to say ``pid N`` after it was started
GUARD_START_SECONDS = 20.0
#: once the trainer is gone, how long the guard may take to tell its exit status before it
#: gets a SIGCONT, and as long again after that before lorasup gives up on it (a stopped
#: guard gets its SIGCONT at once)
GUARD_ANSWER_SECONDS = 2.0
#: how often the trainer's leader is looked at while its exit status is awaited
GUARD_POLL_SECONDS = 0.2
#: after ``done``, how long the guard may take to exit (it makes sure the tree is gone)
GUARD_EXIT_SECONDS = 5.0


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


def _stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped (SIGSTOP, SIGTSTP) or held by a tracer."""
    fields = stat_fields(pid)
    return bool(fields) and fields[0] in (b"T", b"t")  # type: ignore[index]


def _continue(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGCONT)


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
    #: the leader's start time (clock ticks since boot): a reused pid is never the leader
    leader_start: int | None = None
    #: why the trainer's exit status is unknown: the guard did not answer (see wait_exit)
    guard_fault: str | None = None
    #: what the guard did not do on its own, for the report (a SIGCONT it needed)
    guard_notes: list[str] = field(default_factory=list)
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

    def leader_running(self) -> bool:
        """The trainer itself still runs (not a zombie, and not another process that got
        its pid)."""
        start = process_start_time(self.pid)
        return start is not None and (self.leader_start is None or start == self.leader_start)

    async def wait_exit(self) -> int | None:
        """The trainer's exit status, or None when the guard would not tell it.

        lorasup never waits on the guard without a deadline: once the trainer is gone (a
        zombie its frozen guard does not reap), the guard gets ``GUARD_ANSWER_SECONDS``
        (none when it is stopped), a SIGCONT, and as long again; then ``guard_fault``
        says why the status is unknown and the caller stops the tree itself.
        """
        told: list[int] = []
        async with anyio.create_task_group() as tg:

            async def listen() -> None:
                told.append(await self.wait())
                tg.cancel_scope.cancel()

            tg.start_soon(listen)
            await self._watch_guard()
            tg.cancel_scope.cancel()
        return told[0] if told else None

    async def _watch_guard(self) -> None:
        """Returns when the guard failed to tell the exit of a trainer that is gone."""
        nudged = False
        since: float | None = None
        while True:
            await anyio.sleep(GUARD_POLL_SECONDS)
            if self.leader_running():
                since = None
                continue
            now = anyio.current_time()
            since = now if since is None else since
            if not nudged and (_stopped(self.guard_pid) or now - since >= GUARD_ANSWER_SECONDS):
                stopped = _stopped(self.guard_pid)
                _continue(self.guard_pid)
                nudged, since = True, now
                note = (f"the guard (pid {self.guard_pid}) was "
                        f"{'stopped' if stopped else 'silent'} after the trainer exited; "
                        "lorasup sent it SIGCONT")
                self.guard_notes.append(note)
                log.warning("guard_not_answering", guard_pid=self.guard_pid, stopped=stopped,
                            action="SIGCONT")
            elif nudged and now - since >= GUARD_ANSWER_SECONDS:
                self.guard_fault = (
                    f"the guard (pid {self.guard_pid}) did not tell the trainer's exit status, "
                    f"even {GUARD_ANSWER_SECONDS:g}s after a SIGCONT; lorasup stopped the "
                    "trainer's tree itself")
                self.guard_notes.append(self.guard_fault)
                log.error("guard_lost", guard_pid=self.guard_pid, stopped=_stopped(
                    self.guard_pid), action="the tree is stopped by lorasup itself")
                return

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
        if self.returncode is None and self.leader_running():
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
        if self.leader_running():
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)

    async def release(self) -> None:
        """Tell the guard the run is over (it kills anything left) and collect it, each
        wait bounded: a guard that does not exit in time (stopped, frozen) is killed."""
        with contextlib.suppress(Exception):
            await self.control.send(b"done\n")
        with contextlib.suppress(Exception):
            await self.control.aclose()
        if self.process.returncode is None:
            _continue(self.guard_pid)  # not reaped yet: the pid is still the guard's
        patience = GUARD_EXIT_SECONDS if self.guard_fault is None else GUARD_POLL_SECONDS
        with anyio.move_on_after(patience, shield=True):
            await self.process.wait()
        if self.process.returncode is None:
            log.warning("guard_killed", guard_pid=self.guard_pid,
                        reason="it did not exit after the run")
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            with anyio.move_on_after(GUARD_EXIT_SECONDS, shield=True):
                await self.process.wait()
        if self.process.returncode is None:
            # Not reapable (held by a tracer, uninterruptible): never wait on it unbounded.
            log.error("guard_not_reaped", guard_pid=self.guard_pid)
            with anyio.CancelScope(shield=True):
                for stream in (self.process.stdout, self.process.stderr):
                    if stream is not None:
                        with contextlib.suppress(Exception):
                            await stream.aclose()
            return
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


async def spawn(argv: Sequence[str], env: Mapping[str, str], cwd: str | None = None,
                then: Sequence[str] | None = None) -> ProcessTree:
    """Start ``argv`` (a list, never a shell) under its guard, in a new session, stdin closed.

    The guard is started in a session of its own (a kill of lorasup's process group does
    not reach it) and starts the trainer; see ``supervisor/guard.py``. ``then``: a command
    the guard runs (in lorasup's working directory) after it killed the tree because
    lorasup died: the report, so that such a run has one.
    """
    ours, theirs = socket.socketpair()
    extra: list[str] = []
    if then is not None:
        extra = ["--then", json.dumps({"argv": list(then), "cwd": os.getcwd(),
                                       "owner": [os.getpid(), process_start_time()]})]
    try:
        process = await anyio.open_process(
            [sys.executable, "-I", "-S", str(GUARD), str(theirs.fileno()), *extra, "--",
             *argv],
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
    first = await _first_line(tree)
    if first is None or not first.startswith("pid "):
        with anyio.move_on_after(GUARD_EXIT_SECONDS):
            await process.wait()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        await process.aclose()
        await control.aclose()
        errno_text = (first or "error 0 the guard ended before it started the trainer").split(
            " ", 2)
        code = int(errno_text[1]) if len(errno_text) > 1 and errno_text[1].isdigit() else 0
        raise SpawnError(code, errno_text[2] if len(errno_text) > 2 else "unknown error")
    tree.pid = int(first.split()[1])
    tree.leader_start = process_start_time(tree.pid)
    return tree


async def _first_line(tree: ProcessTree) -> str | None:
    """The guard's first line (``pid N`` or ``error ...``), waited for with a deadline.

    A guard that does not answer gets a SIGCONT, then as long again; after that whatever
    it started is killed with it and :class:`GuardLost` is raised.
    """
    for patience in (GUARD_START_SECONDS, GUARD_ANSWER_SECONDS):
        with anyio.move_on_after(patience):
            return await _receive_line(tree)
        _continue(tree.guard_pid)
        log.warning("guard_not_answering", guard_pid=tree.guard_pid, action="SIGCONT")
    started: list[psutil.Process] = []
    with contextlib.suppress(psutil.Error):
        started = psutil.Process(tree.guard_pid).children(recursive=True)
    for proc in started:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    with contextlib.suppress(ProcessLookupError):
        tree.process.kill()
    with anyio.move_on_after(GUARD_EXIT_SECONDS, shield=True):
        await tree.process.wait()
    if tree.process.returncode is not None:
        await tree.process.aclose()
    with contextlib.suppress(Exception):
        await tree.control.aclose()
    raise GuardLost(f"the guard (pid {tree.guard_pid}) did not start the trainer within "
                    f"{GUARD_START_SECONDS + GUARD_ANSWER_SECONDS:g}s")


async def wait_gone(tree: ProcessTree, timeout: float, poll: float = 0.05) -> bool:
    """Wait until no process of the tree runs; False when ``timeout`` passed first.

    Nothing here waits on the guard (it may be stopped): the leader counts as gone once it
    is a zombie, and the tree is checked at a short interval for the bounded time of a stop.
    """
    with anyio.move_on_after(timeout):
        while tree.survivors():
            await anyio.sleep(poll)
        return True
    return False
