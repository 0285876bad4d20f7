"""GPU memory on the dashboard: sampled through NVML while a job runs on a GPU slot.

No GPU here: ``tests/helpers/fake_nvml/pynvml.py`` stands in for the hardware library only
(put on the daemon's PYTHONPATH); the daemon, its runs and the trainers are real processes.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from tests.serve_support import bar_job, events_of
from tests.support import HELPERS, child_env, wait_for

MIB = 1 << 20


def _fake_nvml_env(state: Path | None) -> dict[str, str]:
    path = os.pathsep.join([str(HELPERS / "fake_nvml"), child_env()["PYTHONPATH"]])
    env = {"PYTHONPATH": path}
    if state is not None:
        env["FAKE_NVML"] = str(state)
    return env


def test_nvml_numbers_reach_the_job_and_its_peak_stays(daemons, tmp_path: Path) -> None:
    nvml = tmp_path / "nvml.json"
    nvml.write_text(json.dumps({"count": 1, "holders": {},
                                "memory": {"0": [3072 * MIB, 81920 * MIB]}}))
    d = daemons(env=_fake_nvml_env(nvml)).start("--gpus", "0")
    job = d.submit_ok(bar_job(600, 0.05))
    d.wait_step(job, 1)
    seen: dict[str, Any] = {}

    def sampled(key: str | None) -> bool:
        seen.clear()
        seen.update(d.job(job))
        memory = seen.get("gpu_memory")
        return memory is not None and (key is None or key in memory)

    # no process of the job listed by NVML yet: the device's numbers, the job's absent
    assert wait_for(lambda: sampled(None), timeout=15), seen
    assert seen["gpu_memory"]["used_mib"] == 3072.0 and "job_mib" not in seen["gpu_memory"]
    run_dir = seen["run_dir"]
    trainer = next(e["pid"] for e in events_of(run_dir) if e["kind"] == "started")
    nvml.write_text(json.dumps({"count": 1, "holders": {"0": [trainer, 999999]},
                                "used": {str(trainer): 1536 * MIB, "999999": 7 * MIB},
                                "memory": {"0": [4096 * MIB, 81920 * MIB]}}))
    assert wait_for(lambda: sampled("job_mib"), timeout=15), seen
    memory = seen["gpu_memory"]
    assert memory["device"] == "0"
    assert (memory["used_mib"], memory["total_mib"], memory["job_mib"]) == (
        4096.0, 81920.0, 1536.0)  # a foreign pid on the GPU is not the job's
    assert isinstance(memory["t"], float) and "gpu_memory_absent" not in seen
    listed = next(j for j in d.http.get("/jobs").json()["jobs"] if j["id"] == job)
    assert listed["gpu_memory"]["job_mib"] == 1536.0
    d.http.post(f"/jobs/{job}/cancel")
    assert d.wait(job)["state"] == "cancelled"
    done = d.job(job)  # (wait's dict keeps the keys of earlier answers)
    assert "gpu_memory" not in done and done["gpu_memory_absent"] == "not running"
    assert done["gpu_memory_peak"] == {"used_mib": 4096.0, "job_mib": 1536.0}


def test_without_nvml_or_on_a_cpu_slot_the_memory_is_absent_and_said_why(
        daemons, tmp_path: Path) -> None:
    # pynvml importable but no driver (its nvmlInit fails): the GPU list is trusted as given
    d = daemons(env=_fake_nvml_env(None)).start("--gpus", "0")
    job = d.submit_ok(bar_job(600, 0.05))
    running = d.wait_step(job, 1)
    assert running["devices"] == "0"
    rows: list[dict[str, Any]] = []

    def said() -> bool:
        rows.append(d.job(job))
        return rows[-1].get("gpu_memory_absent") == "no NVML"

    assert wait_for(said, timeout=15), rows[-1]
    assert not any("gpu_memory" in row or "gpu_memory_peak" in row for row in rows)
    d.http.post(f"/jobs/{job}/cancel")
    assert d.wait(job)["state"] == "cancelled"
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    cpu = daemons().start()  # --gpus none: CPU slots
    job = cpu.submit_ok(bar_job(600, 0.05))
    cpu.wait_step(job, 1)
    assert wait_for(lambda: cpu.job(job).get("gpu_memory_absent") == "CPU slot", timeout=10)
    assert "gpu_memory" not in cpu.job(job)
    cpu.http.post(f"/jobs/{job}/cancel")
    assert cpu.wait(job)["state"] == "cancelled"
