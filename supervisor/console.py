"""What people see of a run: progress (a ``progress`` log entry at a sane rate, the
service manager's status line, lorasup's live line on a terminal) and the trainer's own
output echoed on lorasup's stderr.

The reader calls :meth:`Progress.step` for admitted steps and :meth:`TerminalEcho.feed`
for each read; neither blocks (a terminal that went away ends the live line or the echo,
never the run). With the echo on, lorasup's own live line is off: the trainer's bar is the
progress.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
from collections.abc import Callable

import structlog

from lorasup.supervisor.events import Step
from lorasup.supervisor.gate import StepGate
from lorasup.supervisor.notify import Notifier

log = structlog.get_logger("lorasup")

#: a progress log entry at most this often (and once at the last step)
PROGRESS_LOG_SECONDS = 30.0
#: the live terminal line at most this often
TTY_SECONDS = 0.1


class Progress:
    """The run's progress, told in the log, to systemd and on a terminal."""

    def __init__(self, gate: StepGate, steps: int, notifier: Notifier, *, tty: bool) -> None:
        self.gate = gate
        self.steps = steps
        self.notifier = notifier
        self.tty = tty
        self._next_log = 0.0
        self._final_logged = False
        self._last_tty = 0.0

    def due(self, step: int, t: float) -> bool:
        """Whether a step at ``t`` is worth telling (cheap: called for every new step)."""
        return t >= self._next_log or self.tty or step == self.gate.final_step

    def step(self, step: Step, t: float) -> None:
        """Progress in the logs at a sane rate, and a live line on a terminal."""
        final = self.gate.final_step
        last = step.step == final and not self._final_logged
        if t >= self._next_log or last:
            self._next_log = t + PROGRESS_LOG_SECONDS
            self._final_logged = self._final_logged or last
            values = {k: v for k, v in (("loss", step.loss), ("avg_loss", step.avg_loss),
                                        ("lr", step.lr), ("epoch", step.epoch)) if v is not None}
            log.info("progress", step=step.step, of=final, t=round(t, 1), **values)
            self.notifier.status(f"step {step.step}/{final}")
        if self.tty and (t - self._last_tty >= TTY_SECONDS or step.step == final):
            self._last_tty = t
            done = step.step - self.gate.offset
            rate = done / t if t > 0 else 0.0
            eta = (self.steps - done) / rate if rate > 0 else float("inf")
            loss = step.loss if step.loss is not None else step.avg_loss
            loss_text = f"{loss:.4g}" if loss is not None else "-"
            self.write(f"\r\x1b[Kstep {step.step}/{final}  loss {loss_text}  "
                       f"{rate:.2f} it/s  ETA {eta:.0f}s")

    def write(self, text: str) -> None:
        """The live progress line; a terminal that went away only ends the live line."""
        if not self.tty:
            return
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except (OSError, ValueError):
            self.tty = False


#: trainer bytes queued for the terminal at most; more is dropped (and said so), so a slow
#: or stopped terminal never grows lorasup's memory nor holds up its event loop
ECHO_BUFFER_BYTES = 256 * 1024
#: the terminal's current line is remembered up to this (to redraw a bar after a status
#: line); a longer line is ended with a newline instead
LINE_BYTES = 4096
#: a status line waits this long for the echo's write in progress, then goes out anyway
INTERJECT_WAIT_SECONDS = 1.0
#: at the end, the echo's queue may take this long to reach the terminal
CLOSE_SECONDS = 2.0
#: a writer thread's write at most this much at once (the lock is held per write)
WRITE_BYTES = 4096


def stderr_fd() -> int | None:
    """lorasup's stderr as a file descriptor, its buffered text written out first; None
    when there is none (closed by whoever started lorasup)."""
    try:
        sys.stderr.flush()
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


class _Hide:
    """One stream's filter: whole lines that start with the adapter's protocol prefix are
    lorasup's, not the person's; everything else passes byte for byte."""

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.at_start = True
        self.hiding = False
        self.pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self.pending + chunk if self.pending else chunk
        self.pending = b""
        prefix = self.prefix
        out = bytearray()
        pos = 0
        while pos < len(data):
            if self.at_start:
                head = data[pos:pos + len(prefix)]
                if len(head) < len(prefix) and prefix.startswith(head):
                    self.pending = data[pos:]  # a line start that may still be the prefix
                    break
                self.hiding = head == prefix
                self.at_start = False
            newline = data.find(b"\n", pos)
            end = len(data) if newline < 0 else newline + 1
            if not self.hiding:
                out += data[pos:end]
            self.at_start = newline >= 0
            pos = end
        return bytes(out)

    def close(self) -> bytes:
        pending, self.pending = self.pending, b""
        return pending


