"""One attempt of a job: its own ``lorasup start`` process, followed through its run
directory and its pid — never through pipes, which a restarted daemon would not have.

The supervisor writes its JSON log into ``lorasup.log`` in the run directory and its
events into ``events.jsonl``; the daemon reads the latter a block at a time for progress
and the outcome, and learns the exit from a pidfd (or by polling where there is none).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from lorasup.supervisor.events import read_number
from lorasup.supervisor.safefs import open_append
from lorasup.supervisor.serve.procid import Identity

#: bytes of events.jsonl read per poll; a longer backlog is read over several polls
READ_BLOCK = 1 << 20
#: longest events.jsonl line kept (a longer one is skipped whole)
MAX_LINE = 1 << 20
POLL_SECONDS = 0.5
#: problem lines kept per attempt (for the retry classification)
PROBLEMS_KEPT = 50
LOG_NAME = "lorasup.log"
JOB_FILE = "job.toml"
ATTEMPT_FILE = "attempt.json"
#: the service manager's variables are the daemon's own, never a run's
SERVICE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
               "LISTEN_FDNAMES")


@dataclass
class Progress:
    """What events.jsonl has told so far about one attempt."""

    step: int | None = None
    offset: int = 0
    requested: int | None = None
    loss: float | None = None
    rate: float | None = None
    trainer_pid: int | None = None
    supervisor_pid: int | None = None
    outcome: dict[str, Any] | None = None
    checkpoint_step: int = 0
    sigkill_sent: bool = False
    trainer_returncode: int | None = None
    #: the ``started`` record of this file names another run: nothing here is ours
    foreign: str | None = None
    #: the ``started`` record was read (the run did start)
    started_seen: bool = False
    problems: deque[str] = field(default_factory=lambda: deque(maxlen=PROBLEMS_KEPT))
    _first: tuple[float, int] | None = None

    @property
    def final(self) -> int | None:
        return None if self.requested is None else self.offset + self.requested

    def add(self, record: dict[str, Any]) -> None:
        kind = record.get("kind")
        t = read_number(record.get("t"))
        if kind == "step":
            step = record.get("step")
            if not isinstance(step, int) or isinstance(step, bool):
                return
            if self.step is None or step >= self.step:
                self.step = step
                loss = read_number(record.get("loss"))
                if loss is None:
                    loss = read_number(record.get("avg_loss"))
                if loss is not None:
                    self.loss = loss
                if t is not None:
                    if self._first is None:
                        self._first = (t, step)
                    elif t > self._first[0] and step > self._first[1]:
                        self.rate = (step - self._first[1]) / (t - self._first[0])
        elif kind == "started":
            self.started_seen = True
            pid, steps = record.get("pid"), record.get("steps_requested")
            self.trainer_pid = pid if isinstance(pid, int) else None
            self.requested = steps if isinstance(steps, int) else None
            sup = record.get("supervisor_pid")  # newer engines record their own pid
            self.supervisor_pid = sup if isinstance(sup, int) else None
        elif kind == "resumed":
            step = record.get("step")
            if isinstance(step, int) and self.step is None:
                self.offset = step
                self.checkpoint_step = max(self.checkpoint_step, step)
        elif kind == "checkpoint":
            step = record.get("step")
            if isinstance(step, int):
                self.checkpoint_step = max(self.checkpoint_step, step)
        elif kind == "problem":
            self.problems.append(f"{record.get('problem')}: {record.get('line', '')}"[:500])
        elif kind == "signal" and record.get("signal") == "SIGKILL":
            self.sigkill_sent = True
        elif kind == "exited":
            code = record.get("returncode")
            self.trainer_returncode = code if isinstance(code, int) else None
        elif kind == "outcome":
            self.outcome = record


class EventsFollower:
    """Reads new lines of one events.jsonl; call ``poll`` (blocking I/O) from a thread."""

    def __init__(self, path: Path, run_id: str | None = None,
                 supervisor_pid: int | None = None) -> None:
        self.path = path
        #: the run this file must be of (the id and pid the daemon recorded); a file of any
        #: other run is not read, so its outcome never becomes this attempt's
        self.run_id = run_id
        self.supervisor_pid = supervisor_pid
        self.position = 0
        self._partial = b""
        self._skipping = False
        self.progress = Progress()

    def poll(self, limit: int = READ_BLOCK) -> bool:
        """Read up to ``limit`` new bytes; True when there may be more right away."""
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.position)
                data = fh.read(limit)
        except OSError:
            return False
        if not data:
            return False
        self.position += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LINE:
            self._partial, self._skipping = b"", True
        for line in lines:
            if self._skipping:
                self._skipping = False
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and self._ours(record):
                self.progress.add(record)
        return len(data) == limit

    def _ours(self, record: dict[str, Any]) -> bool:
        if self.progress.foreign is not None:
            return False
        if record.get("kind") != "started":
            return True
        run_id, pid = record.get("run_id"), record.get("supervisor_pid")
        if self.run_id is not None and run_id != self.run_id:
            self.progress.foreign = f"run {str(run_id)[:100]!r}, not {self.run_id!r}"
        elif self.supervisor_pid is not None and isinstance(pid, int) \
                and pid != self.supervisor_pid:
            self.progress.foreign = f"supervisor pid {pid}, not {self.supervisor_pid}"
        if self.progress.foreign is not None:
            self.progress = Progress(foreign=self.progress.foreign)
            return False
        return True

    def drain(self) -> None:
        while self.poll():
            pass


def child_environment(devices: tuple[str, ...] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_ENV}
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # the same numbering as NVML's
    return env


class RunDirTaken(Exception):
    """The run directory holds another run already."""


def claim_run_dir(run_dir: Path, exclusive: bool) -> None:
    """Make the attempt's run directory (0700). ``exclusive``: a name of the daemon's own,
    which must not exist yet (``mkdir`` is the claim: of two daemons on one logs directory
    exactly one gets it); else the job's own ``run_dir``, which may exist but must not hold
    a run (``lorasup start`` claims its events.jsonl with O_EXCL). Blocking: a thread."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        run_dir.mkdir(mode=0o700)
    except FileExistsError:
        if exclusive:
            raise RunDirTaken(f"{run_dir} exists already") from None
        if os.path.lexists(run_dir / "events.jsonl"):
            raise RunDirTaken(f"{run_dir} already holds a run (events.jsonl); "
                              "choose another run_dir") from None
        return
    os.chmod(run_dir, 0o700)  # whatever the umask


