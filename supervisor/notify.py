"""sd_notify for systemd: READY, STATUS, STOPPING and WATCHDOG pings, when NOTIFY_SOCKET is set.

The protocol is one datagram per message on a UNIX socket, so no library is needed; a
failed send never disturbs the run (systemd may simply not be listening).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import anyio
import structlog

log = structlog.get_logger(__name__)


class Notifier:
    """Talks to systemd if the service manager asked for it; otherwise does nothing."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + path[1:] if path.startswith("@") else path
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.setblocking(False)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watchdog_ours = not pid or pid == str(os.getpid())
        #: seconds between watchdog pings (half systemd's WatchdogSec), or None
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and watchdog_ours else None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, **fields: str) -> None:
        if self._socket is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            self._socket.sendto(message.encode(), self._address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("sd_notify_failed", error=str(exc))

    def ready(self, status: str) -> None:
        self.send(READY="1", STATUS=status, MAINPID=str(os.getpid()))

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def stopping(self, status: str) -> None:
        self.send(STOPPING="1", STATUS=status)

    async def keep_alive(self) -> None:
        """WATCHDOG=1 at half the interval systemd asked for, for as long as the run lives."""
        if self._socket is None or self.watchdog_interval is None:
            return
        while True:
            self.send(WATCHDOG="1")
            await anyio.sleep(self.watchdog_interval)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
