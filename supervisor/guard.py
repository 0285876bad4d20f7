"""The guard: the trainer's parent, outside lorasup's process group, that never lets the
trainer's tree outlive lorasup.

lorasup can die without a chance to clean up (SIGKILL, the OOM killer, a terminal or CI
runner killing its whole process group). Its trainer runs in a session of its own and would
train on under PID 1. So lorasup does not start the trainer itself: it starts this guard in
a new session (a group kill of lorasup's group does not reach it), and the guard

- makes itself the child subreaper, so every orphan of the trainer's tree (own-session
  grandchildren included) is re-parented to it and stays findable;
- ignores SIGTERM, SIGINT and SIGHUP (and SIGPIPE) itself: a cluster scheduler signals every
  process of a job at once, and relaying a stop request to the trainer is lorasup's job;
  only lorasup's death makes the guard act;
- starts the trainer in a session of its own with stdin on /dev/null, the signals lorasup's
  own parent may have ignored or blocked (SIGINT, SIGTERM, SIGHUP, SIGPIPE, SIGQUIT) back at
  their defaults and an empty signal mask, and its stdout/stderr on lorasup's pipes;
- records every process of the trainer's tree as (pid, start time), its kill set, and
  rescans for new descendants every second (the start time, field 22 of /proc/PID/stat,
  makes a reused pid harmless: only the recorded process is ever signalled);
- tells lorasup over a socketpair: ``pid N`` once started, ``exit RC`` when the trainer
  exits (RC as ``subprocess`` gives it: negative for a signal), or ``error ERRNO TEXT``;
- and kills the whole tree when that socket reaches end-of-file without lorasup having
  said ``done`` first: lorasup is gone, nobody watches the run any more. SIGTERM to the
  trainer's group and every process of the kill set, one second, then SIGKILL and rescan
  until no recorded process is alive: the guard never exits before that. Then, given
  ``--then``, a forked reporter runs that command (lorasup's ``report``, so the run has a
  report.json that says ``lost``) with its output on /dev/null, and kills it should it
  outlive a deadline; the guard itself exits at once.

It is a stdlib-only script run with ``python -I -S`` (about 10 ms to start), so nothing
of lorasup's environment or site-packages can break it.

    python -I -S guard.py CONTROL_FD [--then JSON] -- ARGV...

JSON: ``{"argv": [...], "cwd": "...", "owner": [PID, START], "deadline": SECONDS}``: the
command to run after an orphaned kill, run only once lorasup (PID with that start time) is
surely gone, and killed with whatever it started after ``deadline`` (at most 30 s).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
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
#: signals the guard itself ignores: a scheduler's SIGTERM (or ``scancel --signal=USR1``, a
#: time-limit warning) to every process of a job must not end the guard (lorasup relays
#: stop requests); SIGPIPE: lorasup's end is gone
_IGNORED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE, signal.SIGUSR1,
            signal.SIGUSR2)
#: after lorasup vanished: time between SIGTERM and SIGKILL
ORPHAN_GRACE_SECONDS = 1.0
#: how often adopted orphans are reaped (a SIGCHLD also wakes the loop)
REAP_SECONDS = 0.5
#: how often the trainer's tree is rescanned for new processes to record
TRACK_SECONDS = 1.0
#: the longest pause between two SIGKILL rounds (a process in uninterruptible sleep can
#: take long to die; the guard waits for it without burning a CPU)
KILL_PAUSE_MAX_SECONDS = 0.5
#: the command run after an orphaned kill (the report) is killed after this long
THEN_DEADLINE_SECONDS = 30.0


def _become_subreaper() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _stat(pid: int | str) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name: [0] state, [1] parent,
    [2] process group, [19] start time (clock ticks since boot). None: gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
    fields = stat[stat.rfind(b")") + 2:].split()
    return fields if len(fields) > 19 else None


def _start_time(pid: int) -> int | None:
    """Start time of a live (non-zombie) process, None when it is gone or a zombie."""
    fields = _stat(pid)
    if fields is None or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def _live_children() -> dict[int, list[tuple[int, int]]]:
    """parent → [(pid, start time)] of every live process, from /proc (no psutil here)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat(name)
        if fields is None or fields[0] in (b"Z", b"X"):
            continue
        children.setdefault(int(fields[1]), []).append((int(name), int(fields[19])))
    return children


