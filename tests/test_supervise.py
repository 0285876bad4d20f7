"""End to end: lorasup as a real process supervising real misbehaving trainers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import (
    FAKE_KOHYA,
    HELPERS,
    child_env,
    gone,
    kohya_args,
    lorasup_argv,
    run_lorasup,
    run_on_a_terminal,
    wait_for,
)


def signals_sent(report: dict) -> list[str]:
    return [s["signal"] for s in report["signals_sent"]]


def assert_common(result, outcome: str, exit_code: int) -> dict:
    assert result.returncode == exit_code, result.stderr[-2000:]
    report = result.report
    assert report["outcome"] == outcome
    assert report["exit_code"] == exit_code
    assert (result.run_dir / "loss_curves.png").stat().st_size > 1000
    assert (result.run_dir / "events.jsonl").is_file()
    assert (result.run_dir / "trainer.log").is_file()
    steps = report["series"]["step"]
    assert all(s <= report["steps"]["requested"] for s in steps)
    return report


def test_honest_trainer_completes_with_exact_steps(run_dir: Path) -> None:
    out = run_dir.parent / "out"
    result = run_lorasup(run_dir, *kohya_args("--output_dir", str(out), steps=6))
    report = assert_common(result, "completed", 0)
    assert report["steps"]["last"] == 6
    assert report["series"]["step"] == [1, 2, 3, 4, 5, 6]
    assert report["signals_sent"] == []
    assert report["trainer_returncode"] == 0
    # kohya's console has only the running average: the per-step loss is said to be missing.
    assert "loss" in report["series"]["missing"]
    assert report["series"]["avg_loss"][-1] is not None
    assert any(p.endswith("test_lora.safetensors") for p in report["artifacts"]["model_files"])
    # JSON logs on stdout carry the run id on every line.
    log_lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert log_lines and all(entry["run_id"] == run_dir.name for entry in log_lines)
    assert any(entry["event"] == "outcome" for entry in log_lines)


def test_max_train_steps_is_injected_replacing_the_users_value(run_dir: Path) -> None:
    result = run_lorasup(run_dir, *kohya_args("--max_train_steps=999", steps=3))
    report = assert_common(result, "completed", 0)
    assert report["steps"]["last"] == 3
    assert "--max_train_steps=3" in report["command"]
    assert "--max_train_steps=999" not in report["command"]
    # kohya's per-step loss only goes to TensorBoard: lorasup points it into the run dir.
    assert f"--logging_dir={run_dir}/tensorboard" in report["command"]


def test_trainer_running_past_n_is_stopped_at_once(run_dir: Path) -> None:
    # The fake prints a tqdm total of N but runs 500 steps more at 20 ms each.
    result = run_lorasup(run_dir, *kohya_args("--overshoot", "500", "--step-seconds", "0.02",
                                              steps=5))
    report = assert_common(result, "completed", 0)
    assert report["steps"]["last"] == 5
    assert max(report["series"]["step"]) == 5
    assert report["steps"]["rejected_over_max"] >= 1
    assert signals_sent(report)[0] == "SIGINT"
    # Stopped within a few steps of N, not after 500 more.
    assert result.seconds < 8


def test_silent_trainer_is_detected_as_stalled(run_dir: Path) -> None:
    result = run_lorasup(run_dir, *kohya_args("--silent", silence=0.5, grace=0.3))
    report = assert_common(result, "stalled", 4)
    stop = next(e for e in result.events() if e["kind"] == "signal")
    # Fired after the silence limit, and not much later.
    assert 0.5 <= stop["t"] < 3.0
    assert report["steps"]["last"] is None or report["steps"]["last"] == 0


def test_trainer_hanging_mid_run_is_stalled(run_dir: Path) -> None:
    result = run_lorasup(run_dir, *kohya_args("--hang-at", "3", silence=0.5, grace=0.3))
    report = assert_common(result, "stalled", 4)
    assert report["steps"]["last"] == 2


def test_trainer_ignoring_sigint_and_sigterm_is_killed_after_grace(run_dir: Path) -> None:
    result = run_lorasup(run_dir, *kohya_args("--hang-at", "2", "--ignore", "SIGINT,SIGTERM",
                                              silence=0.4, grace=1.0))
    report = assert_common(result, "stalled", 4)
    sent = report["signals_sent"]
    assert [s["signal"] for s in sent] == ["SIGINT", "SIGTERM", "SIGKILL"]
    # The grace period was honoured before SIGKILL (lower bound) and the run ended.
    assert sent[-1]["t"] - sent[0]["t"] >= 0.95
    assert report["trainer_returncode"] == -signal.SIGKILL


def test_grandchildren_in_other_sessions_do_not_survive(run_dir: Path, tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    result = run_lorasup(run_dir, *kohya_args("--grandchildren", str(pid_file), "--hang-at", "3",
                                              silence=2.5, grace=0.5))
    assert_common(result, "stalled", 4)
    pids = [int(p) for p in pid_file.read_text().split()]
    assert len(pids) == 2
    assert all(gone(pid) for pid in pids), [p for p in pids if not gone(p)]


def test_leftover_grandchildren_after_a_normal_exit_are_cleaned_up(
        run_dir: Path, tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    result = run_lorasup(run_dir, *kohya_args("--grandchildren", str(pid_file), steps=3,
                                              grace=0.4))
    report = assert_common(result, "completed", 0)
    pids = [int(p) for p in pid_file.read_text().split()]
    assert all(gone(pid) for pid in pids)
    assert "SIGKILL" in signals_sent(report)


def test_cuda_oom_is_a_failed_run_with_the_problem_classified(run_dir: Path) -> None:
    result = run_lorasup(run_dir, *kohya_args("--oom-at", "3"))
    report = assert_common(result, "trainer_failed", 1)
    assert report["trainer_returncode"] == 1
    assert "cuda_out_of_memory" in {p["problem"] for p in report["problems"]}
    assert report["steps"]["last"] == 2


def test_nan_loss_is_diverged(run_dir: Path) -> None:
    result = run_lorasup(run_dir, *kohya_args("--nan-at", "3", "--step-seconds", "0.05",
                                              steps=50))
    report = assert_common(result, "diverged", 5)
    assert report["steps"]["last"] < 10
    assert signals_sent(report)[0] == "SIGINT"


def test_garbage_output_is_survived(run_dir: Path) -> None:
    result = run_lorasup(run_dir, *kohya_args("--garbage", steps=3))
    report = assert_common(result, "completed", 0)
    assert report["steps"]["last"] == 3
    assert (run_dir / "trainer.log").stat().st_size > 10 * 1024 * 1024
    notes = [e for e in result.events() if e["kind"] == "note"]
    assert any("characters dropped" in n["message"] for n in notes)


def test_slow_final_save_is_not_cut_off(run_dir: Path) -> None:
    out = run_dir.parent / "out"
    # Silent for 2.5 s after the last step, with a 1 s no-output limit: still no signal.
    result = run_lorasup(run_dir, *kohya_args("--save-seconds", "2.5", "--output_dir", str(out),
                                              steps=4, silence=1.0))
    report = assert_common(result, "completed", 0)
    assert report["signals_sent"] == []
    assert (out / "test_lora.safetensors").is_file()
    assert any(e["kind"] == "finished" for e in result.events())


def test_empty_dataset_exit_zero_is_a_failure(run_dir: Path) -> None:
    result = run_lorasup(run_dir, *kohya_args("--no-data"))
    report = assert_common(result, "trainer_failed", 1)
    assert report["trainer_returncode"] == 0
    assert "no_data" in {p["problem"] for p in report["problems"]}


def test_total_timeout(run_dir: Path) -> None:
    result = run_lorasup(run_dir, "--timeout", "1", *kohya_args("--step-seconds", "0.2",
                                                                steps=100))
    assert_common(result, "timeout", 3)


def _start_background(run_dir: Path, *args: str) -> subprocess.Popen:
    argv = lorasup_argv("start", "--run-dir", str(run_dir), "--log-format", "json", *args)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env())


def _first_step_written(run_dir: Path) -> bool:
    events = run_dir / "events.jsonl"
    return events.exists() and '"kind":"step"' in events.read_text(encoding="utf-8")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_lorasup_signalled_mid_run_stops_trainer_and_reports(
        run_dir: Path, sig: signal.Signals, code: int) -> None:
    proc = _start_background(run_dir, *kohya_args("--step-seconds", "0.1", steps=500))
    try:
        assert wait_for(lambda: _first_step_written(run_dir), timeout=20)
        proc.send_signal(sig)
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == code
    report = json.loads((run_dir / "report.json").read_text())
    assert report["outcome"] == "interrupted"
    assert report["exit_code"] == code
    assert report["signals_sent"][0]["signal"] == "SIGINT"
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    pid = next(e["pid"] for e in map(json.loads, lines) if e["kind"] == "started")
    assert gone(pid)


def test_second_sigint_skips_the_grace(run_dir: Path) -> None:
    proc = _start_background(run_dir, "--grace", "30", *kohya_args(
        "--ignore", "SIGINT,SIGTERM", "--step-seconds", "0.1", steps=500, grace=30))
    try:
        assert wait_for(lambda: _first_step_written(run_dir), timeout=20)
        began = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert wait_for(lambda: '"signal":"SIGINT"' in (run_dir / "events.jsonl").read_text())
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)
        took = time.monotonic() - began
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert took < 10  # far below the 30 s grace
    report = json.loads((run_dir / "report.json").read_text())
    assert signals_sent(report)[-1] == "SIGKILL"


def test_report_rebuilds_from_truncated_events(run_dir: Path) -> None:
    result = run_lorasup(run_dir, *kohya_args(steps=5))
    assert result.returncode == 0
    events = run_dir / "events.jsonl"
    data = events.read_bytes()
    # Cut the first line of step 5 in half: lorasup was killed while writing it.
    cut = data[: data.index(b'"kind":"step","step":5') + 10]
    events.write_bytes(cut)
    (run_dir / "report.json").unlink()
    (run_dir / "loss_curves.png").unlink()
    proc = subprocess.run(lorasup_argv("report", str(run_dir)), capture_output=True, text=True,
                          timeout=60, env=child_env())
    assert proc.returncode == 0, proc.stderr
    report = json.loads((run_dir / "report.json").read_text())
    assert report["steps"]["last"] == 4
    assert (run_dir / "loss_curves.png").stat().st_size > 1000


@pytest.mark.parametrize(("args", "message"), [
    (["--trainer", "kohya", "--steps", "0", "--", sys.executable, str(FAKE_KOHYA)], "steps"),
    (["--trainer", "kohya", "--steps", "-3", "--", sys.executable, str(FAKE_KOHYA)], "steps"),
    (["--trainer", "nope", "--steps", "3", "--", "true"], "unknown trainer"),
    (["--trainer", "kohya", "--steps", "3"], "needs the trainer command"),
    (["--trainer", "kohya", "--", sys.executable, str(FAKE_KOHYA)], "--steps"),
    (["--trainer", "kohya", "--steps", "3", "--", "no-such-program-xyz"], "not found"),
    (["--trainer", "kohya", "--steps", "3", "--timeout", "-1", "--", "true"], "timeout"),
    # A mistyped lorasup flag is an error, not something passed on to the trainer.
    (["--trainer", "kohya", "--stpes", "3", "--", sys.executable, str(FAKE_KOHYA)], "--stpes"),
    (["--trainer", "kohya", "--steps", "x", "--", sys.executable, str(FAKE_KOHYA)], "--steps"),
])
def test_bad_input_is_one_line_and_exit_2(run_dir: Path, args: list[str], message: str) -> None:
    result = run_lorasup(run_dir, *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not run_dir.exists()


def test_unwritable_logs_dir_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root writes anywhere: use a path under a regular file instead.
        blocker = tmp_path / "file"
        blocker.write_text("")
        logs_dir = blocker / "logs"
    else:
        logs_dir = tmp_path / "ro"
        logs_dir.mkdir(mode=0o500)
    argv = lorasup_argv("start", "--logs-dir", str(logs_dir), *kohya_args(steps=2))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=child_env())
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "cannot write" in proc.stderr


def test_existing_run_is_never_overwritten(run_dir: Path) -> None:
    assert run_lorasup(run_dir, *kohya_args(steps=2)).returncode == 0
    before = (run_dir / "events.jsonl").read_bytes()
    again = run_lorasup(run_dir, *kohya_args(steps=2))
    assert again.returncode == 2
    assert (run_dir / "events.jsonl").read_bytes() == before


def test_secrets_in_the_trainer_argv_never_reach_logs_or_reports(run_dir: Path) -> None:
    token = "hf_abcdefghijklmnopqrstuvwxyz0123"
    result = run_lorasup(run_dir, *kohya_args(f"--hf_token={token}", "--wandb_api_key",
                                              "sekrit-value", "--password=hunter2", steps=2))
    assert result.returncode == 0
    for text in (result.stdout, result.stderr, (run_dir / "events.jsonl").read_text(),
                 (run_dir / "report.json").read_text()):
        assert token not in text
        assert "sekrit-value" not in text
        assert "hunter2" not in text
    assert "--hf_token=***" in result.report["command"]


def test_systemd_notifications(run_dir: Path, tmp_path: Path) -> None:
    import socket

    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(address)
        argv = lorasup_argv("start", "--run-dir", str(run_dir), "--log-format", "json",
                            *kohya_args(steps=3))
        env = {**child_env(), "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "10000000"}
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == 0, proc.stderr
        server.setblocking(False)
        messages = []
        while True:
            try:
                messages.append(server.recv(4096).decode())
            except BlockingIOError:
                break
    assert messages[0].startswith("READY=1\nSTATUS=training with kohya")
    assert any("WATCHDOG=1" in m for m in messages)
    assert any(m == "STATUS=step 3/3" for m in messages)


def test_nan_patience_counts_steps_not_frames(run_dir: Path) -> None:
    # NaN from step 3 on; patience 3 tolerates steps 3, 4, 5 and stops at step 6.
    result = run_lorasup(run_dir, "--nan-patience", "3", *kohya_args(
        "--nan-at", "3", "--step-seconds", "0.1", steps=40))
    report = assert_common(result, "diverged", 5)
    nan_steps = [e["step"] for e in result.events() if e["kind"] == "step" and e["step"] >= 3]
    # From step 4 on both frames of a step show avr_loss=nan: the redraw is not a second
    # record. Step 3's first frame still shows step 2's finite average and its second the
    # NaN: read apart (a preempted writer), that is a real update of step 3, recorded once
    # more; read together, the frames merge.
    later = [step for step in nan_steps if step > 3]
    assert len(later) == len(set(later))
    assert 1 <= nan_steps.count(3) <= 2
    # Diverged at the 4th NaN step (steps read in the same chunk after it are still recorded).
    assert report["steps"]["last"] >= 6
    assert report["reason"] == "non-finite loss at 4 step(s)"


def test_kohya_whose_own_total_exceeds_n_is_stopped_at_n(run_dir: Path) -> None:
    # The bar says 50 steps although lorasup asked for 5: it ignored the limit.
    result = run_lorasup(run_dir, *kohya_args("--overshoot", "45", "--total-shown", "50",
                                              "--step-seconds", "0.05", steps=5))
    report = assert_common(result, "completed", 0)
    assert report["steps"]["last"] == 5
    assert report["steps"]["rejected_over_max"] == 0  # stopped before step 6 was printed
    stop = report["signals_sent"][0]
    assert stop["signal"] == "SIGINT" and stop["reason"] == "step_limit"


def test_command_trainer_is_stopped_as_soon_as_step_n_is_seen(run_dir: Path) -> None:
    result = run_lorasup(run_dir, "--trainer", "command", "--steps", "5", "--grace", "2",
                         "--", sys.executable, str(FAKE_KOHYA), "--max_train_steps=5",
                         "--overshoot", "100", "--step-seconds", "0.05")
    report = assert_common(result, "completed", 0)
    assert report["series"]["step"] == [1, 2, 3, 4, 5]
    assert report["steps"]["rejected_over_max"] == 0
    assert report["signals_sent"][0]["reason"] == "step_limit"
    assert report["command"][-1] == "0.05"  # nothing injected


def test_program_that_cannot_be_executed_is_usage_with_a_report(
        run_dir: Path, tmp_path: Path) -> None:
    program = tmp_path / "not-a-program"
    program.write_bytes(b"\x00\x01 not an executable format")
    program.chmod(0o755)
    result = run_lorasup(run_dir, "--trainer", "command", "--steps", "3", "--", str(program))
    assert result.returncode == 2
    report = result.report
    assert report["outcome"] == "usage"
    assert "could not start the trainer" in report["reason"]


def test_status_shows_a_live_run(run_dir: Path) -> None:
    proc = _start_background(run_dir, *kohya_args("--step-seconds", "0.1", steps=300))
    try:
        assert wait_for(lambda: _first_step_written(run_dir), timeout=20)
        status = subprocess.run(lorasup_argv("status", str(run_dir)), capture_output=True,
                                text=True, timeout=30, env=child_env())
        assert status.returncode == 0, status.stderr
        data = json.loads(status.stdout)
        assert data["status"] == "running" and data["outcome"] is None
        assert data["steps"]["last"] >= 1
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143


def test_terminal_gets_console_logs_and_a_live_progress_line(run_dir: Path) -> None:
    # --quiet: the trainer's own bar is not echoed, lorasup's live line is the progress
    argv = lorasup_argv("start", "--run-dir", str(run_dir), "--quiet", *kohya_args(steps=3))
    returncode, text = run_on_a_terminal(argv, timeout=30)
    assert returncode == 0
    assert "step 3/3" in text  # the live line
    assert "outcome" in text and '"event"' not in text  # console rendering, not JSON


def test_secrets_the_trainer_prints_never_reach_logs_events_or_report(run_dir: Path) -> None:
    """Issue 16.11: a value seen as a secret (argv, environment) is masked wherever it shows
    later; short ``hf_`` tokens and ``NAME=value`` pairs anywhere in a line are masked."""
    argv_token = "argvtoken-9f8e7d"
    wandb = "0123456789abcdef0123456789abcdef01234567"
    env_token = "envtok-5a4b3c2d1e"
    argv = lorasup_argv("start", "--run-dir", str(run_dir), "--log-format", "json",
                        "--trainer", "command", "--steps", "3", "--",
                        sys.executable, str(HELPERS / "leaky_trainer.py"), "3",
                        "--hf_token", argv_token)
    env = {**child_env(), "WANDB_API_KEY": wandb, "HF_TOKEN": env_token}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env,
                          cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stderr
    events = (run_dir / "events.jsonl").read_text()
    assert "RuntimeError: login with *** failed" in events  # the problem lines are there
    for text in (proc.stdout, proc.stderr, events, (run_dir / "report.json").read_text()):
        for secret in (argv_token, wandb, env_token, "hf_abc123XYZ"):
            assert secret not in text
