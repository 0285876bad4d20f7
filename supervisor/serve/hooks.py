"""Webhooks on a job's final state (and, where asked, when an attempt starts or a retry is
queued): a JSON POST, signed when a secret is set.

Deliveries go through a bounded queue to a worker task, so the scheduler never waits on a
slow receiver; each delivery is retried with backoff and a failure is logged once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

log = structlog.get_logger(__name__)

SIGNATURE_HEADER = "X-Lorasup-Signature"
EVENT_HEADER = "X-Lorasup-Event"
QUEUE = 256
CONCURRENT = 4


def signature(secret: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of the exact body with the shared secret."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _summary(payload: dict[str, Any]) -> str:
    """One line a person reads in a chat: what happened to which job, then the numbers
    (the state once; the outcome only where it says more, e.g. ``failed (timeout)``)."""
    head = f"lorasup job {payload.get('job')} ({payload.get('name')})"
    event = payload.get("event")
    steps, total = payload.get("steps"), payload.get("steps_requested")
    progress = f"{steps}/{total} steps" if steps is not None else f"{total} steps"
    if event == "job.started":
        return f"{head} started, attempt {payload.get('attempt') or payload.get('attempts')}"
    if event == "job.retrying":
        wait = payload.get("retry_in_s")
        when = f" in {wait:g} s" if isinstance(wait, int | float) else ""
        return f"{head} will be retried{when}: {payload.get('reason')} ({progress} so far)"
    state, outcome = payload.get("state"), payload.get("outcome")
    what = f"{state}" if outcome in (None, state) else f"{state} ({outcome})"
    loss = payload.get("final_loss")
    loss_text = f", final loss {loss:.4g}" if isinstance(loss, float) else ""
    reason = payload.get("reason")
    why = f" — {reason}" if reason and state != "completed" else ""
    return f"{head} {what}: {progress}{loss_text}{why}"


def body_for(fmt: str, payload: dict[str, Any]) -> bytes:
    """The request body in the receiver's shape: plain JSON, or Slack's/Discord's message."""
    if fmt == "slack":
        shaped: dict[str, Any] = {"text": _summary(payload)}
    elif fmt == "discord":
        shaped = {"content": _summary(payload)}
    else:
        shaped = payload
    return json.dumps(shaped, separators=(",", ":")).encode()


class Webhooks:
    def __init__(self, *, tries: int = 5, first_delay: float = 1.0, timeout: float = 10.0
                 ) -> None:
        self.tries = tries
        self.first_delay = first_delay
        self.timeout = timeout
        send, receive = anyio.create_memory_object_stream[tuple[dict[str, str], bytes, str]](
            QUEUE)
        self._send: MemoryObjectSendStream[tuple[dict[str, str], bytes, str]] = send
        self._receive: MemoryObjectReceiveStream[tuple[dict[str, str], bytes, str]] = receive
        self.delivered = 0
        self.failed = 0
        self._queued = 0

    def pending(self) -> int:
        """Deliveries queued or in progress."""
        return self._queued

    def post(self, targets: list[dict[str, str]], event: str, payload: dict[str, Any]) -> None:
        """Queue one payload for each target; never waits."""
        for target in targets:
            if not target.get("webhook"):
                continue
            body = body_for(target.get("format", "json"), payload)
            try:
                self._send.send_nowait((target, body, event))
                self._queued += 1
            except (anyio.WouldBlock, anyio.ClosedResourceError) as exc:
                self.failed += 1
                reason = ("delivery queue full" if isinstance(exc, anyio.WouldBlock)
                          else "the daemon is exiting")
                log.warning("webhook_dropped", reason=reason, job=payload.get("job"))

    def close(self) -> None:
        self._send.close()

    async def run(self) -> None:
        import httpx

        limiter = anyio.CapacityLimiter(CONCURRENT)
        async with httpx.AsyncClient(timeout=self.timeout) as client, \
                anyio.create_task_group() as tg:
            async for target, body, event in self._receive:
                tg.start_soon(self._deliver, client, limiter, target, body, event)

    async def _deliver(self, client: Any, limiter: anyio.CapacityLimiter,
                       target: dict[str, str], body: bytes, event: str) -> None:
        headers = {"Content-Type": "application/json", EVENT_HEADER: event,
                   "User-Agent": "lorasup"}
        if target.get("secret"):
            headers[SIGNATURE_HEADER] = signature(target["secret"], body)
        url = target["webhook"]
        try:
            await self._attempts(client, limiter, url, body, headers)
        finally:
            self._queued -= 1

    async def _attempts(self, client: Any, limiter: anyio.CapacityLimiter, url: str,
                        body: bytes, headers: dict[str, str]) -> None:
        import httpx

        error = ""
        async with limiter:
            for attempt in range(self.tries):
                try:
                    response = await client.post(url, content=body, headers=headers)
                    if response.status_code < 300:
                        self.delivered += 1
                        return
                    error = f"HTTP {response.status_code}"
                    if 400 <= response.status_code < 500 and response.status_code != 429:
                        break  # the receiver refuses this body: sending it again won't help
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                if attempt + 1 < self.tries:
                    await anyio.sleep(self.first_delay * 2 ** attempt)
        self.failed += 1
        # The URL may carry a token (Slack/Discord hooks do): log only its host.
        host = httpx.URL(url).host
        log.warning("webhook_failed", host=host, tries=self.tries, error=error[:200])
