"""What ``submit``/``ps``/``cancel``/``logs``/``show`` call: the daemon's API over its socket."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorasup.supervisor.serve import paths


class ClientError(Exception):
    """One line for the user; ``code`` is the exit status (2: usage or no daemon)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class Client:
    def __init__(self, state: Path, timeout: float = 30.0) -> None:
        import httpx

        self.socket = paths.socket_path(state)
        self._httpx = httpx
        self.http = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)),
                                 base_url="http://lorasup", timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _not_running(self) -> ClientError:
        return ClientError(f"no lorasup daemon is listening on {self.socket} "
                           "(start one with `lorasup serve`, or pass --state-dir)")

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, url, **kwargs)
        except (self._httpx.ConnectError, FileNotFoundError, ConnectionRefusedError):
            raise self._not_running() from None
        except self._httpx.HTTPError as exc:
            raise ClientError(f"talking to the daemon failed: {exc}", 1) from None
        if response.status_code >= 400:
            try:
                message = response.json().get("error") or response.text
            except ValueError:
                message = response.text
            raise ClientError(str(message).strip(), 2 if response.status_code < 500 else 1)
        return response.json()

    def stream(self, url: str, params: dict[str, str]) -> Iterator[bytes]:
        try:
            with self.http.stream("GET", url, params=params, timeout=None) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ClientError(str(response.json().get("error")))
                yield from response.iter_raw()
        except (self._httpx.ConnectError, FileNotFoundError, ConnectionRefusedError):
            raise self._not_running() from None

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
        return self.request("POST", "/jobs", json=payload)

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
