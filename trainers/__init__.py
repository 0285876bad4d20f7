"""Trainer adapters, looked up by name; the engine imports trainers only through here."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from importlib import import_module
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorasup.trainers.base import Adapter

#: name → "module:Class"; imported on demand so an unused adapter costs nothing
REGISTRY: dict[str, str] = {
    "builtin": "lorasup.trainers.builtin.adapter:BuiltinAdapter",
    "command": "lorasup.trainers.command:CommandAdapter",
    "diffusers": "lorasup.trainers.diffusers:DiffusersAdapter",
    "hf": "lorasup.trainers.hf:HfAdapter",
    "kohya": "lorasup.trainers.kohya:KohyaAdapter",
    "native": "lorasup.trainers.native:NativeAdapter",
}

#: name → the job options (``[options]`` keys, or their flags) the adapter reads through
#: ``TrainerJob.option``; any other option is refused for that trainer instead of ignored
OPTIONS: dict[str, frozenset[str]] = {
    "builtin": frozenset({"mode", "dataset", "output_dir"}),
    "diffusers": frozenset({"tensorboard"}),
    "hf": frozenset({"tensorboard"}),
}


def get_adapter(name: str) -> Adapter:
    # base (and the event types it imports) only here: importing this package must stay
    # cheap, as ``python -m lorasup.trainers.builtin`` (the trainer itself) and ``--help`` do.
    from lorasup.trainers.base import UsageError

    try:
        target = REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise UsageError(f"unknown trainer {name!r} (known: {known})") from None
    module_name, class_name = target.split(":")
    return getattr(import_module(module_name), class_name)()


def recorded_adapter(name: object) -> Adapter:
    """The adapter of a recorded run (the trainer named in its ``started`` record), for what
    the report must know of it; the base's defaults for a name lorasup does not know."""
    from lorasup.trainers.base import AdapterBase

    if isinstance(name, str) and name in REGISTRY:
        try:
            return get_adapter(name)
        except Exception:  # a broken adapter module must not cost the report
            pass
    return AdapterBase()


@functools.lru_cache(maxsize=32)
def scalar_tags(name: str | None) -> Mapping[str, str]:
    """TensorBoard tag -> series for a run of trainer ``name``: its adapter's tags over
    every known adapter's (a program run as ``--trainer command``, or a run whose start
    was not recorded, may be any of them)."""
    tags: dict[str, str] = {}
    for known in sorted(REGISTRY):
        tags.update(recorded_adapter(known).scalar_tags)
    tags.update(recorded_adapter(name).scalar_tags)
    return MappingProxyType(tags)
