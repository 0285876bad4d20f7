"""What a transformers ``Trainer.log`` call prints on stdout: one Python dict, values
formatted ``%.4g`` as strings, no step key (see hf.py for how its step is found)."""

from __future__ import annotations

import ast
import re

from lorasup.supervisor.numbers import read_float

#: a dict line longer than this is not a Trainer log (nothing is parsed from it)
_MAX_DICT = 8192


#: a flat ``Trainer.log`` dict as Python prints it: quoted keys, values that are quoted
#: text without escapes or plain decimal numbers; anything else goes to literal_eval
_FLAT_DICT = re.compile(
    r"\{(?:'[^'\\]*': (?:'[^'\\]*'|-?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|0+|[1-9]\d*))"
    r"(?:, (?=')|\}$))+", re.ASCII)
_FLAT_ITEM = re.compile(r"'([^'\\]*)': (?:'([^'\\]*)'|([^,}]+))")
#: shorter than this, no int in the text can exceed ``int()``'s digit limit
_FLAT_MAX = 4000


def _flat_log_dict(text: str) -> dict[str, float] | None:
    """:func:`parse_log_dict` for a text that :data:`_FLAT_DICT` matched, without building
    a syntax tree (literal_eval costs ~20 us a line, which a trainer logging every step
    would make lorasup pay per step). Gives what literal_eval's dict would."""
    record: dict[str, str | int | float] = {}
    for key, quoted, plain in _FLAT_ITEM.findall(text):
        if not plain:
            record[key] = quoted  # the str literal_eval would give
        elif "." in plain or "e" in plain or "E" in plain:
            record[key] = float(plain)
        else:
            record[key] = int(plain)
    if "epoch" not in record:
        return None
    return _numbers(record)


def parse_log_dict(line: str) -> dict[str, float] | None:
    """A ``Trainer.log`` record on stdout (numbers, as floats), or None for anything else."""
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}") and "'epoch'" in text):
        return None
    if len(text) > _MAX_DICT:
        return None
    if len(text) < _FLAT_MAX and _FLAT_DICT.fullmatch(text) is not None:
        return _flat_log_dict(text)
    return _literal_log_dict(text)


def _literal_log_dict(text: str) -> dict[str, float] | None:
    """:func:`parse_log_dict` for any shape, by ``ast.literal_eval``."""
    try:
        record = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    if not isinstance(record, dict) or "epoch" not in record:
        return None
    return _numbers(record)


def _numbers(record: dict[object, object]) -> dict[str, float]:
    """The record's numbers (and numeric text) under string keys, as floats."""
    values: dict[str, float] = {}
    for key, value in record.items():
        number = read_float(value)
        if isinstance(key, str) and number is not None:
            values[key] = number
    return values
