"""Trainer adapters, looked up by name; the engine imports trainers only through here."""

from __future__ import annotations

from importlib import import_module
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