def _descendants(root: int, skip: int | None = None) -> dict[int, int]:
    """pid → start time of every live descendant of ``root`` (not ``skip``'s subtree)."""
    children = _live_children()
    found: dict[int, int] = {}
    stack = [root]
    while stack:
        for pid, start in children.get(stack.pop(), ()):
            if pid != skip:
                found[pid] = start
                stack.append(pid)
    return found


def _trainer_defaults() -> None:
    """In the trainer's child, before exec: default actions and an empty mask, whatever
    lorasup inherited and whatever this guard ignores."""
    for sig in _RESET:
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


class Guard:
    """One trainer's guard: starts it, tells lorasup its pid and exit, and keeps the kill
    set that it empties when lorasup is gone (or says ``done``)."""

    def __init__(self, control: socket.socket, argv: list[str],
                 then: dict[str, object] | None = None) -> None:
        self.control = control
        self.argv = argv
        self.then = then
        self.leader: int | None = None
        self.leader_start: int | None = None
        self.leader_code: int | None = None
        #: the kill set: every process of the trainer's tree seen and not known to have
        #: died, pid → start time
        self.known: dict[int, int] = {}
        #: the command run after an orphaned kill: never part of the kill set
        self.helper: int | None = None
        #: lorasup, as it named itself (pid, start time), else this guard's parent at start
        owner = (then or {}).get("owner")
        if (isinstance(owner, list) and len(owner) == 2
                and all(isinstance(n, int) for n in owner)):
            self.owner, self.owner_start = owner[0], owner[1]
        else:
            self.owner = os.getppid()
            self.owner_start = _start_time(self.owner)

    def say(self, message: str) -> None:
        with contextlib.suppress(OSError):
            self.control.sendall(message.encode("utf-8", "replace") + b"\n",
                                 socket.MSG_NOSIGNAL)

    def start(self) -> bool:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        try:
            proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                    start_new_session=True, close_fds=True,
                                    preexec_fn=_trainer_defaults)
        except (OSError, subprocess.SubprocessError) as exc:
            errno = getattr(exc, "errno", None) or 0
            self.say(f"error {errno} {getattr(exc, 'strerror', None) or exc}")
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
        self.leader_start = _start_time(proc.pid)
        if self.leader_start is not None:
            self.known[proc.pid] = self.leader_start
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

    def track(self) -> None:
        """Record every live descendant (the trainer's tree) in the kill set.

        Recorded processes that died are dropped (a trainer that forks thousands of short
        helpers must not grow the set); one that lives on outside this guard's subtree
        (no subreaper here) stays recorded.
        """
        found = _descendants(os.getpid(), skip=self.helper)
        for pid, start in self.known.items():
            if pid not in found and _start_time(pid) == start:
                found[pid] = start
        self.known = found

    def alive(self) -> dict[int, int]:
        """The recorded processes still alive: same pid *and* same start time."""
        self.reap()
        alive = {pid: start for pid, start in self.known.items() if _start_time(pid) == start}
        # Forget the dead: their pids may be reused by processes that are none of ours.
        self.known = dict(alive)
        return alive

    def kill_tree(self, graceful: bool) -> None:
        """Signal the trainer's group and every recorded process until none is left.

        Never returns while a recorded process is alive: each round rescans for new
        descendants and SIGKILLs every recorded process that still runs.
        """
        self.track()
        if graceful:
            self._signal_all(signal.SIGTERM)
            deadline = time.monotonic() + ORPHAN_GRACE_SECONDS
            while time.monotonic() < deadline and self.alive():
                time.sleep(0.05)
                self.track()
        pause = 0.01
        while True:
            self.track()
            if not self.alive():
                break
            self._signal_all(signal.SIGKILL)
            time.sleep(pause)
            pause = min(pause * 1.5, KILL_PAUSE_MAX_SECONDS)
        self.reap()

    def _signal_all(self, sig: signal.Signals) -> None:
        alive = self.alive()
        if self.leader is not None and self.leader in alive:
            # The group is surely the trainer's while its leader lives: it reaches a
            # process forked since the last scan.
            with contextlib.suppress(OSError):
                os.killpg(self.leader, sig)
        for pid, start in alive.items():
            if _start_time(pid) == start:  # checked again right before: pid reuse is rare
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)

    def owner_gone(self) -> bool:
        return self.owner_start is None or _start_time(self.owner) != self.owner_start

    def report_after(self) -> None:
        """Run ``--then`` in a forked reporter, so the guard itself ends as soon as the
        tree is gone (its job is done); the reporter holds the command's deadline."""
        if not self.then or not self.owner_gone():
            return
        try:
            if os.fork() != 0:
                return
        except OSError:
            return
        try:  # the reporter: re-parented to init once the guard exits
            _become_subreaper()  # not inherited: the command's orphans must stay findable
            self.known = {}
            self.leader = None
            self.run_then()
        finally:
            os._exit(0)

    def run_then(self) -> None:
        """The command lorasup left for after its death (its report), bounded in time."""
        if not self.then or not self.owner_gone():
            return
        argv = self.then.get("argv")
        cwd = self.then.get("cwd")
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            return
        proc: subprocess.Popen[bytes] | None = None
        # lorasup's working directory (where it found its own package), else this one's.
        for where in dict.fromkeys([cwd if isinstance(cwd, str) else None, None]):
            try:
                proc = subprocess.Popen(argv, cwd=where, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True,
                                        close_fds=True, preexec_fn=_trainer_defaults)
                break
            except (OSError, subprocess.SubprocessError):
                continue
        if proc is None:
            return
        self.helper = proc.pid
        limit = self.then.get("deadline")
        if not isinstance(limit, (int, float)) or isinstance(limit, bool) or not limit > 0:
            limit = THEN_DEADLINE_SECONDS
        deadline = time.monotonic() + min(float(limit), THEN_DEADLINE_SECONDS)
        while True:
            try:
                if os.waitpid(proc.pid, os.WNOHANG)[0] == proc.pid:
                    break
            except ChildProcessError:
                break
            if time.monotonic() >= deadline:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(proc.pid, 0)
                break
            time.sleep(0.05)
        # Whatever it left (its own children, orphaned to this subreaper) goes too.
        self.helper = None
        self.known.update(_descendants(os.getpid()))
        self.kill_tree(graceful=False)

    def loop(self) -> int:
        """Until lorasup says ``done`` or vanishes; returns the guard's exit code."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        buffer = b""
        next_track = 0.0
        while True:
            self.reap()
            if time.monotonic() >= next_track:
                self.track()
                next_track = time.monotonic() + TRACK_SECONDS
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
                self.report_after()
                return 1
            buffer = (buffer + data)[-64:]
            if b"done" in buffer:
                # lorasup ended the run and saw the tree gone; make sure of it.
                self.kill_tree(graceful=False)
                return 0


def _parse(args: list[str]) -> tuple[int, dict[str, object] | None, list[str]] | None:
    """CONTROL_FD [--then JSON] -- ARGV... → (fd, then, argv); None when malformed."""
    if not args or not args[0].isdigit():
        return None
    then: dict[str, object] | None = None
    rest = args[1:]
    if len(rest) >= 2 and rest[0] == "--then":
        try:
            loaded = json.loads(rest[1])
        except ValueError:
            return None
        then = loaded if isinstance(loaded, dict) else None
        rest = rest[2:]
    if len(rest) < 2 or rest[0] != "--":
        return None
    return int(args[0]), then, rest[1:]


def main(args: list[str]) -> int:
    for sig in _IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    parsed = _parse(args)
    if parsed is None:
        sys.stderr.write("usage: guard.py CONTROL_FD [--then JSON] -- ARGV...\n")
        return 2
    fd, then, argv = parsed
    control = socket.socket(fileno=fd)
    _become_subreaper()
    guard = Guard(control, argv, then)
    if not guard.start():
        return 127
    return guard.loop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
