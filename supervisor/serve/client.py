"""What ``submit``/``ps``/``cancel``/``logs``/``show`` call: the daemon's API over its socket."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from lorasup.supervisor.serve import paths

#: sysexits' EX_TEMPFAIL: the daemon went away in the middle of a request; try again later
TEMPFAIL_EXIT = 75
#: how long a client waits out a busy database (503 with Retry-After) before giving up
BUSY_BUDGET = 30.0
#: a connection that broke after the request went out (the daemon died or restarted)
DROPPED: tuple[type[Exception], ...] = (ConnectionError, http.client.IncompleteRead,
                                        http.client.BadStatusLine)


class ClientError(Exception):
    """One line for the user; ``code`` is the exit status (2: usage or no daemon; 75: the
    daemon went away mid-request)."""

    def __init__(self, message: str, code: int = 2, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        #: every mistake the daemon found (a job with several), one line each
        self.errors = errors or []


def with_lines(errors: list[str], job_file: Path) -> list[str]:
    """Each mistake with the line of its key in the job file, where the key is found there
    (``invalid steps: ... (job.toml line 3)``); tomllib keeps no lines for keys."""
    try:
        text = job_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return errors
    lines = text.splitlines()
    out: list[str] = []
    for error in errors:
        found = re.match(r"invalid ([A-Za-z0-9_\-]+)|unknown key '([^']+)'", error)
        key = found and (found[1] or found[2])
        if key == "command":
            key = "command|trainer_argv"
        at = next((i + 1 for i, line in enumerate(lines)
                   if key and re.match(rf"\s*\"?(?:{key})\"?\s*=", line)), None)
        out.append(f"{error} ({job_file.name} line {at})" if at else error)
    return out


class NoDaemon(ClientError):
    """Nothing listens on the socket (exit 2)."""


def _dropped(exc: BaseException) -> ClientError:
    return ClientError(f"the connection to the daemon broke ({type(exc).__name__}); "
                       "it may have stopped or restarted: try again", TEMPFAIL_EXIT)


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over the daemon's UNIX socket (the standard library's client: a short-lived
    command should not pay for importing a bigger one)."""

    def __init__(self, path: Path, timeout: float | None) -> None:
        super().__init__("lorasup", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Client:
    def __init__(self, state: Path, timeout: float = 30.0) -> None:
        self.socket = paths.socket_path(state)
        self.timeout = timeout

    def close(self) -> None:
        pass

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _not_running(self) -> ClientError:
        return NoDaemon(f"no lorasup daemon is listening on {self.socket} "
                           "(start one with `lorasup serve`, or pass --state-dir)")

    def _open(self, method: str, url: str, body: Any = None, timeout: float | None = 30.0,
              headers: dict[str, str] | None = None
              ) -> tuple[_UnixConnection, http.client.HTTPResponse]:
        """Connect, send, read the status line. A missing socket or a refused connect is
        "no daemon" (2); a connection that breaks after that is EX_TEMPFAIL (75)."""
        conn = _UnixConnection(self.socket, timeout)
        data = None if body is None else json.dumps(body).encode()
        # what a cross-origin browser request cannot send (security.py): a POST without it
        # (an empty cancel) is refused
        headers = {"X-Lorasup-CSRF": "1", **(headers or {})}
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            conn.connect()
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
            raise self._not_running() from None
        except OSError as exc:
            conn.close()
            raise ClientError(f"talking to the daemon failed: {exc}", 1) from None
        try:
            conn.request(method, url, body=data, headers=headers)
            return conn, conn.getresponse()
        except DROPPED as exc:
            conn.close()
            raise _dropped(exc) from None
        except TimeoutError:
            conn.close()
            raise ClientError(f"the daemon did not answer within {timeout:g} s",
                              TEMPFAIL_EXIT) from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise ClientError(f"talking to the daemon failed: {exc}", 1) from None

    @staticmethod
    def _error(status: int, data: bytes) -> ClientError:
        errors: list[str] = []
        try:
            body = json.loads(data)
            message = body.get("error") or data.decode(errors="replace")
            if isinstance(body.get("errors"), list):
                errors = [str(e) for e in body["errors"]]
        except (ValueError, AttributeError):
            message = data.decode(errors="replace")
        # 503/507: the daemon's storage is busy or full; a later try may go through
        code = 2 if status < 500 else TEMPFAIL_EXIT if status in (503, 507) else 1
        return ClientError(str(message).strip(), code, errors)

    def _exchange(self, method: str, url: str, body: Any, headers: dict[str, str] | None
                  ) -> tuple[int, bytes]:
        """One exchange; a 503 (the daemon's database is busy: another process holds it)
        is waited out, as its ``Retry-After`` says, for at most BUSY_BUDGET seconds."""
        deadline = time.monotonic() + BUSY_BUDGET
        while True:
            status, data, retry_after = self._exchange_once(method, url, body, headers)
            if status != 503 or time.monotonic() >= deadline:
                return status, data
            time.sleep(min(max(retry_after, 0.2), 5.0, max(deadline - time.monotonic(), 0)))

    def _exchange_once(self, method: str, url: str, body: Any,
                       headers: dict[str, str] | None) -> tuple[int, bytes, float]:
        conn, response = self._open(method, url, body, self.timeout, headers)
        try:
            try:
                retry_after = float(response.getheader("Retry-After") or 1)
            except ValueError:
                retry_after = 1.0
            return response.status, response.read(), retry_after
        except DROPPED as exc:
            raise _dropped(exc) from None
        except TimeoutError:
            raise ClientError(f"the daemon did not answer within {self.timeout:g} s",
                              TEMPFAIL_EXIT) from None
        except (OSError, http.client.HTTPException) as exc:
            raise ClientError(f"talking to the daemon failed: {exc}", 1) from None
        finally:
            conn.close()

    def request(self, method: str, url: str, body: Any = None,
                headers: dict[str, str] | None = None, retry_dropped: bool = False) -> Any:
        """One request; with ``retry_dropped`` (a submit with its Idempotency-Key) a
        connection that broke mid-request is tried once more (a restarted daemon, a
        dropped connection), with the same key."""
        try:
            status, data = self._exchange(method, url, body, headers)
        except ClientError as exc:
            if not (retry_dropped and exc.code == TEMPFAIL_EXIT):
                raise
            try:
                status, data = self._exchange(method, url, body, headers)
            except NoDaemon:
                raise exc from None  # the daemon died: the first break is the news
        if status >= 400:
            raise self._error(status, data)
        try:
            return json.loads(data)
        except ValueError:
            raise ClientError("the daemon's answer is not JSON", 1) from None

    def stream(self, url: str, params: dict[str, str]) -> Iterator[bytes]:
        conn, response = self._open("GET", f"{url}?{urlencode(params)}", timeout=None)
        try:
            if response.status >= 400:
                raise self._error(response.status, response.read())
            while True:
                try:
                    chunk = response.read1(65536)
                except DROPPED as exc:
                    raise _dropped(exc) from None
                except (OSError, http.client.HTTPException) as exc:
                    raise ClientError(f"reading from the daemon failed: {exc}",
                                      TEMPFAIL_EXIT) from None
                if not chunk:
                    return
                yield chunk
        finally:
            conn.close()

    # -- operations ------------------------------------------------------------------------

    def submit(self, job_file: Path | None, *, cwd: Path, name: str | None = None,
               priority: int | None = None, flags: dict[str, Any] | None = None,
               argv: list[str] | None = None) -> dict[str, Any]:
        """Queue a job: the job file's keys (if one is given), overridden by the flags that
        were given and by ``argv`` (the trainer's command); the job runs in ``cwd``."""
        from lorasup.supervisor.config import ConfigError, load_toml

        values: dict[str, Any] = {}
        if job_file is not None:
            try:
                values = load_toml(job_file)
            except ConfigError as exc:
                raise ClientError(str(exc)) from None
        values.update({k: v for k, v in (flags or {}).items() if v is not None})
        if argv:
            values.pop("command", None)
            values["trainer_argv"] = list(argv)
        if job_file is None and not argv:
            raise ClientError("give a job file, or the trainer's command after `--` "
                              "(lorasup submit --steps N -- python train.py ...)")
        payload: dict[str, Any] = {"job": json.loads(json.dumps(values, default=str)),
                                   "cwd": str(cwd)}
        if name is not None:
            payload["name"] = name
        if priority is not None:
            payload["priority"] = priority
        # One key per invocation: a retry after a lost reply gets the job the first try
        # queued (the daemon keeps keys 24 h), never a second one.
        key = {"Idempotency-Key": str(uuid.uuid4())}
        try:
            return self.request("POST", "/jobs", payload, headers=key, retry_dropped=True)
        except ClientError as exc:
            if job_file is not None and exc.errors:
                exc.errors = with_lines(exc.errors, job_file)
            raise

    def jobs(self, finished: int | None = None) -> list[dict[str, Any]]:
        """Every job; with ``finished``: the active ones and the newest ``finished`` others."""
        query = "" if finished is None else f"?finished={finished}"
        return self.request("GET", f"/jobs{query}")["jobs"]

    def job(self, job_id: int) -> dict[str, Any]:
        return self.request("GET", f"/jobs/{job_id}")

    def cancel(self, job_id: int) -> dict[str, Any]:
        return self.request("POST", f"/jobs/{job_id}/cancel")

    def extend(self, job_id: int, steps: int) -> dict[str, Any]:
        """A new job continuing a finished one by ``steps`` more."""
        return self.request("POST", f"/jobs/{job_id}/extend", {"steps": steps})

    def report(self, job_id: int) -> dict[str, Any] | None:
        try:
            return self.request("GET", f"/jobs/{job_id}/report")
        except ClientError as exc:
            if "no report" in str(exc):
                return None
            raise
