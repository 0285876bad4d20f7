"""``GET /metrics``: the daemon's state in Prometheus' text format, through prometheus_client.

Names follow Prometheus' conventions (base units, ``_total`` counters, ``_seconds``); labels
stay low-cardinality: job states and outcomes are small fixed sets, and per-job series
exist only for the running jobs (at most one per slot).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from lorasup.supervisor.serve.runs import Progress
    from lorasup.supervisor.serve.scheduler import Slot
    from lorasup.supervisor.serve.store import Store


class RunView(Protocol):
    """What the metrics read of one running attempt."""

    @property
    def slots(self) -> tuple[Slot, ...]: ...

    @property
    def progress(self) -> Progress: ...


class Source(Protocol):
    """What the metrics read of the daemon (it satisfies this; no import of it here)."""

    @property
    def store(self) -> Store | None: ...

    @property
    def running(self) -> Mapping[int, RunView]: ...

    @property
    def slots(self) -> Sequence[Slot]: ...

#: run duration buckets (seconds): a minute to a day
DURATION_BUCKETS = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0)


class DaemonCollector:
    """Read at scrape time from the store and the daemon's memory; holds no state itself."""

    def __init__(self, daemon: Source) -> None:
        self.daemon = daemon

    def collect(self) -> Any:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        daemon = self.daemon
        store = daemon.store
        assert store is not None
        jobs = GaugeMetricFamily("lorasup_jobs", "Jobs by state.", labels=["state"])
        for state, count in store.counts().items():
            jobs.add_metric([state], count)
        yield jobs
        finished = CounterMetricFamily("lorasup_jobs_finished", "Jobs that reached a final "
                                       "state, by outcome.", labels=["outcome"])
        for outcome, count in store.finished_outcomes().items():
            finished.add_metric([outcome], count)
        yield finished
        busy = len({s.name for r in daemon.running.values() for s in r.slots})
        slots = GaugeMetricFamily("lorasup_slots", "Slots by use.", labels=["state"])
        slots.add_metric(["busy"], busy)
        slots.add_metric(["free"], len(daemon.slots) - busy)
        yield slots
        running_steps = sum(r.progress.step - r.progress.offset for r in daemon.running.values()
                            if r.progress.step is not None)
        yield CounterMetricFamily("lorasup_steps", "Optimizer steps done by finished attempts "
                                  "and the running ones.", value=store.steps_total()
                                  + running_steps)
        step = GaugeMetricFamily("lorasup_run_step", "Last step of each running job.",
                                 labels=["job"])
        requested = GaugeMetricFamily("lorasup_run_final_step", "The step each running job "
                                      "stops at.", labels=["job"])
        loss = GaugeMetricFamily("lorasup_run_loss", "Last loss of each running job.",
                                 labels=["job"])
        rate = GaugeMetricFamily("lorasup_run_steps_per_second", "Step rate of each running "
                                 "job in its current attempt.", labels=["job"])
        for job_id, run in sorted(daemon.running.items()):
            p = run.progress
            label = [str(job_id)]
            if p.step is not None:
                step.add_metric(label, p.step)
            if p.final is not None:
                requested.add_metric(label, p.final)
            if p.loss is not None:
                loss.add_metric(label, p.loss)
            if p.rate is not None:
                rate.add_metric(label, p.rate)
        yield from (step, requested, loss, rate)
        durations = sorted(store.durations())
        buckets = [(str(b), bisect.bisect_right(durations, b)) for b in DURATION_BUCKETS]
        buckets.append(("+Inf", len(durations)))
        yield HistogramMetricFamily("lorasup_run_duration_seconds", "Wall time of finished "
                                    "attempts.", buckets=buckets, sum_value=sum(durations))


def render(daemon: Source) -> tuple[bytes, str]:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.process_collector import ProcessCollector

    registry = getattr(daemon, "_metrics_registry", None)
    if registry is None:
        registry = CollectorRegistry()
        registry.register(DaemonCollector(daemon))  # type: ignore[arg-type]
        ProcessCollector(registry=registry)  # process_resident_memory_bytes: the daemon's RSS
        daemon._metrics_registry = registry  # type: ignore[attr-defined]
    return generate_latest(registry), CONTENT_TYPE_LATEST
