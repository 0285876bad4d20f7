"""The daemon's doors: one daemon per state directory (a lock), the API's UNIX socket
(mode 0660: access to the socket is the authorisation) and an optional TCP listener."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import socket
import ssl
from pathlib import Path

from lorasup.supervisor.serve import paths

#: sun_path holds 108 bytes including the terminating NUL
UNIX_PATH_MAX = 107
BACKLOG = 128


class ListenError(Exception):
    """One line for the user (exit 2)."""


def lock(state: Path) -> int:
    """An flock on ``<state>/lorasup.lock``, released by the kernel on any exit; the fd."""
    fd = os.open(state / paths.LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ListenError(f"another lorasup serve is running on {state}") from None
    return fd


def bind_unix(path: Path) -> socket.socket:
    """A listening UNIX socket, created with mode 0660 (no moment with wider access)."""
    if len(os.fsencode(str(path))) > UNIX_PATH_MAX:
        raise ListenError(f"socket path too long for a UNIX socket: {path}")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a leftover of a killed daemon: the lock proves nobody serves it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o660)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old)
    sock.setblocking(False)
    return sock


def bind_tcp(listen: str) -> socket.socket:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6)."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ListenError(f"--listen must be HOST:PORT, not {listen!r}")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1): reachable from this box only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_tls(cert: Path | None, key: Path | None) -> tuple[str, str] | None:
    """``--tls-cert``/``--tls-key`` as (cert, key) paths, loaded once here so that a wrong
    file, a key that does not match or a key with a passphrase is one line at start (never
    a passphrase prompt); None without them."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ListenError("--tls-cert and --tls-key go together")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

    def no_passphrase() -> bytes:
        raise ListenError(f"--tls-key {key} is encrypted: give an unencrypted key "
                          "(readable only by the daemon's user)")

    try:
        context.load_cert_chain(str(cert), str(key), password=no_passphrase)
    except OSError as exc:  # FileNotFoundError, PermissionError, ssl.SSLError
        reason = exc.strerror or getattr(exc, "reason", None) or str(exc)
        raise ListenError(f"cannot load --tls-cert {cert} / --tls-key {key}: "
                          f"{str(reason).lower()}") from None
    return str(cert), str(key)


def check_listen(listen: str, tls: tuple[str, str] | None, insecure: bool) -> None:
    """A non-loopback ``--listen`` needs TLS or an explicit ``--insecure-listen``."""
    host = listen.rpartition(":")[0].strip("[]")
    if tls is None and not insecure and not loopback(host):
        raise ListenError(f"--listen {listen} is not a loopback address: give "
                          "--tls-cert/--tls-key, forward the socket (ssh -L) or a loopback "
                          "port instead, or pass --insecure-listen to accept plain HTTP")