def _redraw(line: bytes) -> bytes:
    """What puts a terminal line back as it was: the last frame drawn on it (the text after
    its last ``\\r``), with the cursor where the trainer left it."""
    frames = line.split(b"\r")
    last = next((frame for frame in reversed(frames) if frame), b"")
    return last + b"\r" if not frames[-1] else last


class TerminalEcho:
    """The trainer's own output, both streams, raw (bars redrawn with their ``\\r``,
    colours kept), written to lorasup's stderr by a writer thread from a bounded queue.

    ``feed`` never blocks (a full queue drops the chunk and counts it; a note says so
    once the terminal caught up). On a terminal, lorasup's status lines go between the
    trainer's writes (``interject``): the trainer's unfinished line (a bar) is cleared,
    the status line printed, and the bar drawn again below it.
    """

    def __init__(self, fd: int, *, terminal: bool, hide_prefix: bytes | None = None,
                 limit: int = ECHO_BUFFER_BYTES) -> None:
        self.fd = fd
        self.terminal = terminal
        self.limit = limit
        self._hide = (_Hide(hide_prefix), _Hide(hide_prefix)) if hide_prefix else None
        self._cond = threading.Condition()
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self.dropped = 0
        self._closing = False
        #: held while bytes go to the terminal: a status line never lands inside a write
        self._lock = threading.Lock()
        #: the terminal's current line as the echo left it; None: unknown (too long, or
        #: bytes were dropped) but not empty
        self._line: bytearray | None = bytearray()
        self.failed = False
        self._thread = threading.Thread(target=self._run, name="lorasup-echo", daemon=True)
        self._thread.start()

    def feed(self, stream: int, chunk: bytes) -> None:
        """Queue a read of the trainer's ``stream`` (0 stdout, 1 stderr); never blocks."""
        if self._hide is not None:
            chunk = self._hide[stream].feed(chunk)
        if not chunk or self.failed:
            return
        with self._cond:
            if self._queued + len(chunk) > self.limit:
                self.dropped += len(chunk)
                return
            self._queue.append(chunk)
            self._queued += len(chunk)
            self._cond.notify()

    def interject(self, write: Callable[[], None]) -> None:
        """Run ``write`` (a status line) on a line of its own, between the trainer's
        writes; its unfinished line is drawn again after it."""
        if not self._lock.acquire(timeout=INTERJECT_WAIT_SECONDS):
            write()  # the terminal is stuck in a write: the status line goes out anyway
            return
        try:
            line = self._line
            if line is None:
                self._raw(b"\n")
                self._line = bytearray()
            elif line:
                self._raw(b"\r\x1b[K")
            write()
            if line:
                redraw = _redraw(bytes(line))
                self._raw(redraw)
                self._line = bytearray(redraw)
        finally:
            self._lock.release()

    def close(self, timeout: float = CLOSE_SECONDS) -> None:
        """What is queued goes out (within ``timeout``), then the line is ended, so that
        what lorasup prints next starts on a fresh one."""
        if self._hide is not None:
            for stream, hide in enumerate(self._hide):
                rest = hide.close()
                if rest:
                    self.feed(stream, rest)
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    break
                chunk = self._queue.popleft()
                self._queued -= len(chunk)
                caught_up = not self._queue
            self._write(chunk)
            if caught_up and self.dropped:
                self._note_dropped()
        if self.dropped:
            self._note_dropped()
        with self._lock:
            if self._line is None or self._line:
                self._raw(b"\n")
                self._line = bytearray()

    def _write(self, chunk: bytes) -> None:
        for start in range(0, len(chunk), WRITE_BYTES):
            piece = chunk[start:start + WRITE_BYTES]
            with self._lock:
                self._raw(piece)
                self._track(piece)

    def _track(self, piece: bytes) -> None:
        newline = piece.rfind(b"\n")
        if newline >= 0:
            self._line = bytearray()
            piece = piece[newline + 1:]
        if self._line is None:
            return
        if len(self._line) + len(piece) > LINE_BYTES:
            self._line = None
        else:
            self._line += piece

    def _note_dropped(self) -> None:
        with self._cond:
            dropped, self.dropped = self.dropped, 0
        with self._lock:
            start = b"" if self._line is not None and not self._line else b"\n"
            self._raw(start + f"[lorasup: {dropped} bytes of the trainer's output not shown "
                              "(the terminal was too slow); trainer.log has all]\n".encode())
            self._line = bytearray()

    def _raw(self, data: bytes) -> None:
        """Write all of ``data``; a terminal that went away ends the echo, never the run."""
        view = memoryview(data)
        while view and not self.failed:
            try:
                view = view[os.write(self.fd, view):]
            except OSError:
                self.failed = True
