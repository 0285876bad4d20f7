"""The guard, crash-only (issue 16): stubborn trees, a stopped or frozen guard, scheduler
signals to every process of a job, repeated SIGTERMs, and a report after lorasup's death.

Real lorasup processes, real trainers (tests/helpers/tree_trainer.py), real signals.
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
import threading
import time
from pathlib import Path

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lorasup.supervisor import guard
from tests.support import HELPERS, child_env, gone, lorasup_argv, wait_for

TREE = HELPERS / "tree_trainer.py"
#: the promise is 2 s after lorasup's death; the assertion leaves room for a loaded machine
TREE_GONE_BOUND = 5.0


def native(*trainer_args: str, steps: int = 3, grace: float = 2.0,
           extra: tuple[str, ...] = ()) -> list[str]:
    return ["--trainer", "native", "--steps", str(steps), "--grace", str(grace), *extra, "--",
            sys.executable, str(TREE), *trainer_args]


def start(run_dir: Path, *args: str, **popen: object) -> subprocess.Popen[str]:
    argv = lorasup_argv("start", "--run-dir", str(run_dir), "--log-format", "json", *args)
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(argv, cwd=run_dir.parent, env=child_env(), text=True,
                            **popen)  # type: ignore[call-overload]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()
            if line]


def tree_pids(pidfile: Path) -> list[int]:
    assert wait_for(pidfile.exists, 30), "the trainer never wrote its pids"
    return [int(p) for p in pidfile.read_text().split()]


def guard_of(lorasup: int) -> int:
    """The guard: lorasup's child running guard.py."""
    for child in psutil.Process(lorasup).children():
        with contextlib.suppress(psutil.Error):
            if any(part.endswith("guard.py") for part in child.cmdline()):
                return child.pid
    raise AssertionError("lorasup has no guard child")


def sent(run_dir: Path) -> list[str]:
    return [e["signal"] for e in events(run_dir) if e["kind"] == "signal"]


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def started_wall_time(run_dir: Path) -> float:
    return next(e["wall_time"] for e in events(run_dir) if e["kind"] == "started")


# -- item 1: the kill set ------------------------------------------------------------------


