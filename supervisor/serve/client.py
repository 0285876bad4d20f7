"""What ``submit``/``ps``/``cancel``/``logs``/``show`` call: the daemon's API over its socket."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from lorasup.supervisor.serve import paths


class ClientError(Exception):
    """One line for the user; ``code`` is the exit status (2: usage or no daemon)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


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
        return ClientError(f"no lorasup daemon is listening on {self.socket} "
                           "(start one with `lorasup serve`, or pass --state-dir)")

    def _open(self, method: str, url: str, body: Any = None, timeout: float | None = 30.0
              ) -> tuple[_UnixConnection, http.client.HTTPResponse]:
        conn = _UnixConnection(self.socket, timeout)
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            conn.request(method, url, body=data, headers=headers)
            return conn, conn.getresponse()
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
            raise self._not_running() from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise ClientError(f"talking to the daemon failed: {exc}", 1) from None

    @staticmethod
    def _error(status: int, data: bytes) -> ClientError:
        try:
            message = json.loads(data).get("error") or data.decode(errors="replace")
        except (ValueError, AttributeError):
            message = data.decode(errors="replace")
        return ClientError(str(message).strip(), 2 if status < 500 else 1)

    def request(self, method: str, url: str, body: Any = None) -> Any:
        conn, response = self._open(method, url, body, self.timeout)
        try:
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ClientError(f"talking to the daemon failed: {exc}", 1) from None
        finally:
            conn.close()
        if response.status >= 400:
            raise self._error(response.status, data)
        return json.loads(data)

    def stream(self, url: str, params: dict[str, str]) -> Iterator[bytes]:
        conn, response = self._open("GET", f"{url}?{urlencode(params)}", timeout=None)
        try:
            if response.status >= 400:
                raise self._error(response.status, response.read())
            while chunk := response.read1(65536):
                yield chunk
        finally:
            conn.close()

    # -- operations ------------------------------------------------------------------------

    def submit(self, job_file: Path, *, cwd: Path, name: str | None = None,
               priority: int | None = None) -> dict[str, Any]:
        from lorasup.supervisor.config import ConfigError, load_toml

        try:
            values = load_toml(job_file)
        except ConfigError as exc:
            raise ClientError(str(exc)) from None
        payload: dict[str, Any] = {"job": json.loads(json.dumps(values, default=str)),
                                   "cwd": str(cwd)}
        if name is not None:
            payload["name"] = name
        if priority is not None:
            payload["priority"] = priority
        return self.request("POST", "/jobs", payload)

    def jobs(self) -> list[dict[str, Any]]:
        return self.request("GET", "/jobs")["jobs"]

    def job(self, job_id: int) -> dict[str, Any]:
        return self.request("GET", f"/jobs/{job_id}")

    def cancel(self, job_id: int) -> dict[str, Any]:
        return self.request("POST", f"/jobs/{job_id}/cancel")

    def report(self, job_id: int) -> dict[str, Any] | None:
        try:
            return self.request("GET", f"/jobs/{job_id}/report")
        except ClientError as exc:
            if "no report" in str(exc):
                return None
            raise
