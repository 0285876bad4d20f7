"""A stand-in for nvidia-ml-py's ``pynvml`` on machines without an NVIDIA driver.

The GPUs and the processes on them come from the JSON file named by ``$FAKE_NVML``
(``{"count": 2, "holders": {"0": [1234]}}``), read on every call, so a test can change
what the daemon sees while it runs. Memory, where a test gives it: ``"memory": {"0":
[used_bytes, total_bytes]}`` per device and ``"used": {"1234": bytes}`` per process (a
process not named there has ``usedGpuMemory`` None, as NVML reports without the rights).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass


class NVMLError(Exception):
    pass


@dataclass
class _Process:
    pid: int
    usedGpuMemory: int | None = None  # pynvml spells it so


def _state() -> dict:
    with open(os.environ["FAKE_NVML"], encoding="utf-8") as fh:
        return json.load(fh)


def nvmlInit() -> None:
    if "FAKE_NVML" not in os.environ:
        raise NVMLError("NVML Shared Library Not Found")


def nvmlDeviceGetCount() -> int:
    return int(_state()["count"])


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    if index >= nvmlDeviceGetCount():
        raise NVMLError("Invalid Argument")
    return index


def nvmlDeviceGetComputeRunningProcesses(handle: int) -> list[_Process]:
    state = _state()
    used = state.get("used", {})
    return [_Process(pid, used.get(str(pid)))
            for pid in state.get("holders", {}).get(str(handle), [])]


@dataclass
class _Memory:
    total: int
    free: int
    used: int


def nvmlDeviceGetMemoryInfo(handle: int) -> _Memory:
    found = _state().get("memory", {}).get(str(handle))
    if found is None:
        raise NVMLError("Not Supported")
    used, total = found
    return _Memory(total=total, free=total - used, used=used)


def nvmlDeviceGetGraphicsRunningProcesses(handle: int) -> list[_Process]:
    return []
