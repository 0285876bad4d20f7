"""Slots from GPUs: NVML (``nvidia-ml-py``, optional) finds them and tells whether a
process that is not ours holds one; without NVML the given list is trusted as it is.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import structlog

from lorasup.supervisor.serve.scheduler import Slot

log = structlog.get_logger(__name__)


class GpuSpecError(ValueError):
    pass


@functools.cache
def _nvml() -> Any | None:
    """The initialised pynvml module, or None where it is missing or finds no driver
    (asked once per process: the answer does not change while the daemon runs)."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError subclasses; no driver, no device
        log.info("nvml_unavailable", error=str(exc))
        return None
    return pynvml


def slots(gpus: str, count: int) -> tuple[list[Slot], bool]:
    """The daemon's slots and whether they are GPUs.

    ``none``: ``count`` CPU slots. ``auto``: one per GPU NVML sees, else ``count`` CPU
    slots. ``0,1,...``: those GPUs, checked against NVML where it exists.
    """
    if count < 1:
        raise GpuSpecError("--slots must be at least 1")
    spec = gpus.strip().lower()
    if spec == "none":
        return [Slot(f"cpu{i}") for i in range(count)], False
    if spec == "auto":
        nvml = _nvml()
        found = 0
        if nvml is not None:
            with contextlib.suppress(Exception):
                found = int(nvml.nvmlDeviceGetCount())
        if found:
            return [Slot(f"gpu{i}", (str(i),)) for i in range(found)], True
        return [Slot(f"cpu{i}") for i in range(count)], False
    indices = [part.strip() for part in spec.split(",") if part.strip()]
    if not indices or not all(i.isdigit() for i in indices):
        raise GpuSpecError(f"--gpus must be auto, none or a list like 0,1 — not {gpus!r}")
    if len(set(indices)) != len(indices):
        raise GpuSpecError(f"--gpus lists a GPU twice: {gpus!r}")
    nvml = _nvml()
    count: int | None = None
    if nvml is not None:
        with contextlib.suppress(Exception):
            count = int(nvml.nvmlDeviceGetCount())
    missing = [i for i in indices if count is not None and int(i) >= count]
    if missing:
        raise GpuSpecError(f"--gpus names GPU {missing[0]}, but NVML sees {count}")
    return [Slot(f"gpu{i}", (i,)) for i in indices], True


def foreign_holders(device: str) -> list[int]:
    """Pids of processes using GPU ``device`` (an index); [] without NVML.

    Called only for a GPU no job of this daemon holds, so any process on it is foreign: a
    dead job's leftover or someone's notebook.
    """
    nvml = _nvml()
    if nvml is None:
        return []
    pids: set[int] = set()
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(int(device))
        for query in (nvml.nvmlDeviceGetComputeRunningProcesses,
                      nvml.nvmlDeviceGetGraphicsRunningProcesses):
            with contextlib.suppress(Exception):
                pids.update(int(p.pid) for p in query(handle))
    except Exception as exc:
        log.warning("nvml_query_failed", device=device, error=str(exc))
    return sorted(pids)


def nvml_available() -> bool:
    """Whether NVML answers here (blocking on first use: it loads the driver library)."""
    return _nvml() is not None


MIB = 1 << 20


def memory(devices: tuple[str, ...], pids: set[int]) -> dict[str, Any]:
    """GPU memory of ``devices`` (indices; summed over them) and of the processes ``pids``
    on them, in MiB: ``used_mib``/``total_mib`` always, ``job_mib`` only where NVML lists
    one of ``pids`` with a known ``usedGpuMemory`` (it reports None without the rights, or
    under MIG). Raises where NVML is missing or a query fails: the caller says why.
    Blocking: call from a worker thread."""
    nvml = _nvml()
    if nvml is None:
        raise RuntimeError("no NVML")
    used = total = 0
    job_bytes: int | None = None
    for device in devices:
        handle = nvml.nvmlDeviceGetHandleByIndex(int(device))
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        used += int(info.used)
        total += int(info.total)
        with contextlib.suppress(Exception):  # not listed: the job's share stays unknown
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                amount = getattr(proc, "usedGpuMemory", None)
                if int(proc.pid) in pids and isinstance(amount, int):
                    job_bytes = (job_bytes or 0) + amount
    out: dict[str, Any] = {"device": ",".join(devices), "used_mib": round(used / MIB, 1),
                           "total_mib": round(total / MIB, 1)}
    if job_bytes is not None:
        out["job_mib"] = round(job_bytes / MIB, 1)
    return out
