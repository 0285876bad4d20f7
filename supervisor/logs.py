"""structlog setup: JSON lines for machines (journald, files, pipes), console for people.

Every entry carries the run id through structlog's context variables. Secrets in argv
and values are redacted here, once, so no caller has to remember to.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TextIO

import structlog

REDACTED = "***"

# --- which names are secret ------------------------------------------------------------
#
# A name (flag, env variable, log field, header) is split into words on ``-``, ``_``, ``.``
# and camelCase; it names a secret when its LAST word is a secret noun. So ``--hf_token``,
# ``--wandb_api_key``, ``HUGGING_FACE_HUB_TOKEN``, ``--db-password``, ``apiKey`` are secret,
# and trainers' ``--max_token_length``, ``--token_warmup_step``, ``--keep_tokens``,
# ``--tokenizer_cache_dir`` are not (the secret word is not what the flag names). ``token``
# and ``key`` are also vocabulary or data words: ``--placeholder_token``, ``--eos_token``,
# ``--caption_key`` name no secret.

_WORDS = re.compile(r"[-_.\s]+|(?<=[a-z0-9])(?=[A-Z])")
#: last words that always name a secret
_SECRET_WORDS = frozenset({
    "secret", "secrets", "password", "passwords", "passwd", "pwd", "passphrase", "credential",
    "credentials", "cookie", "cookies", "auth", "apikey", "session", "sessionid", "bearer",
})
#: one-word names that end like a secret (``PGPASSWORD``, ``MYAPIKEY``)
_SECRET_ENDINGS = ("password", "passwd", "passphrase", "apikey", "secret")
#: ``<word>_token`` that is a vocabulary token, not a credential
_VOCABULARY = frozenset({
    "bos", "eos", "pad", "unk", "sep", "cls", "mask", "placeholder", "initializer", "trigger",
    "class", "special", "instance", "identifier", "start", "end", "stop", "eot", "image",
    "vocab", "new", "added", "num", "max", "min", "first", "last", "rare", "concept",
    "caption", "prefix", "suffix", "tool", "think", "system", "user", "assistant", "fill",
})
#: ``<word>_key`` that names a field of the data, not a credential
_DATA_KEYS = frozenset({
    "image", "caption", "text", "label", "sort", "dataset", "data", "column", "metadata",
    "meta", "prompt", "input", "output", "target", "json", "dict", "cache", "group",
    "partition", "shard", "id", "lookup", "hash", "state", "model", "config", "map", "index",
    "layer", "module", "weight", "weights", "param", "tensor", "condition", "conditioning",
    "video", "audio", "mask", "latent", "latents", "sample", "class", "instance", "feature",
    "features", "frame", "primary", "foreign", "sub", "row", "record", "field", "name",
})


def is_secret_name(name: str) -> bool:
    """Whether a flag, variable, field or header name names a secret (see above)."""
    words = [w.lower() for w in _WORDS.split(name.strip("-\"' ")) if w]
    if not words:
        return False
    last = words[-1]
    if last in _SECRET_WORDS or last.endswith(_SECRET_ENDINGS):
        return True
    qualifier = words[-2] if len(words) > 1 else ""
    if last == "token":
        return qualifier not in _VOCABULARY
    if last == "key":
        return qualifier not in _DATA_KEYS
    return False


# --- secrets in free text ---------------------------------------------------------------

#: well-known credential shapes, wherever they appear
_TOKEN_SHAPES = re.compile(
    r"(?<![A-Za-z0-9_])(?:"
    r"hf_[A-Za-z0-9]{20,}"                                # Hugging Face
    r"|sk-[A-Za-z0-9_-]{16,}"                             # OpenAI, Anthropic
    r"|[sr]k_(?:live|test)_[A-Za-z0-9]{16,}"              # Stripe
    r"|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"  # GitHub
    r"|glpat-[A-Za-z0-9_-]{20,}"                          # GitLab
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"                     # Slack
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"                         # AWS access key id
    r"|AIza[0-9A-Za-z_-]{35}"                             # Google API key
    r"|npm_[A-Za-z0-9]{36}|pypi-[A-Za-z0-9_-]{50,}"       # npm, PyPI
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # a JWT
    r")"
)
#: ``scheme://user:PASSWORD@host``
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]{0,30}://[^\s:/?#@]*:)"
                           r"(?P<secret>[^\s/?#@]+)(?=@)")
#: ``Authorization: Bearer X``, ``Proxy-Authorization: token X``, ``Authorization: X``
_AUTH_HEADER = re.compile(
    r"(?P<head>(?<![\w-])(?:[Pp]roxy-)?[Aa]uthorization[\"']?\s*[:=]\s*[\"']?"
    r"(?:(?:Bearer|bearer|BEARER|Basic|basic|Token|token|Digest|digest|Bot|bot)\s+)?)"
    r"(?P<secret>[^\s\"',;]+)")
#: ``Bearer X`` anywhere: X must look like a credential (no word of prose)
_BEARER = re.compile(r"(?P<head>(?<![\w-])(?:Bearer|bearer|BEARER)\s+)"
                     r"(?P<secret>[A-Za-z0-9._~+/-]{8,}=*)")
#: ``name=value``, ``name: value``, ``"name": "value"``: masked when the name is secret
_NAMED_VALUE = re.compile(
    r"(?P<name>(?<![\w.-])-{0,2}[A-Za-z_][\w.-]{0,63})(?P<sep>[\"']?\s*[:=]\s*)"
    r"(?P<secret>\"[^\"]*\"|'[^']*'|[^\s,;\"'}\])]+)")
#: ``--name value`` inside text (argv pasted into a log line or an error message)
_FLAG_VALUE = re.compile(r"(?P<name>(?<![\w-])--?[A-Za-z][\w.-]{0,63})(?P<sep>\s+)"
                         r"(?P<secret>[^\s-]\S*)")


def _mask(match: re.Match[str]) -> str:
    return match["head"] + REDACTED


def _looks_like_credential(text: str) -> bool:
    """Not a word of prose: long, or with a digit or an inner capital."""
    return len(text) >= 20 or any(c.isdigit() for c in text) or text[1:] != text[1:].lower()


def _mask_bearer(match: re.Match[str]) -> str:
    secret = match["secret"]
    if secret == REDACTED or not _looks_like_credential(secret):
        return match[0]
    return match["head"] + REDACTED


def _mask_named(match: re.Match[str]) -> str:
    if not is_secret_name(match["name"]):
        return match[0]
    secret = match["secret"]
    quote = secret[0] if secret[:1] in ("\"", "'") and len(secret) > 1 else ""
    return f"{match['name']}{match['sep']}{quote}{REDACTED}{quote}"


def _mask_flag(match: re.Match[str]) -> str:
    if not is_secret_name(match["name"]):
        return match[0]
    return f"{match['name']}{match['sep']}{REDACTED}"


def redact_text(text: str) -> str:
    """``text`` with credentials masked: token shapes, URL passwords, Authorization and
    Bearer values, and the values of secret-named ``name=value``/``--name value`` pairs.
    Idempotent; never raises on any str."""
    if not text:
        return text
    text = _TOKEN_SHAPES.sub(REDACTED, text)
    if "://" in text:
        text = _URL_PASSWORD.sub(_mask, text)
    if "uthorization" in text:
        text = _AUTH_HEADER.sub(_mask, text)
    if "earer" in text or "EARER" in text:
        text = _BEARER.sub(_mask_bearer, text)
    if "=" in text or ":" in text:
        text = _NAMED_VALUE.sub(_mask_named, text)
    if "-" in text:
        text = _FLAG_VALUE.sub(_mask_flag, text)
    return text


# --- argv, mappings, log fields ---------------------------------------------------------


def redact_argv(argv: Sequence[str]) -> list[str]:
    """argv with the values of secret-named flags masked, and credentials in any argument.

    Handles ``--hf_token=abc``, ``--hf_token abc`` (the next argument, unless it is itself a
    flag: a boolean flag such as ``--use_auth_token`` does not hide what follows) and
    ``KEY=value`` environment-style items.
    """
    out: list[str] = []
    hide_next = False
    for arg in argv:
        arg = str(arg)
        if hide_next:
            hide_next = False
            if not arg.startswith("-"):
                out.append(REDACTED)
                continue
        name, sep, _value = arg.partition("=")
        if sep and _is_name(name) and is_secret_name(name):
            out.append(f"{name}={REDACTED}")
            continue
        if not sep and arg.startswith("-") and _is_name(arg) and is_secret_name(arg):
            hide_next = True
            out.append(arg)
            continue
        out.append(redact_text(arg))
    return out


def _is_name(text: str) -> bool:
    return _ARG_NAME.fullmatch(text) is not None


_ARG_NAME = re.compile(r"-{0,2}[A-Za-z_][\w.-]{0,127}")

#: log fields that hold a command line (flag and value are separate items)
_ARGV_FIELDS = frozenset({"argv", "command", "cmd", "trainer_argv", "args"})
_MAX_DEPTH = 8


def redact_value(value: Any, key: str = "", depth: int = 0) -> Any:
    """A log field's value with secrets masked, through nested lists, tuples and dicts."""
    if (key and isinstance(value, str | int | float | bytes) and not isinstance(value, bool)
            and is_secret_name(key)):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if depth >= _MAX_DEPTH:
        return value
    if isinstance(value, list | tuple):
        if key in _ARGV_FIELDS and all(isinstance(item, str) for item in value):
            redacted = redact_argv(value)
        else:
            redacted = [redact_value(item, "", depth + 1) for item in value]
        return type(value)(redacted) if isinstance(value, tuple) else redacted
    if isinstance(value, dict):
        return {k: redact_value(v, k if isinstance(k, str) else "", depth + 1)
                for k, v in value.items()}
    return value


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


#: erases the terminal line the cursor is on: the live progress line run.py draws on stderr
CLEAR_LINE = "\r\x1b[K"


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
        def factory(*_args: Any) -> Any:
            return LineClearingLogger(_STREAM, terminal)  # type: ignore[arg-type]
    else:
        factory = structlog.PrintLoggerFactory(file=_STREAM)  # type: ignore[arg-type]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    return chosen