def spawn_supervisor(run_dir: Path, job_file_text: str, attempt_info: dict[str, Any],
                     cwd: str, env: dict[str, str], umask: int = -1
                     ) -> subprocess.Popen[bytes]:
    """Start ``lorasup start`` for one attempt (its run directory claimed), in its own
    session, logging into the run directory (blocking: call from a worker thread).
    ``umask``: the one the run gets (the user's, not the daemon's own 077)."""
    (run_dir / JOB_FILE).write_text(job_file_text, encoding="utf-8")
    (run_dir / ATTEMPT_FILE).write_text(json.dumps(attempt_info, indent=1) + "\n",
                                        encoding="utf-8")
    argv = [sys.executable, "-m", "lorasup", "start", "--config", str(run_dir / JOB_FILE),
            "--run-dir", str(run_dir), "--log-format", "json"]
    log_fd = open_append(run_dir / LOG_NAME, 0o600)  # the README's promise, any umask
    try:
        os.fchmod(log_fd, 0o600)
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_fd,
                                stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                start_new_session=True, umask=umask)
    finally:
        os.close(log_fd)


def _reap(pid: int) -> int | None:
    """Exit code of our own child (negative: killed by that signal); None if not ours."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status)


async def wait_exit(identity: Identity, own_child: bool) -> int | None:
    """Until the process ends; its exit code when it is our child, else None."""
    pidfd_open = getattr(os, "pidfd_open", None)
    fd: int | None = None
    if pidfd_open is not None:
        with contextlib.suppress(OSError):
            fd = pidfd_open(identity.pid)
    try:
        # The pid was verified against its start time *after* the fd was taken, so the fd
        # is this very process (a recycled pid fails the check).
        if fd is not None and (own_child or identity.alive()):
            await anyio.wait_readable(fd)
        else:
            while identity.alive():
                await anyio.sleep(POLL_SECONDS)
    finally:
        if fd is not None:
            os.close(fd)
    if own_child:
        return await anyio.to_thread.run_sync(_reap, identity.pid)
    return None


def find_supervisor(run_dir: Path, pid_hint: int | None = None) -> Identity | None:
    """The ``lorasup start`` process of this run directory, for a daemon that died between
    spawning it and recording its pid: the pid the run's events name (``supervisor_pid``,
    where the engine records it), else a scan of /proc for a command line naming the run
    directory (blocking: call from a worker thread)."""
    wanted = os.fsencode(str(run_dir))
    candidates = [pid_hint] if pid_hint is not None else []
    with contextlib.suppress(OSError):
        candidates += [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    for pid in candidates:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"start" in argv and wanted in argv and b"--run-dir" in argv:
            identity = Identity.of(pid)
            if identity.alive():
                return identity
    return None


def usage_error(run_dir: Path) -> str | None:
    """The ``lorasup: error: ...`` line a refused ``lorasup start`` left in its log."""
    try:
        with (run_dir / LOG_NAME).open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(fh.tell() - 8192, 0))
            tail = fh.read().decode("utf-8", "replace")
    except OSError:
        return None
    errors = [line for line in tail.splitlines() if line.startswith("lorasup: error: ")]
    return errors[-1].removeprefix("lorasup: error: ")[:500] if errors else None


def read_lines(path: Path, offset: int, block: int, *, split_long: bool) -> tuple[bytes, int]:
    """Complete lines of ``path`` from ``offset``, at most ``block`` bytes; the new offset.

    A single line longer than a block is passed on in pieces (``split_long``: a raw log
    that must lose nothing) or skipped (a stream of JSON records, where half a record is
    worth nothing). A file that cannot be read gives nothing, at the same offset.
    """
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read(block)
    except OSError:
        return b"", offset
    end = data.rfind(b"\n")
    if end < 0:
        if len(data) < block:
            return b"", offset  # a line still being written: wait for its end
        return (data if split_long else b""), offset + len(data)
    return data[:end + 1], offset + end + 1
