"""``systemd/k8s/lorasup-job.yaml``: valid for Kubernetes 1.29-1.34, and what it asks of
Kubernetes matches lorasup's exit-code table and resume rules.

The schema check needs ``kubernetes-validate`` (the test extra); without it only that test
skips. The retry path is run for real: two ``lorasup start`` attempts with the container's
own command line, the first cut off, the second continuing it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
JOB_YAML = REPO / "systemd" / "k8s" / "lorasup-job.yaml"
VERSIONS = ("1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0")


def job() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with kubernetes-validate")
    return yaml.safe_load(JOB_YAML.read_text())


@pytest.mark.parametrize("version", VERSIONS)
def test_the_job_validates(version: str) -> None:
    validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (the test extra)")
    validate.validate(job(), version, strict=True)


def _rules() -> list[dict[str, Any]]:
    return job()["spec"]["podFailurePolicy"]["rules"]


def test_the_failure_policy_follows_the_exit_codes() -> None:
    from lorasup.supervisor.outcome import EXIT_CODES

    by_action: dict[str, set[int]] = {}
    for rule in _rules():
        if "onExitCodes" in rule:
            assert rule["onExitCodes"]["containerName"] == "lorasup"
            by_action.setdefault(rule["action"], set()).update(rule["onExitCodes"]["values"])
        else:
            assert rule["action"] == "Ignore"
            assert rule["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    fail_fast = {EXIT_CODES[n] for n in ("trainer_failed", "usage", "diverged")}
    retried = {EXIT_CODES[n] for n in ("preempted", "stalled", "timeout", "internal_error")}
    assert by_action["FailJob"] == fail_fast
    assert retried | {130, 143} == by_action["Count"]
    assert _rules()[0]["action"] == "FailJob"  # first match wins: fail fast comes first


def test_the_pod_mounts_shared_memory_and_keeps_runs_on_the_volume() -> None:
    spec = job()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    container = spec["containers"][0]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "persistentVolumeClaim" in volumes[mounts["/data"]]
    command = container["command"]
    for flag in ("--logs-dir", "--run-dir"):
        assert command[command.index(flag) + 1].startswith("/data/")
    assert container["workingDir"].startswith("/data/")
    assert "--resume-newest" in command
    assert spec["restartPolicy"] == "Never"


def _container_argv(tmp_path: Path, pod: str) -> list[str]:
    """The container's command with its paths moved under ``tmp_path`` and $(POD_NAME) set."""
    command = job()["spec"]["template"]["spec"]["containers"][0]["command"]
    argv = [a.replace("$(POD_NAME)", pod).replace("/data/", f"{tmp_path}/data/")
            .replace("/etc/lorasup/", f"{tmp_path}/etc/") for a in command]
    assert argv[0] == "lorasup"
    return [sys.executable, "-m", "lorasup", *argv[1:]]


def test_a_retried_pod_resumes_the_newest_attempt(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "job.toml").write_text(
        'steps = 120\ngrace = 20\ncommand = ["--batch-size", "64"]\n')
    work = tmp_path / "data" / "lora-mystyle"
    work.mkdir(parents=True)
    logs = work / "training_logs"
    first = subprocess.Popen(_container_argv(tmp_path, "pod-a"), cwd=work,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while b'"kind":"step","step":10,' not in _read(logs / "pod-a" / "events.jsonl"):
        assert time.monotonic() < deadline and first.poll() is None, first.stderr
        time.sleep(0.02)
    first.send_signal(signal.SIGTERM)  # the kubelet's stop of an evicted pod
    first.communicate(timeout=60)
    assert first.returncode == 143
    second = subprocess.run(_container_argv(tmp_path, "pod-b"), cwd=work,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    steps = [_steps(logs / pod) for pod in ("pod-a", "pod-b")]
    assert steps[0] + steps[1] == list(range(1, 121))
    assert os.path.exists(work / "lora_output" / "lorasup_lora.safetensors")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _steps(run_dir: Path) -> list[int]:
    import json

    return [e["step"] for e in map(json.loads, (run_dir / "events.jsonl").read_text()
                                   .splitlines()) if e["kind"] == "step"]
