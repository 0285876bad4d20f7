"""lorasup is never the weak link: its own signals, pipes, disk and death (issue 7).

Real lorasup processes, real trainers (tests/helpers/fault_trainer.py), real signals.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.support import HELPERS, child_env, gone, lorasup_argv, run_lorasup, wait_for

FAULT = HELPERS / "fault_trainer.py"


def native(*trainer_args: str, steps: int = 3, grace: float = 2.0) -> list[str]:
    return ["--trainer", "native", "--steps", str(steps), "--grace", str(grace), "--",
            sys.executable, str(FAULT), *trainer_args]


def start(run_dir: Path, *args: str, **popen: object) -> subprocess.Popen[str]:
    argv = lorasup_argv("start", "--run-dir", str(run_dir), "--log-format", "json", *args)
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(argv, cwd=run_dir.parent, env=child_env(), text=True,
                            **popen)  # type: ignore[call-overload]


def report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()
            if line]


def trainer_pid(run_dir: Path) -> int | None:
    path = run_dir / "events.jsonl"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if '"kind":"started"' in line:
            return json.loads(line)["pid"]
    return None


def family(pidfile: Path) -> list[int]:
    assert wait_for(pidfile.exists, 20), "the trainer never wrote its pids"
    return [int(p) for p in pidfile.read_text().split()]


# -- signals -------------------------------------------------------------------------------


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGHUP, 129), (signal.SIGTERM, 143)])
def test_hangup_and_terminate_stop_the_run_gracefully(tmp_path: Path, sig: int,
                                                      code: int) -> None:
    run_dir = tmp_path / "run"
    pidfile = tmp_path / "pids"
    proc = start(run_dir, *native("--family", str(pidfile), "--hold"))
    pids = family(pidfile)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err[-2000:]
    data = report(run_dir)
    assert data["outcome"] == "interrupted"
    assert data["signals_sent"][0]["signal"] == "SIGINT"
    assert "cleanup ran" in (run_dir / "trainer.log").read_text()
    assert all(gone(pid) for pid in pids)
    assert "Traceback" not in err


def test_sigterm_right_after_spawn_never_leaves_a_trainer(tmp_path: Path) -> None:
    # The spawn race: a scheduler cancelling a job that just began, at several moments.
    for attempt in range(6):
        run_dir = tmp_path / f"run{attempt}"
        pidfile = tmp_path / f"pids{attempt}"
        proc = start(run_dir, *native("--family", str(pidfile), "--hold", steps=2))
        # Right when the run directory is claimed (before or just after the spawn) ...
        assert wait_for(lambda d=run_dir: (d / "events.jsonl").exists(), 20)
        if attempt % 2:
            # ... or the moment the trainer exists.
            wait_for(lambda d=run_dir: trainer_pid(d) is not None, 20, interval=0.001)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 143, err[-2000:]
        data = report(run_dir)
        assert data["outcome"] == "interrupted"
        if pidfile.exists():
            assert wait_for(lambda p=pidfile: all(gone(pid) for pid in family(p)), 5)
        pid = trainer_pid(run_dir)
        if pid is not None:
            assert gone(pid)


def test_inherited_ignored_sigint_is_reset_for_the_trainer(tmp_path: Path) -> None:
    # `lorasup ... &` from a script: SIGINT arrives ignored; the trainer must not inherit it.
    run_dir = tmp_path / "run"
    pidfile = tmp_path / "pids"

    def ignore_and_block() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})

    proc = start(run_dir, *native("--family", str(pidfile), "--hold"),
                 preexec_fn=ignore_and_block)
    family(pidfile)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err[-2000:]
    log = (run_dir / "trainer.log").read_text()
    assert "signals: SIGINT=default SIGTERM=default SIGHUP=default blocked=none" in log
    # The graceful SIGINT worked: the trainer's own cleanup ran, no SIGTERM was needed.
    assert "cleanup ran" in log
    assert [s["signal"] for s in report(run_dir)["signals_sent"]] == ["SIGINT"]


# -- lorasup's own output ------------------------------------------------------------------


def test_closed_stdout_does_not_end_the_run(tmp_path: Path) -> None:
    # `lorasup start ... | head -1`: the reader goes away after the first line.
    run_dir = tmp_path / "run"
    proc = start(run_dir, *native("--step-seconds", "0.1", steps=5), stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()
    proc.stdout.close()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err and "Exception ignored" not in err
    assert report(run_dir)["outcome"] == "completed"
    fallback = (run_dir / "lorasup.log").read_text()
    assert '"event": "outcome"' in fallback and "log_stream_failed" in fallback


# -- lorasup killed ------------------------------------------------------------------------


@pytest.mark.parametrize("whole_group", [False, True])
def test_sigkill_of_lorasup_leaves_no_process_of_the_tree(tmp_path: Path,
                                                           whole_group: bool) -> None:
    run_dir = tmp_path / "run"
    pidfile = tmp_path / "pids"
    # lorasup leads a process group of its own, as a shell job or a CI step would.
    proc = start(run_dir, *native("--family", str(pidfile), "--hold"),
                 start_new_session=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
    pids = family(pidfile)
    # lorasup's own children too: the guard and the plot child must not outlive it either.
    ours = [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
    assert set(pids[:1]) <= set(ours)
    pids = sorted({*pids, *ours})
    if whole_group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    died = time.monotonic()
    assert wait_for(lambda: all(gone(pid) for pid in pids), 2.0), [
        pid for pid in pids if not gone(pid)]
    assert time.monotonic() - died <= 2.5
    # The run is reported as lost, never as running forever.
    status = subprocess.run(lorasup_argv("status", str(run_dir)), capture_output=True,
                            text=True, env=child_env(), timeout=30)
    shown = json.loads(status.stdout)
    assert shown["outcome"] == "lost" and shown["status"] == "lost"
    rebuilt = subprocess.run(lorasup_argv("report", str(run_dir)), capture_output=True,
                             text=True, env=child_env(), timeout=60)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert report(run_dir)["outcome"] == "lost"
    assert "supervisor" in report(run_dir)["reason"]


# -- the run directory ---------------------------------------------------------------------


def test_two_starts_on_one_run_dir_one_wins(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    procs = [start(run_dir, *native(steps=2)) for _ in range(2)]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], errors
    assert any("already holds a run" in e for e in errors)
    kinds = [e["kind"] for e in events(run_dir)]
    assert kinds.count("started") == 1 and kinds.count("outcome") == 1


def test_planted_symlinks_are_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "trainer.log").symlink_to(victim)
    (run_dir / "lorasup.log").symlink_to(victim)
    result = run_lorasup(run_dir, *native(steps=2))
    assert result.returncode == 0, result.stderr[-2000:]
    assert victim.read_text() == "precious\n"
    assert any("trainer.log" in e.get("message", "") for e in result.events()
               if e["kind"] == "note")
    # A dangling events.jsonl someone planted: refused, and nothing is created through it.
    other = tmp_path / "other"
    other.mkdir()
    target = tmp_path / "created-through-link"
    (other / "events.jsonl").symlink_to(target)
    refused = run_lorasup(other, *native(steps=2))
    assert refused.returncode == 2
    assert "already holds a run" in refused.stderr
    assert not target.exists()


def test_files_that_can_hold_secrets_are_private(tmp_path: Path) -> None:
    result = run_lorasup(tmp_path / "run", *native(steps=2))
    assert result.returncode == 0
    for name in ("trainer.log", "events.jsonl"):
        assert (result.run_dir / name).stat().st_mode & 0o077 == 0, name


@pytest.mark.parametrize("how", ["flag", "job file"])
def test_a_private_run_is_reachable_by_nobody_else_whatever_the_umask(tmp_path: Path,
                                                                      how: str) -> None:
    """Issue 16.9: ``--private`` (``private = true``): the run directory 0700 even under a
    umask of 0, so report, CSV and PNG (0644 by choice) are out of other users' reach."""
    run_dir = tmp_path / "run"
    args: list[str] = ["--private"]
    if how == "job file":
        job = tmp_path / "job.toml"
        job.write_text("private = true\n", encoding="utf-8")
        args = ["--config", str(job)]
    argv = lorasup_argv("start", "--run-dir", str(run_dir), "--log-format", "json", *args,
                        *native(steps=2))
    proc = subprocess.run(argv, cwd=tmp_path, env=child_env(), capture_output=True,
                          text=True, timeout=60, preexec_fn=lambda: os.umask(0))
    assert proc.returncode == 0, proc.stderr
    assert run_dir.stat().st_mode & 0o777 == 0o700
    assert {"report.json", "losses.csv", "loss_curves.png"} <= {p.name for p in run_dir.iterdir()}
    plain = tmp_path / "plain"
    proc = subprocess.run(lorasup_argv("start", "--run-dir", str(plain), "--log-format", "json",
                                       *native(steps=2)), cwd=tmp_path, env=child_env(),
                          capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: os.umask(0o022))
    assert proc.returncode == 0, proc.stderr
    assert plain.stat().st_mode & 0o777 == 0o755  # without it: the umask decides, as before


