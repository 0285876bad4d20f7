"""The shipped units: ``systemd-analyze verify`` clean and an exposure of at most 1.6 in
``systemd-analyze security --offline=true`` (skipped where systemd-analyze is missing).

1.6, not 1.5: AF_NETLINK is allowed because NCCL needs it for multi-GPU runs (README)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def _copy(unit: str, tmp_path: Path, instance: str | None = None) -> Path:
    """The unit with ExecStart pointing at an executable that exists here."""
    text = (UNITS / unit).read_text(encoding="utf-8")
    text = text.replace("/srv/lora/.venv/bin/lorasup", sys.executable)
    name = unit.replace("@.", f"@{instance}.") if instance else unit
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("unit", "instance"), [("lorasup.service", None),
                                                ("lorasup-run@.service", "mystyle")])
def test_unit_verifies_and_is_hardened(tmp_path: Path, unit: str, instance: str | None) -> None:
    assert ANALYZE is not None
    path = _copy(unit, tmp_path, instance)
    verify = subprocess.run([ANALYZE, "verify", str(path)], capture_output=True, text=True,
                            timeout=60)
    problems = [line for line in verify.stderr.splitlines() if path.name in line]
    assert not problems, verify.stderr
    security = subprocess.run([ANALYZE, "security", "--offline=true", str(path)],
                              capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert match, security.stdout[-2000:] + security.stderr
    assert float(match.group(1)) <= 1.6
    text = path.read_text(encoding="utf-8")
    assert "\nDeviceAllow=char-nvidia-uvm rw\n" in text  # the GPUs stay reachable
    assert "\nPrivateDevices=yes" not in text
    assert "\nRestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK\n" in text  # NCCL
    assert "\nUMask=0077\n" in text


def test_daemon_unit_leaves_runs_alone_on_a_crash() -> None:
    text = (UNITS / "lorasup.service").read_text(encoding="utf-8")
    for line in ("Type=notify", "KillMode=process", "StateDirectory=lorasup",
                 "OOMPolicy=continue", "TimeoutStopSec=300"):
        assert f"\n{line}\n" in text
    run = (UNITS / "lorasup-run@.service").read_text(encoding="utf-8")
    assert "\nRestartPreventExitStatus=1 2 5\n" in run and "/etc/lorasup/%i.toml" in run
    assert "\nStateDirectoryMode=0700\n" in text
