"""How lorasup stops a trainer's tree, and what its own stop signals mean.

The ladder: the adapter's graceful signals in order, each given its share of the grace,
then SIGKILL (README "How it stops a trainer"). lorasup's own SIGINT/SIGTERM/SIGHUP: the
first is a stop request; a second SIGINT skips what is left of the grace, while a SIGTERM
or SIGHUP repeated within seconds is the same request (README "Signals"). SIGUSR1 is a
scheduler's "time is nearly up": the same graceful stop, outcome ``preempted``; repeated, it
asks for nothing new.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import anyio
import structlog
from anyio.abc import ObjectSendStream

from lorasup.supervisor.events import Event, SignalSent
from lorasup.supervisor.process import ProcessTree, wait_gone
from lorasup.supervisor.signals import PREEMPT_SIGNAL
from lorasup.supervisor.sink import Batch, emit

log = structlog.get_logger("lorasup")

#: a SIGTERM or SIGHUP this soon after the first stop signal is the same request (a
#: scheduler and a wrapper script both forwarding it), not a reason to skip the grace
REPEATED_SIGNAL_SECONDS = 2.0
#: stop signals a scheduler or service manager may repeat (a second SIGINT is a person's)
REPEATABLE_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
#: how long the tree may take to go after SIGKILL before lorasup says it survived
KILL_WAIT_SECONDS = 10.0


class Stopper:
    """The escalation ladder for one run, and lorasup's own stop signals."""

    def __init__(self, stop_signals: tuple[signal.Signals, ...], grace: float, *,
                 clock: Callable[[], float], request_stop: Callable[[str], None]) -> None:
        self.stop_signals = stop_signals
        self.grace = grace
        self.now = clock
        self.request_stop = request_stop
        #: lorasup sent SIGINT: what the trainer prints then may be the stop (outcome.py)
        self.sigint_sent = False
        #: the signal that stopped lorasup itself, the first one
        self.interrupt_signal: signal.Signals | None = None
        self._signalled_at = 0.0
        #: a second stop signal: no grace (what is left of it is cut short)
        self.force = False
        self._grace_scope: anyio.CancelScope | None = None

    def on_signal(self, sig: signal.Signals) -> None:
        """lorasup's own stop signal: stop the trainer, or skip the grace when repeated."""
        now = time.monotonic()
        if self.interrupt_signal is None:
            self.interrupt_signal = sig
            self._signalled_at = now
            log.warning("lorasup_signalled", signal=sig.name)
            self.request_stop("preempted" if sig == PREEMPT_SIGNAL else "interrupted")
        elif sig == PREEMPT_SIGNAL or (  # a repeated time warning asks for nothing new
                sig in REPEATABLE_SIGNALS and self.interrupt_signal in REPEATABLE_SIGNALS
                and now - self._signalled_at < REPEATED_SIGNAL_SECONDS):
            log.warning("lorasup_signalled_again", signal=sig.name,
                        action="the same stop request: the grace goes on")
        else:
            log.warning("lorasup_signalled_again", signal=sig.name,
                        action="skipping the grace period")
            self.force = True
            if self._grace_scope is not None:
                self._grace_scope.cancel()

    def send(self, tree: ProcessTree, sig: signal.Signals, reason: str,
             batch: list[tuple[float, Event]]) -> None:
        t = self.now()  # before: whatever the signal makes the trainer print comes later
        pids = tree.signal(sig)
        self.sigint_sent = self.sigint_sent or sig == signal.SIGINT
        batch.append((t, SignalSent(signal=sig.name, reason=reason, pids=tuple(pids))))
        log.warning("signal_sent", signal=sig.name, reason=reason, pids=pids,
                    t=round(self.now(), 3))

    async def escalate(self, tree: ProcessTree, reason: str,
                       send: ObjectSendStream[Batch]) -> None:
        """Graceful signal(s), each given its share of the grace, then SIGKILL."""
        ladder = [] if self.force else list(self.stop_signals)
        share = self.grace / len(ladder) if ladder else 0.0
        for sig in ladder:
            batch: list[tuple[float, Event]] = []
            self.send(tree, sig, reason, batch)
            # Catch descendants that appeared since the last scan, and signal them too.
            late = tree.remember(await anyio.to_thread.run_sync(tree.discover))
            if late:
                tree.signal(sig, only=set(late))
            await emit(send, batch)
            with anyio.CancelScope() as scope:
                self._grace_scope = scope
                if await wait_gone(tree, share):
                    return
            if self.force:
                break
        batch = []
        self.send(tree, signal.SIGKILL, reason, batch)
        await emit(send, batch)
        if not await wait_gone(tree, KILL_WAIT_SECONDS):
            log.error("processes_survived_sigkill", pids=tree.survivors())
