"""A stand-in for nvidia-ml-py's ``pynvml`` on machines without an NVIDIA driver.

The GPUs and the processes on them come from the JSON file named by ``$FAKE_NVML``
(``{"count": 2, "holders": {"0": [1234]}}``), read on every call, so a test can change
what the daemon sees while it runs.
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
    usedGpuMemory: int = 0  # pynvml spells it so


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
    return [_Process(pid) for pid in _state().get("holders", {}).get(str(handle), [])]


def nvmlDeviceGetGraphicsRunningProcesses(handle: int) -> list[_Process]:
    return []