def test_sigkill_of_lorasup_kills_own_session_workers_that_ignore_sigterm(
        tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    pidfile = tmp_path / "pids"
    proc = start(run_dir, *native("--pids", str(pidfile), "--workers", "5", "--hold"),
                 start_new_session=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
    pids = tree_pids(pidfile)
    try:
        assert len(pids) == 7  # the trainer, five workers, one grandchild
        guard_pid = guard_of(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        died = time.monotonic()
        assert wait_for(lambda: all(gone(pid) for pid in pids), TREE_GONE_BOUND), [
            pid for pid in pids if not gone(pid)]
        took = time.monotonic() - died
        # Measured: ~1.0-1.1 s (the guard's one-second SIGTERM grace, then SIGKILL).
        assert took <= TREE_GONE_BOUND, took
        # The guard ends once it is done (after the report), not before the tree is gone.
        assert wait_for(lambda: gone(guard_pid), 60)
    finally:
        kill_all(pids)


@pytest.mark.parametrize("how", ["exits", "timeout"])
def test_a_normal_end_leaves_no_own_session_worker_that_ignores_sigterm(
        tmp_path: Path, how: str) -> None:
    run_dir = tmp_path / "run"
    pidfile = tmp_path / "pids"
    trainer = ["--pids", str(pidfile), "--workers", "3"]
    extra: tuple[str, ...] = ()
    if how == "timeout":
        trainer.append("--hold")
        extra = ("--timeout", "3")
    proc = start(run_dir, *native(*trainer, grace=1.0, extra=extra))
    pids = tree_pids(pidfile)
    try:
        _, err = proc.communicate(timeout=60)
        # The run ends only when no process of its tree is left.
        assert [pid for pid in pids if not gone(pid)] == []
        data = read_json(run_dir / "report.json")
        if how == "exits":
            assert proc.returncode == 0, err[-2000:]
            assert data["outcome"] == "completed"
        else:
            assert proc.returncode == 3, err[-2000:]
            assert data["outcome"] == "timeout"
        assert sent(run_dir)[-1] == "SIGKILL"  # nothing less ends these workers
    finally:
        kill_all(pids)


REUSED_PID = """
import json, signal, socket, subprocess, sys, time
from lorasup.supervisor import guard
from lorasup.supervisor.liveness import process_start_time
other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
start = process_start_time(other.pid)
ours, theirs = socket.socketpair()
keeper = guard.Guard(ours, ["true"])
keeper.known = {other.pid: start + 1}  # the recorded process is gone; its pid is reused
keeper._signal_all(signal.SIGKILL)
time.sleep(0.2)
print(json.dumps({"alive": other.poll() is None, "known": list(keeper.alive())}))
other.kill()
"""


def test_the_guard_never_signals_a_pid_whose_start_time_changed() -> None:
    # Run apart: the guard reaps every child of the process it runs in.
    done = subprocess.run([sys.executable, "-c", REUSED_PID], capture_output=True, text=True,
                          env=child_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"alive": True, "known": []}


@given(st.lists(st.text(max_size=30), max_size=6))
def test_guard_arguments_parse_or_are_refused(args: list[str]) -> None:
    parsed = guard._parse(args)
    if parsed is not None:
        fd, then, argv = parsed
        assert fd >= 0 and argv and (then is None or isinstance(then, dict))


def test_guard_arguments_carry_the_command_for_after() -> None:
    then = {"argv": ["x", "y"], "cwd": "/", "owner": [1, 2]}
    assert guard._parse(["7", "--then", json.dumps(then), "--", "a", "b"]) == (
        7, then, ["a", "b"])
    assert guard._parse(["7", "--", "a"]) == (7, None, ["a"])
    assert guard._parse(["7", "--then", "{not json", "--", "a"]) is None
    assert guard._parse(["7", "--"]) is None


HANGING_REPORT = """
import os, sys, time
if os.fork() == 0:
    os.setsid()  # a child of its own session, which a group kill would miss
    time.sleep(600)
    os._exit(0)
with open(sys.argv[1], "w") as fh:
    fh.write(str(os.getpid()))
time.sleep(600)
"""


def test_the_command_after_an_orphaned_kill_runs_and_never_outlives_its_deadline(
        tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    ran = tmp_path / "ran"
    ours, theirs = socket.socketpair()
    then = {"argv": [sys.executable, "-c", HANGING_REPORT, str(ran)], "cwd": str(tmp_path),
            "owner": [os.getpid(), -1],  # a start time no process has: the owner is gone
            "deadline": 1.0}
    with ours:
        keeper = subprocess.Popen(
            [sys.executable, "-I", "-S", guard.__file__, str(theirs.fileno()),
             "--then", json.dumps(then), "--", sys.executable, str(TREE), "--pids",
             str(pidfile), "--workers", "2", "--hold"],
            pass_fds=(theirs.fileno(),), stdout=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        pids = tree_pids(pidfile)
    # Our end closed without "done": for the guard, lorasup is gone.
    began = time.monotonic()

    def family() -> list[int]:
        """The command and its own-session child, found by the file they name."""
        found = []
        for proc in psutil.process_iter(["cmdline", "status"]):
            if (str(ran) in " ".join(proc.info["cmdline"] or [])
                    and proc.info["status"] != psutil.STATUS_ZOMBIE):
                found.append(proc.pid)
        return found

    try:
        # The guard ends once the tree is gone; a forked reporter runs the command.
        assert keeper.wait(timeout=30) == 1
        assert [pid for pid in pids if not gone(pid)] == []
        # The command ran: the kill loop did not take it for one of the tree's.
        assert wait_for(ran.exists, 20)
        assert wait_for(lambda: family() == [], 20), family()
        took = time.monotonic() - began
        # 1 s of SIGTERM grace, the command's 1 s deadline, and a loaded machine's slack.
        assert took < 10, took
    finally:
        kill_all(family())
        kill_all(pids)
        keeper.kill()
        keeper.wait()


# -- item 2: a stopped or frozen guard -----------------------------------------------------


SILENT_GUARD = """
import os, sys, time
if os.fork() == 0:  # something it started before it went silent
    with open(sys.argv[-1], "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(120)
    os._exit(0)
time.sleep(120)
"""


def test_a_guard_that_never_says_its_trainer_started_is_given_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import anyio

    from lorasup.supervisor import process

    silent = tmp_path / "silent_guard.py"
    silent.write_text(SILENT_GUARD)
    pidfile = tmp_path / "child"
    monkeypatch.setattr(process, "GUARD", silent)
    monkeypatch.setattr(process, "GUARD_START_SECONDS", 3.0)
    monkeypatch.setattr(process, "GUARD_ANSWER_SECONDS", 0.5)

    async def main() -> float:
        began = time.monotonic()
        with pytest.raises(process.GuardLost, match="did not start the trainer"):
            await process.spawn(["true", str(pidfile)], os.environ)
        return time.monotonic() - began

    took = anyio.run(main)
    assert took < 12, took  # 3 s + SIGCONT + 0.5 s, then killed; never unbounded
    assert wait_for(pidfile.exists, 10)
    assert wait_for(lambda: gone(int(pidfile.read_text())), 10)


class Freezer(threading.Thread):
    """Holds a process in a ptrace stop, where SIGCONT does not wake it (a guard frozen for
    good), and collects it for its parent once it is killed. ptrace requests must come from
    the attaching thread, so the attach and the waits happen here."""

    PTRACE_ATTACH = 16

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.attached = threading.Event()
        self.error: int | None = None

    def run(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.ptrace.restype = ctypes.c_long
        libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        if libc.ptrace(self.PTRACE_ATTACH, self.pid, None, None) != 0:
            self.error = ctypes.get_errno()
            self.attached.set()
            return
        self.attached.set()
        while True:  # stops are reported here and never resumed; the death ends the loop
            try:
                _, status = os.waitpid(self.pid, 0x40000000)  # __WALL
            except ChildProcessError:
                return
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                return


def test_a_stopped_guard_gets_sigcont_and_the_run_ends_in_time(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    pidfile = tmp_path / "pids"
    timeout, grace = 3.0, 1.0
    proc = start(run_dir, *native("--pids", str(pidfile), "--workers", "2", "--hold",
                                  grace=grace, extra=("--timeout", str(timeout))))
    pids = tree_pids(pidfile)
    guard_pid = guard_of(proc.pid)
    try:
        os.kill(guard_pid, signal.SIGSTOP)
        _, err = proc.communicate(timeout=60)
        ended = time.time()
        assert proc.returncode == 3, err[-2000:]
        assert ended - started_wall_time(run_dir) <= timeout + grace + 5
        data = read_json(run_dir / "report.json")
        assert data["outcome"] == "timeout"
        assert data["trainer_returncode"] is not None  # the guard answered after SIGCONT
        assert any("SIGCONT" in n for n in data["notes"]), data["notes"]
        assert [pid for pid in pids if not gone(pid)] == []
        assert wait_for(lambda: gone(guard_pid), 10)
    finally:
        kill_all(pids)
        with contextlib.suppress(OSError):
            os.kill(guard_pid, signal.SIGCONT)


@pytest.mark.parametrize("how", ["timeout", "exits"])
def test_a_frozen_guard_never_holds_the_run(tmp_path: Path, how: str) -> None:
    run_dir = tmp_path / "run"
    pidfile = tmp_path / "pids"
    timeout, grace = 4.0, 1.0
    trainer = ["--pids", str(pidfile), "--workers", "2"]
    if how == "timeout":
        trainer.append("--hold")
    else:
        trainer += ["--step-seconds", "0.5"]  # exits by itself, after the freeze
    proc = start(run_dir, *native(*trainer, grace=grace, extra=("--timeout", str(timeout))))
    pids = tree_pids(pidfile)
    guard_pid = guard_of(proc.pid)
    freezer = Freezer(guard_pid)
    try:
        freezer.start()
        freezer.attached.wait(10)
        if freezer.error is not None:
            proc.kill()
            pytest.skip(f"this platform forbids ptrace (errno {freezer.error})")
        _, err = proc.communicate(timeout=60)
        ended = time.time()
        assert ended - started_wall_time(run_dir) <= timeout + grace + 5
        data = read_json(run_dir / "report.json")
        if how == "timeout":
            assert proc.returncode == 3, err[-2000:]
            assert data["outcome"] == "timeout"  # the outcome the run earned
        else:
            assert proc.returncode == 70, err[-2000:]
            assert data["outcome"] == "internal_error"
            assert "guard" in data["reason"] and "unknown" in data["reason"]
        assert data["trainer_returncode"] is None
        assert any("did not tell" in n for n in data["notes"]), data["notes"]
        # lorasup stopped the tree itself: the setsid workers that ignore SIGTERM too.
        assert [pid for pid in pids if not gone(pid)] == []
        assert sent(run_dir)[-1] == "SIGKILL"
    finally:
        kill_all(pids)
        with contextlib.suppress(OSError):
            os.kill(guard_pid, signal.SIGKILL)
        freezer.join(10)


# -- item 3: scheduler signals -------------------------------------------------------------


def test_sigterm_to_every_process_of_the_job_is_one_graceful_stop(tmp_path: Path) -> None:
    # SLURM's scancel (proctrack/linuxproc) or a container stop: every process at once.
    run_dir = tmp_path / "run"
    pidfile = tmp_path / "pids"
    marker = tmp_path / "saved"
    proc = start(run_dir, *native("--pids", str(pidfile), "--hold", "--save-seconds", "1",
                                  "--marker", str(marker), grace=20))
    pids = tree_pids(pidfile)
    try:
        job = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
        assert guard_of(proc.pid) in job and pids[0] in job
        for pid in job:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 143, err[-2000:]
        data = read_json(run_dir / "report.json")
        assert data["outcome"] == "interrupted"
        assert data["trainer_returncode"] == 0
        assert marker.exists()  # the trainer finished its save
        assert "SIGKILL" not in sent(run_dir)
    finally:
        kill_all(pids)


@pytest.mark.parametrize(("first", "later", "escalates"), [
    (signal.SIGTERM, False, False),  # a scheduler and a wrapper script both forwarding
    (signal.SIGTERM, True, True),  # asked again, later: SIGKILL now, as before
    (signal.SIGINT, False, True),  # a Ctrl-C, then a SIGTERM: not a repeat
])
def test_a_repeated_sigterm_within_two_seconds_is_the_same_request(
        tmp_path: Path, first: signal.Signals, later: bool, escalates: bool) -> None:
    run_dir = tmp_path / "run"
    pidfile = tmp_path / "pids"
    marker = tmp_path / "saved"
    save = 8 if escalates else 3
    proc = start(run_dir, *native("--pids", str(pidfile), "--hold", "--save-seconds",
                                  str(save), "--marker", str(marker), grace=30))
    pids = tree_pids(pidfile)
    try:
        began = time.monotonic()
        proc.send_signal(first)
        # The first one was handled (the ladder's SIGINT is out) before the second is sent.
        assert wait_for(lambda: "SIGINT" in sent(run_dir), 20)
        if later:
            time.sleep(2.5)  # the interval under test, not a wait for something
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - began
        assert proc.returncode == 128 + first, err[-2000:]
        assert read_json(run_dir / "report.json")["outcome"] == "interrupted"
        again = [json.loads(line) for line in out.splitlines()
                 if '"lorasup_signalled_again"' in line]
        assert len(again) == 1  # lorasup did see the second SIGTERM
        if escalates:
            assert sent(run_dir)[-1] == "SIGKILL"
            assert not marker.exists()
            assert took < save  # the grace (30 s) and the save were cut short
        else:
            assert sent(run_dir) == ["SIGINT"]
            assert marker.exists()  # the save was not cut off
            assert "the same stop request" in again[0]["action"]
    finally:
        kill_all(pids)


# -- item 12: a report after lorasup's death -----------------------------------------------


def test_sigkill_of_lorasup_early_in_a_run_leaves_a_lost_report(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    pidfile = tmp_path / "pids"
    proc = start(run_dir, *native("--pids", str(pidfile), "--workers", "1", "--hold"),
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids = tree_pids(pidfile)
    try:
        guard_pid = guard_of(proc.pid)
        assert wait_for(lambda: any(e["kind"] == "step" for e in events(run_dir)), 20)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

        def outcome() -> str | None:
            with contextlib.suppress(OSError, ValueError):
                return read_json(run_dir / "report.json").get("outcome")
            return None

        # Nobody runs `lorasup report`: the guard's reporter does, once the tree is gone.
        # (The sink's first refresh, at 10 s, would say no outcome at all.)
        assert wait_for(lambda: outcome() == "lost", 60)
        data = read_json(run_dir / "report.json")
        assert f"lorasup pid {proc.pid}" in data["reason"]
        assert (run_dir / "losses.csv").exists()
        assert [pid for pid in pids if not gone(pid)] == []
        assert wait_for(lambda: gone(guard_pid), 60)
    finally:
        kill_all(pids)


def test_the_guard_outlives_user_signals_sent_to_every_process(tmp_path: Path) -> None:
    """``scancel --signal=USR1`` (no ``--batch``) reaches every process of a job, the guard
    too: it must not end the guard (lorasup answers SIGUSR1 itself), and the run still ends
    by its own rules."""
    run_dir = tmp_path / "run"
    pidfile = tmp_path / "pids"
    proc = start(run_dir, *native("--pids", str(pidfile), "--steps", "40",
                                  "--step-seconds", "0.05", steps=40))
    pids = tree_pids(pidfile)
    guard_pid = guard_of(proc.pid)
    try:
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            os.kill(guard_pid, sig)
        assert not gone(guard_pid)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        assert read_json(run_dir / "report.json")["outcome"] == "completed"
    finally:
        kill_all(pids)
