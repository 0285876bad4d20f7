"""What the parts of the daemon share: its configuration, one followed attempt, and
the attributes every part of ``Daemon`` reads (declared once, set by ``Daemon``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from lorasup.supervisor.notify import Notifier
from lorasup.supervisor.serve.hooks import Webhooks
from lorasup.supervisor.serve.procid import Identity
from lorasup.supervisor.serve.runs import POLL_SECONDS, EventsFollower, Progress
from lorasup.supervisor.serve.scheduler import Slot
from lorasup.supervisor.serve.store import Store


@dataclass
class DaemonConfig:
    state_dir: Path
    slots: int = 1
    gpus: str = "auto"
    until_empty: bool = False
    #: with until_empty: seconds of an empty queue and no run before the daemon exits
    idle: float = 10.0
    listen: str | None = None
    token: str | None = None
    #: (certificate, key) files: the --listen socket speaks HTTPS
    tls: tuple[str, str] | None = None
    notify: dict[str, str] = field(default_factory=dict)
    retry_backoff: float = 10.0
    poll_seconds: float = POLL_SECONDS


@dataclass
class Running:
    """One attempt being followed."""

    job_id: int
    n: int
    run_dir: Path
    slots: tuple[Slot, ...]
    grace: float
    identity: Identity | None
    own_child: bool
    follower: EventsFollower
    stop_request: str | None = None
    started: float = field(default_factory=time.time)
    done: anyio.Event = field(default_factory=anyio.Event)
    #: the newest GPU memory sample (gpumemory.py); None: none taken
    gpu_memory: dict[str, Any] | None = None
    #: why the last sample failed; None: it did not
    gpu_memory_off: str | None = None

    @property
    def progress(self) -> Progress:
        return self.follower.progress


class DaemonParts:
    """The state the daemon's parts (its mixins) share; ``Daemon.__init__`` sets it."""

    config: DaemonConfig
    state: Path
    slots: list[Slot]
    gpu_mode: bool
    running: dict[int, Running]
    accepting: bool
    stopping: bool
    exit_code: int
    hooks: Webhooks
    notifier: Notifier
    started: float
    store: Store | None
    _wake: anyio.Event
    _stop: anyio.Event
    _tg: Any
    _fault_logged: str | None
    _poisoned: set[int]
    _child_umask: int
    #: when the queue became empty with nothing running (monotonic); None while busy
    _idle_since: float | None
