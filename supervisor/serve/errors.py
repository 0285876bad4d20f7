"""Types shared by the daemon and its API, so neither imports the other for them.

The API (api.py) is handed a ``JobsApi``: the operations it calls, not the daemon itself;
the daemon satisfies it. Arrows: daemon → api → errors, daemon → errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class ApiError(Exception):
    """A refused request: HTTP status and one line for the user."""

    def __init__(self, status: int, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        #: every mistake, one line each (a job file with several: all at once)
        self.errors = errors


class JobsApi(Protocol):
    """What the HTTP API asks of the daemon; each raises ApiError for a refused request."""

    async def submit(self, payload: dict[str, Any], key: str | None = None
                     ) -> tuple[dict[str, Any], bool]:
        """Queue a job; (the job, True when it was new). The same ``key`` (an
        ``Idempotency-Key``) within its lifetime gives back the first job, False."""
        ...

    def list_jobs(self, limit: int | None = None, finished: int | None = None
                  ) -> list[dict[str, Any]]:
        """The jobs; with ``finished``: the active ones and that many of the finished."""
        ...

    def show(self, job_id: int) -> dict[str, Any]: ...

    def cancel(self, job_id: int) -> dict[str, Any]: ...

    def run_dirs(self, job_id: int) -> list[Path]: ...

    def is_final(self, job_id: int) -> bool: ...

    def health(self) -> dict[str, Any]: ...

    def metrics(self) -> tuple[bytes, str]:
        """The Prometheus text and its content type."""
        ...