def test_generated_run_ids_do_not_collide(tmp_path: Path) -> None:
    argv = lorasup_argv("start", "--logs-dir", str(tmp_path / "logs"), "--log-format",
                        "json", *native(steps=1))
    procs = [subprocess.Popen(argv, cwd=tmp_path, env=child_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    runs = list((tmp_path / "logs").iterdir())
    assert len(runs) == 3
    assert all(len([e for e in events(r) if e["kind"] == "started"]) == 1 for r in runs)


# -- the trainer's environment -------------------------------------------------------------


def test_service_plumbing_is_not_inherited(tmp_path: Path) -> None:
    names = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
             "KEEP_ME"]
    env = child_env()
    env.update({"NOTIFY_SOCKET": str(tmp_path / "nowhere.sock"), "WATCHDOG_USEC": "1000000",
                "WATCHDOG_PID": "1", "LISTEN_FDS": "1", "LISTEN_PID": "1", "KEEP_ME": "yes"})
    run_dir = tmp_path / "run"
    argv = lorasup_argv("start", "--run-dir", str(run_dir), "--log-format", "json",
                        *native("--print-env", *names, steps=1))
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (run_dir / "trainer.log").read_text()
    for name in names[:-1]:
        assert f"env: {name}=<absent>" in log
    assert "env: KEEP_ME=yes" in log


# -- a full disk ---------------------------------------------------------------------------


def test_full_disk_in_the_run_directory(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tiny tmpfs needs root")
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        run_dir = mount / "run"
        pidfile = tmp_path / "pids"
        result = run_lorasup(run_dir, *native("--chatter", "20000", "--family", str(pidfile),
                                              steps=8), timeout=90)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        final = [json.loads(line) for line in result.stdout.splitlines()
                 if '"event": "outcome"' in line][-1]
        assert final["outcome"] == "completed"
        assert "trainer.log" in final["unwritten"]
        assert all(gone(pid) for pid in family(pidfile))
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


# -- lorasup's own bugs (in process: the engine with a real trainer) ------------------------


def _plan(run_dir: Path, *trainer_args: str, steps: int = 3):
    from lorasup.supervisor.config import build_job
    from lorasup.supervisor.prepare import plan_run

    job = build_job({}, {"trainer": "native", "steps": steps, "run_dir": run_dir, "grace": 2.0,
                         "trainer_argv": (sys.executable, str(FAULT), *trainer_args)})
    return plan_run(job)


def _supervise(plan, adapter):
    import anyio

    from lorasup.supervisor.run import Supervisor

    async def main():
        return await Supervisor(plan, adapter).run()

    return anyio.run(main)


def test_an_adapter_that_raises_costs_a_note_not_the_run(tmp_path: Path) -> None:
    plan, adapter = _plan(tmp_path / "run")
    real = adapter.parse

    def fragile(line: str):
        if '"step":2,' in line:
            raise OverflowError("int too large to convert to float")
        return real(line)

    adapter.parse = fragile  # type: ignore[method-assign]
    result = _supervise(plan, adapter)
    assert (result.outcome, result.exit_code) == ("completed", 0)
    notes = [e["message"] for e in events(plan.run_dir) if e["kind"] == "note"]
    assert any(n.startswith("parser_error: OverflowError") for n in notes)


def test_a_crash_of_lorasup_stops_the_trainer_gracefully(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    plan, adapter = _plan(tmp_path / "run", "--family", str(pidfile), "--hold")
    from lorasup.supervisor.run import Supervisor

    async def broken_scan(self) -> None:
        import anyio

        await anyio.to_thread.run_sync(lambda: wait_for(pidfile.exists, 20))
        raise RuntimeError("a bug in the tree scan")

    original = Supervisor._scan_tree
    Supervisor._scan_tree = broken_scan  # type: ignore[method-assign]
    try:
        result = _supervise(plan, adapter)
    finally:
        Supervisor._scan_tree = original  # type: ignore[method-assign]
    assert (result.outcome, result.exit_code) == ("internal_error", 70)
    assert "a bug in the tree scan" in report(plan.run_dir)["reason"]
    assert "cleanup ran" in (plan.run_dir / "trainer.log").read_text()
    assert all(gone(pid) for pid in family(pidfile))
