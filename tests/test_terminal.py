"""``lorasup start`` at a terminal (issue 17, items 4 and 5): the trainer's own output
live, lorasup's status lines between, ``--quiet`` and ``--echo``; Ctrl-C still leaves
report.json, losses.csv and a drawn PNG. Real processes on a real pseudo-terminal."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.support import HELPERS, Terminal, child_env, lorasup_argv, run_on_a_terminal

BAR = HELPERS / "bar_trainer.py"
#: one frame of bar_trainer.py's bar, as it draws it (with its \r)
FRAME_3 = "\rsteps:  60%|######    | 3/5 [00:01<00:01, 1.00it/s, avr_loss=0.3333]"


def _start(run_dir: Path, *flags: str, steps: int = 5, seconds: float = 0.05) -> list[str]:
    return lorasup_argv("start", "--run-dir", str(run_dir), "--trainer", "command",
                        "--steps", str(steps), *flags, "--", sys.executable, str(BAR),
                        "--steps", str(steps), "--step-seconds", str(seconds))


def _lines(text: str) -> list[str]:
    """What a person reads: each line as the terminal shows it at the end (the last frame
    drawn after its ``\\r``s; escape sequences left out)."""
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
    return [line.split("\r")[-1] if line.split("\r")[-1] else line.rstrip("\r")
            for line in plain.replace("\r\n", "\n").split("\n")]


def test_the_trainers_bar_shows_live_with_status_lines_between(tmp_path: Path) -> None:
    code, text = run_on_a_terminal(_start(tmp_path / "run"), timeout=60)
    assert code == 0, text
    assert FRAME_3 in text  # the trainer's bytes, \r and all
    assert "step 5/5  loss" not in text  # lorasup's own live line is off: the bar is it
    lines = _lines(text)
    # lorasup's status lines each start a line of their own, never glued to a bar frame
    for event in ("started", "stop_requested", "outcome"):
        found = [line for line in lines if re.search(rf"\] {event}\s", line)]
        assert found and all(line.startswith("20") for line in found), (event, lines)
    assert lines[-2].startswith("lorasup: completed"), lines  # the summary is the last line
    assert not any("steps:" in line and "lorasup:" in line for line in lines)


def test_quiet_hides_the_trainers_output_and_keeps_the_live_line(tmp_path: Path) -> None:
    code, text = run_on_a_terminal(_start(tmp_path / "run", "--quiet"), timeout=60)
    assert code == 0, text
    assert "steps:" not in text and "avr_loss" not in text
    assert "step 5/5" in text  # lorasup's own progress line
    assert (tmp_path / "run" / "trainer.log").read_text().count("avr_loss") == 5


def test_echo_shows_the_trainers_output_when_not_a_terminal(tmp_path: Path) -> None:
    argv = _start(tmp_path / "run", "--echo")
    proc = subprocess.run(argv, capture_output=True, timeout=60, env=child_env(),
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert FRAME_3.encode() in proc.stderr  # raw, on stderr
    assert b"avr_loss" not in proc.stdout  # stdout stays the JSON log lines
    assert all(line.startswith(b"{") for line in proc.stdout.splitlines())


def test_without_a_terminal_nothing_is_echoed(tmp_path: Path) -> None:
    proc = subprocess.run(_start(tmp_path / "run"), capture_output=True, timeout=60,
                          env=child_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert b"avr_loss" not in proc.stderr + proc.stdout.replace(b'"avg_loss"', b"")


def test_quiet_and_echo_exclude_each_other(tmp_path: Path) -> None:
    proc = subprocess.run(_start(tmp_path / "run", "--quiet", "--echo"), capture_output=True,
                          text=True, timeout=60, env=child_env(), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "lorasup: error: --quiet and --echo exclude each other"
    assert not (tmp_path / "run").exists()


def test_ctrl_c_at_the_terminal_still_leaves_report_csv_and_png(tmp_path: Path,
                                                                real_plot: None) -> None:
    """Ctrl-C signals the terminal's whole foreground group: lorasup stops the trainer,
    and the plot helper (in its own session) still draws the PNG."""
    run_dir = tmp_path / "run"
    terminal = Terminal(_start(run_dir, steps=200, seconds=0.2), cwd=tmp_path)
    assert terminal.wait_for(b"| 3/200 ", timeout=60), terminal.output[-2000:]
    terminal.type(b"\x03")
    code, text = terminal.finish(timeout=120)
    assert code == 130, text[-2000:]
    assert "lorasup: interrupted" in text
    for name in ("report.json", "losses.csv", "loss_curves.png"):
        assert (run_dir / name).is_file(), name
    png = (run_dir / "loss_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    from PIL import Image

    with Image.open(run_dir / "loss_curves.png") as image:
        assert image.size == (1200, 1000)  # matplotlib's figure, not the placeholder
