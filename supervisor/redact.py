"""Secrets out of everything lorasup writes: log fields, argv, and lines of the trainer's output.

Three ways a secret is recognised: by its name (``--hf_token X``, ``WANDB_API_KEY=X``,
``"password": "X"``, wherever in a line the pair sits), by its shape (well-known token
formats, URL passwords, Authorization values), and by its value: a value lorasup has once
seen under a secret name (in the trainer's argv or environment, see ``remember``) is masked
wherever it appears later, even alone in a line of the trainer's output.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

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
#: a Hugging Face token shorter than today's (old configs and tests hold 6-19 characters):
#: masked when it reads as a credential, so ``hf_transfer`` or ``hf_hub_download`` stay
_SHORT_HF_TOKEN = re.compile(r"(?<![A-Za-z0-9_])hf_(?P<secret>[A-Za-z0-9]{6,19})(?![A-Za-z0-9_])")
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


def _mask_short_hf(match: re.Match[str]) -> str:
    return REDACTED if _looks_like_credential(match["secret"]) else match[0]


def _mask_named_values(text: str) -> str:
    """Mask the value of every secret-named ``name=value`` / ``name: value`` pair.

    A pair whose name is not secret does not swallow its value: the scan goes on from the
    value's first character, so ``env: WANDB_API_KEY=abc`` still finds the second pair.
    """
    out: list[str] = []
    pos = 0
    while True:
        match = _NAMED_VALUE.search(text, pos)
        if match is None:
            break
        if is_secret_name(match["name"]):
            secret = match["secret"]
            quote = secret[0] if secret[:1] in ("\"", "'") and len(secret) > 1 else ""
            out.append(text[pos:match.start()])
            out.append(f"{match['name']}{match['sep']}{quote}{REDACTED}{quote}")
            pos = match.end()
        else:
            out.append(text[pos:match.start("secret")])
            pos = match.start("secret")
    out.append(text[pos:])
    return "".join(out)


def _mask_flag(match: re.Match[str]) -> str:
    if not is_secret_name(match["name"]):
        return match[0]
    return f"{match['name']}{match['sep']}{REDACTED}"


def redact_text(text: str) -> str:
    """``text`` with credentials masked: values seen before as secrets (``remember``),
    token shapes, URL passwords, Authorization and Bearer values, and the values of
    secret-named ``name=value``/``--name value`` pairs anywhere in the text.
    Idempotent; never raises on any str."""
    if not text:
        return text
    if _known.pattern is not None:
        text = _known.pattern.sub(REDACTED, text)
    text = _TOKEN_SHAPES.sub(REDACTED, text)
    if "hf_" in text:
        text = _SHORT_HF_TOKEN.sub(_mask_short_hf, text)
    if "://" in text:
        text = _URL_PASSWORD.sub(_mask, text)
    if "uthorization" in text:
        text = _AUTH_HEADER.sub(_mask, text)
    if "earer" in text or "EARER" in text:
        text = _BEARER.sub(_mask_bearer, text)
    if "=" in text or ":" in text:
        text = _mask_named_values(text)
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


# --- values seen as secrets ---------------------------------------------------------------

#: a remembered value shorter than this is not masked on its own (``1``, ``true``, ``yes``
#: would blank out half of every line); it is still masked next to its name
MIN_REMEMBERED = 6
#: at most this many remembered values (the argv and environment of one run hold a few)
MAX_REMEMBERED = 64
#: environment variables whose names end in a secret word but hold none: the shell's
#: working directories (``pwd``), the desktop session's name
NOT_SECRET_ENVIRONMENT = frozenset({"PWD", "OLDPWD", "DESKTOP_SESSION"})


def _rememberable(value: str) -> bool:
    """A value worth masking wherever it shows: long enough, and not a path (a secret-named
    variable that holds a folder would otherwise mask that folder in every line)."""
    return (len(value) >= MIN_REMEMBERED and REDACTED not in value
            and not value.startswith(("/", "~/", "./")))


class _Known:
    """The secret values seen so far, longest first, as one compiled alternation."""

    def __init__(self) -> None:
        self.values: set[str] = set()
        self.pattern: re.Pattern[str] | None = None

    def add(self, values: Iterable[str]) -> None:
        fresh = {v for v in values if _rememberable(v)} - self.values
        if not fresh:
            return
        for value in sorted(fresh, key=len, reverse=True):
            if len(self.values) >= MAX_REMEMBERED:
                break
            self.values.add(value)
        ordered = sorted(self.values, key=len, reverse=True)
        self.pattern = re.compile("|".join(re.escape(v) for v in ordered))

    def clear(self) -> None:
        self.values.clear()
        self.pattern = None


_known = _Known()


def secrets_in_argv(argv: Sequence[str]) -> list[str]:
    """The values of secret-named flags and ``NAME=value`` items of ``argv``."""
    found: list[str] = []
    for index, arg in enumerate(argv):
        arg = str(arg)
        name, sep, value = arg.partition("=")
        if sep and _is_name(name) and is_secret_name(name):
            found.append(value)
        elif (not sep and arg.startswith("-") and _is_name(arg) and is_secret_name(arg)
              and index + 1 < len(argv) and not str(argv[index + 1]).startswith("-")):
            found.append(str(argv[index + 1]))
    return found


def remember(argv: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> None:
    """Mask, from now on and wherever they appear, the secrets of this argv and environment.

    A token passed as ``--hf_token X`` or exported as ``HF_TOKEN=X`` is masked when the
    trainer later prints ``X`` alone (``Logged in with X``), where neither its name nor a
    known shape is beside it.
    """
    values = secrets_in_argv(argv)
    if environ:
        values += [v for k, v in environ.items()
                   if k not in NOT_SECRET_ENVIRONMENT and is_secret_name(k)]
    _known.add(v.strip() for v in values)


def forget_all() -> None:
    """Drop every remembered value (tests; a process that starts a new job)."""
    _known.clear()
