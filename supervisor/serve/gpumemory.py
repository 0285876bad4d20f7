"""GPU memory of running jobs, for the dashboard: sampled through NVML (optional) every few
seconds, off the event loop, one query in flight at a time.

A job's row shows ``gpu_memory`` only where a sample was taken (never a 0 standing in for
"unknown"); otherwise ``gpu_memory_absent`` says why in words. The peak of each job is kept
for the daemon's lifetime (bounded), so a finished job still shows it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import anyio
import psutil
import structlog

from lorasup.supervisor.serve import gpus as gpu_slots
from lorasup.supervisor.serve.daemonparts import DaemonParts, Running

log = structlog.get_logger("lorasup.serve")

#: seconds between two samples of every running job's GPU memory
SAMPLE_SECONDS = 3.0
#: jobs whose peak is remembered (the newest)
PEAKS_KEPT = 1000
#: descendants of a run's processes looked at (a trainer with a huge process tree is cut)
MAX_PIDS = 4096


def job_pids(roots: list[int]) -> set[int]:
    """The pids of the run's process tree: its supervisor, its trainer, their descendants
    (blocking: reads /proc)."""
    pids: set[int] = set()
    for root in roots:
        try:
            proc = psutil.Process(root)
            pids.add(root)
            for child in proc.children(recursive=True):
                pids.add(child.pid)
                if len(pids) >= MAX_PIDS:
                    return pids
        except (psutil.Error, OSError):
            continue
    return pids


def _sample(wanted: list[tuple[int, tuple[str, ...], list[int]]]
            ) -> dict[int, dict[str, Any] | str]:
    """One sample per job: its numbers, or why there are none (blocking: a thread)."""
    out: dict[int, dict[str, Any] | str] = {}
    for job_id, devices, roots in wanted:
        try:
            found = gpu_slots.memory(devices, job_pids(roots))
        except Exception as exc:  # NVMLError and its kin: said, never a 0
            out[job_id] = f"NVML query failed: {type(exc).__name__}: {exc}"[:200]
            continue
        found["t"] = round(time.time(), 3)
        out[job_id] = found
    return out


class GpuMemory(DaemonParts):
    """The sampling loop and what a job's row shows of it."""

    #: why no job's memory is measured (set by the loop once it knows); None: it is
    _gpu_memory_off: str | None = "not sampled yet"
    #: the newest samples' peaks per job (bounded)
    _gpu_peaks: OrderedDict[int, dict[str, Any]]

    async def _sample_gpu_memory(self) -> None:
        """Every SAMPLE_SECONDS: the memory of each running job's devices (a task of the
        daemon's task group)."""
        if not self.gpu_mode:
            self._gpu_memory_off = "CPU slot"
            return
        if not await anyio.to_thread.run_sync(gpu_slots.nvml_available):
            self._gpu_memory_off = "no NVML"
            return
        self._gpu_memory_off = None
        while True:
            try:
                await self._sample_once()
            except Exception as exc:  # a fault here never takes the daemon down
                log.error("gpu_memory_sampling_failed", error=str(exc)[:200])
            await anyio.sleep(SAMPLE_SECONDS)

    async def _sample_once(self) -> None:
        runs = [run for run in self.running.values() if self._devices(run)]
        wanted = [(run.job_id, self._devices(run), [
            pid for pid in (run.identity.pid if run.identity else None,
                            run.progress.trainer_pid) if pid is not None])
            for run in runs]
        if not wanted:
            return
        found = await anyio.to_thread.run_sync(_sample, wanted)
        for run in runs:
            sample = found.get(run.job_id)
            if isinstance(sample, dict):
                run.gpu_memory, run.gpu_memory_off = sample, None
                self._keep_peak(run.job_id, sample)
            elif sample is not None:
                if run.gpu_memory_off != sample:
                    log.warning("gpu_memory_unknown", job=run.job_id, why=sample)
                run.gpu_memory, run.gpu_memory_off = None, sample

    def _devices(self, run: Running) -> tuple[str, ...]:
        return tuple(d for s in run.slots for d in s.devices)

    def _keep_peak(self, job_id: int, sample: dict[str, Any]) -> None:
        peak = self._gpu_peaks.pop(job_id, None) or {}
        for key in ("used_mib", "job_mib"):
            if key in sample and sample[key] > peak.get(key, -1.0):
                peak[key] = sample[key]
        self._gpu_peaks[job_id] = peak
        while len(self._gpu_peaks) > PEAKS_KEPT:
            self._gpu_peaks.popitem(last=False)

    def gpu_memory_fields(self, job_id: int, state: str) -> dict[str, Any]:
        """What a job's row shows: ``gpu_memory`` (the newest sample) while it runs and one
        was taken, else ``gpu_memory_absent`` (why, in words); ``gpu_memory_peak`` where
        this daemon sampled the job."""
        out: dict[str, Any] = {}
        run = self.running.get(job_id)
        if job_id in self._gpu_peaks:
            out["gpu_memory_peak"] = dict(self._gpu_peaks[job_id])
        if state == "running" and run is not None and run.gpu_memory is not None:
            out["gpu_memory"] = dict(run.gpu_memory)
            return out
        if self._gpu_memory_off in ("CPU slot", "no NVML"):  # true of every job here
            out["gpu_memory_absent"] = self._gpu_memory_off
        elif state != "running":
            out["gpu_memory_absent"] = "not running"
        else:
            out["gpu_memory_absent"] = (run.gpu_memory_off if run is not None
                                        and run.gpu_memory_off else None) \
                or self._gpu_memory_off or "not sampled yet"
        return out
