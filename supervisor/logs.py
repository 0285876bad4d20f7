"""structlog setup: JSON lines for machines (journald, files, pipes), console for people.

Every entry carries the run id through structlog's context variables. Every field goes
through ``redact.redact_value`` here, once, so no caller has to remember to.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TextIO

import structlog

from lorasup.supervisor.redact import redact_value


def _redact_event(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key, value in event_dict.items():
        if key != "event":
            event_dict[key] = redact_value(value, key)
    return event_dict


class ResilientStream:
    """Where log lines go: the given stream until writing to it fails (a closed pipe, EIO
    after a hangup), then ``lorasup.log`` in the run directory. lorasup's own output can
    never end a run."""

    def __init__(self, stream: TextIO) -> None:
        self.stream: TextIO | None = stream
        self.fallback: Path | None = None
        self._fallback_fd: int | None = None
        #: why the stream was given up, once it was
        self.failed: str | None = None

    def isatty(self) -> bool:
        try:
            return self.stream is not None and self.stream.isatty()
        except (OSError, ValueError):
            return False

    def write(self, text: str) -> int:
        if self.stream is not None:
            try:
                written = self.stream.write(text)
                self.stream.flush()
                return written
            except (OSError, ValueError) as exc:
                self.failed = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
                _point_at_devnull(self.stream)
                self.stream = None
                self._to_fallback(f'{{"event":"log_stream_failed","error":"{self.failed}",'
                                  '"action":"logging to this file from here on"}\n')
        return self._to_fallback(text)

    def flush(self) -> None:
        return None

    def _to_fallback(self, text: str) -> int:
        if self.fallback is None:
            return 0
        try:
            if self._fallback_fd is None:
                from lorasup.supervisor.safefs import open_append

                self._fallback_fd = open_append(self.fallback)
            return os.write(self._fallback_fd, text.encode("utf-8", "replace"))
        except OSError:
            return 0


_STREAM: ResilientStream | None = None


def set_fallback_file(path: Path) -> None:
    """Where the logs go if stdout fails during this run (``lorasup.log`` in the run dir)."""
    if _STREAM is not None:
        _STREAM.fallback = path


def _point_at_devnull(stream: TextIO) -> None:
    """Put /dev/null under a stream whose pipe broke, so nothing (the interpreter's flush
    at exit included) fails on it again."""
    try:
        fd = stream.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError, AttributeError):
        return
    try:
        os.dup2(devnull, fd)
    except OSError:
        pass
    finally:
        os.close(devnull)


#: erases the terminal line the cursor is on: the live progress line console.py draws on stderr
CLEAR_LINE = "\r\x1b[K"

#: while the trainer's output is echoed on the terminal: runs a log line's write between
#: the echo's writes, on a line of its own (console.TerminalEcho.interject)
_interject: Callable[[Callable[[], None]], None] | None = None


def set_interject(hook: Callable[[Callable[[], None]], None] | None) -> None:
    """Route log lines written to a terminal through ``hook`` (None: directly again)."""
    global _interject
    _interject = hook


class InterjectingLogger:
    """A log line on the terminal the trainer's echoed output is drawn on: written whole,
    in one write, between the echo's writes (see :func:`set_interject`)."""

    def __init__(self, file: TextIO, hook: Callable[[Callable[[], None]], None]) -> None:
        self._file = file
        self._hook = hook

    def msg(self, message: str) -> None:
        text = message + "\n"
        self._hook(lambda: self._write(text))

    def _write(self, text: str) -> None:
        self._file.write(text)
        self._file.flush()

    log = debug = info = warn = warning = error = err = critical = exception = msg
    fatal = failure = msg


class LineClearingLogger:
    """Prints each log line after erasing the live ``step k/N`` line on the terminal.

    The progress line is redrawn in place without a newline; a log line printed over it
    would be glued to its end. The next step redraws the progress line below the log.
    """

    def __init__(self, file: TextIO, terminal: TextIO) -> None:
        self._file = file
        self._terminal = terminal

    def msg(self, message: str) -> None:
        try:
            self._terminal.write(CLEAR_LINE)
            self._terminal.flush()
        except (OSError, ValueError):  # a closed terminal must not cost the log line
            pass
        self._file.write(message + "\n")
        self._file.flush()

    log = debug = info = warn = warning = error = err = critical = exception = msg
    fatal = failure = msg


def resolve_format(log_format: Literal["auto", "json", "console"], stream: TextIO) -> str:
    if log_format != "auto":
        return log_format
    isatty = getattr(stream, "isatty", None)
    return "console" if isatty is not None and isatty() else "json"


def configure(log_format: Literal["auto", "json", "console"] = "auto",
              stream: TextIO | None = None) -> str:
    """Configure structlog for the process; returns the format chosen."""
    global _STREAM
    stream = stream or sys.stdout
    chosen = resolve_format(log_format, stream)
    _STREAM = stream if isinstance(stream, ResilientStream) else ResilientStream(stream)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if chosen == "json":
        # Tracebacks become text first, so the redaction sees them too.
        processors += [structlog.processors.format_exc_info, _redact_event,
                       structlog.processors.JSONRenderer(ensure_ascii=False)]
    else:
        processors += [_redact_event, structlog.dev.ConsoleRenderer(colors=_STREAM.isatty())]
    terminal = sys.stderr
    if chosen == "console" and terminal is not None and terminal.isatty():
        def plain(*_args: Any) -> Any:
            return LineClearingLogger(_STREAM, terminal)  # type: ignore[arg-type]
    else:
        plain = structlog.PrintLoggerFactory(file=_STREAM)  # type: ignore[arg-type]
    stream = _STREAM

    def factory(*args: Any) -> Any:
        # Asked at every log call: the echo starts and ends after configure().
        hook = _interject
        if hook is not None and stream.isatty():
            return InterjectingLogger(stream, hook)  # type: ignore[arg-type]
        return plain(*args)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    return chosen
