"""The guard: the trainer's parent, outside lorasup's process group, that never lets the
trainer's tree outlive lorasup.

lorasup can die without a chance to clean up (SIGKILL, the OOM killer, a terminal or CI
runner killing its whole process group). Its trainer runs in a session of its own and would
train on under PID 1. So lorasup does not start the trainer itself: it starts this guard in
a new session (a group kill of lorasup's group does not reach it), and the guard

- makes itself the child subreaper, so every orphan of the trainer's tree (own-session
  grandchildren included) is re-parented to it and stays findable;
- starts the trainer in a session of its own with stdin on /dev/null, the signals lorasup's
  own parent may have ignored or blocked (SIGINT, SIGTERM, SIGHUP, SIGPIPE, SIGQUIT) back at
  their defaults and an empty signal mask, and its stdout/stderr on lorasup's pipes;
- tells lorasup over a socketpair: ``pid N`` once started, ``exit RC`` when the trainer
  exits (RC as ``subprocess`` gives it: negative for a signal), or ``error ERRNO TEXT``;
- and kills the whole tree when that socket reaches end-of-file without lorasup having
  said ``done`` first: lorasup is gone, nobody watches the run any more. SIGTERM to the
  trainer's group and every descendant, one second, then SIGKILL until nothing is left.

It is a stdlib-only script run with ``python -I -S`` (about 10 ms to start), so nothing
of lorasup's environment or site-packages can break it.

    python -I -S guard.py CONTROL_FD -- ARGV...
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import signal
import socket
import subprocess
import sys
import time

_PR_SET_CHILD_SUBREAPER = 36
#: signals that must reach the trainer at their default action, whatever lorasup inherited
_RESET = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE, signal.SIGQUIT,
          signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD)
#: after lorasup vanished: time between SIGTERM and SIGKILL
ORPHAN_GRACE_SECONDS = 1.0
#: how often adopted orphans are reaped (a SIGCHLD also wakes the loop)
REAP_SECONDS = 0.5


def _become_subreaper() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _processes() -> list[tuple[int, bytes, int, int]]:
    """(pid, state, parent, process group) of every process, from /proc (no psutil here)."""
    table: list[tuple[int, bytes, int, int]] = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 2:
            table.append((int(name), fields[0], int(fields[1]), int(fields[2])))
    return table


def _descendants(root: int) -> list[int]:
    """Every live descendant of ``root``."""
    children: dict[int, list[int]] = {}
    for pid, state, parent, _group in _processes():
        if state != b"Z":
            children.setdefault(parent, []).append(pid)
    found: list[int] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            found.append(child)
            stack.append(child)
    return found


def _group_has_live_member(pgid: int) -> bool:
    return any(group == pgid and state != b"Z" for _pid, state, _parent, group in _processes())


class Guard:
    def __init__(self, control: socket.socket, argv: list[str]) -> None:
        self.control = control
        self.argv = argv
        self.leader: int | None = None
        self.leader_code: int | None = None

    def say(self, message: str) -> None:
        with contextlib.suppress(OSError):
            self.control.sendall(message.encode("utf-8", "replace") + b"\n")

    def start(self) -> bool:
        for sig in _RESET:
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        try:
            proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                    start_new_session=True, close_fds=True)
        except OSError as exc:
            self.say(f"error {exc.errno or 0} {exc.strerror or exc}")
            return False
        # Never waited on through Popen: this guard reaps every child itself (waitpid(-1)).
        self._proc = proc
        # Only the trainer's tree may hold lorasup's pipes: their end-of-file then means
        # the tree closed them, not that this guard is still around.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
        self.leader = proc.pid
        self.say(f"pid {proc.pid}")
        return True

    def reap(self) -> None:
        """Collect exited children; the leader's status is passed on to lorasup."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.leader and self.leader_code is None:
                self.leader_code = os.waitstatus_to_exitcode(status)
                self.say(f"exit {self.leader_code}")

    def tree(self) -> list[int]:
        return _descendants(os.getpid())

    def kill_tree(self, graceful: bool) -> None:
        """Signal the trainer's group and every descendant until none is left."""
        if graceful:
            self._signal_all(signal.SIGTERM)
            deadline = time.monotonic() + ORPHAN_GRACE_SECONDS
            while time.monotonic() < deadline and self._alive():
                self.reap()
                time.sleep(0.02)
        for _ in range(500):
            if not self._alive():
                break
            self._signal_all(signal.SIGKILL)
            time.sleep(0.01)
            self.reap()
        self.reap()

    def _alive(self) -> bool:
        self.reap()
        if self.tree():
            return True
        if self.leader is not None:
            try:
                os.killpg(self.leader, 0)
            except OSError:
                return False
            return _group_has_live_member(self.leader)
        return False

    def _signal_all(self, sig: signal.Signals) -> None:
        if self.leader is not None:
            with contextlib.suppress(OSError):
                os.killpg(self.leader, sig)
        for pid in self.tree():
            with contextlib.suppress(OSError):
                os.kill(pid, sig)

    def loop(self) -> int:
        """Until lorasup says ``done`` or vanishes; returns the guard's exit code."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        buffer = b""
        while True:
            self.reap()
            try:
                ready, _, _ = select.select([self.control, wake_r], [], [], REAP_SECONDS)
            except InterruptedError:
                continue
            if wake_r in ready:
                with contextlib.suppress(OSError):
                    os.read(wake_r, 512)
            if self.control not in ready:
                continue
            try:
                data = self.control.recv(512)
            except OSError:
                data = b""
            if not data:
                # lorasup is gone without a word: nobody watches this run any more.
                self.kill_tree(graceful=True)
                return 1
            buffer += data
            if b"done" in buffer:
                # lorasup ended the run and saw the tree gone; make sure of it.
                self.kill_tree(graceful=False)
                return 0


def main(args: list[str]) -> int:
    if len(args) < 3 or args[1] != "--":
        sys.stderr.write("usage: guard.py CONTROL_FD -- ARGV...\n")
        return 2
    control = socket.socket(fileno=int(args[0]))
    _become_subreaper()
    guard = Guard(control, args[2:])
    if not guard.start():
        return 127
    return guard.loop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
