"""Where the daemon keeps its state: one directory, named the same way by every command."""

from __future__ import annotations

import os
from pathlib import Path

DB_NAME = "lorasup.db"
SOCKET_NAME = "lorasup.sock"
LOCK_NAME = "lorasup.lock"
RUNS = "runs"


def state_dir(option: Path | None = None) -> Path:
    """``--state-dir``, else ``$LORASUP_STATE_DIR``, else systemd's ``$STATE_DIRECTORY``
    (its first entry), else ``~/.local/state/lorasup``."""
    if option is not None:
        return option.expanduser().absolute()
    for name in ("LORASUP_STATE_DIR", "STATE_DIRECTORY"):
        value = os.environ.get(name, "")
        if value:
            return Path(value.split(":")[0]).expanduser().absolute()
    return Path.home() / ".local" / "state" / "lorasup"


def socket_path(state: Path) -> Path:
    return state / SOCKET_NAME
