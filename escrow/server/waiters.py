"""The long polls of ``GET /v1/unseal/{id}?wait=S``: a poll of a pending request waits up to
``S`` seconds for a custodian's decision on it, so an agent hears of an approval at once without
polling fast, whichever replica the custodian's decision went through (``Store.listen``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from escrow.core.protocol import RequestStatus

MAX_WAIT = 60.0


class Waiters:
    def __init__(self) -> None:
        self._decided: dict[str, asyncio.Event] = {}
        self._closed = False

    async def poll(self, request_id: str, look: Callable[[], Awaitable[RequestStatus]],
                   wait: float) -> RequestStatus:
        """The request's status from ``look``; while pending, looked at again after a decision
        on it, after ``wait`` seconds (at most MAX_WAIT), or at shutdown, whichever is first."""
        wait = min(MAX_WAIT, max(0.0, wait))
        # Registered before the first look, so a decision in between still wakes us.
        event = self._decided.setdefault(request_id, asyncio.Event())
        status: RequestStatus | None = None
        try:
            status = await look()
            if status.state == "pending" and wait > 0 and not self._closed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), timeout=wait)
                status = await look()
        finally:
            # Unknown ids (anyone can poll any id) and finished requests keep no entry.
            if status is None or status.state != "pending":
                self._decided.pop(request_id, None)
        return status

    def wake(self, request_id: str | None) -> None:
        """A custodian decided on ``request_id``: its polls look again now. ``None``: some
        decision may have been missed (the store's listener reconnected), so every poll
        looks again."""
        if request_id is None:
            events, self._decided = list(self._decided.values()), {}
        else:
            event = self._decided.pop(request_id, None)
            events = [] if event is None else [event]
        for event in events:
            event.set()

    def close(self) -> None:
        """Shutting down: polls answer with the current state at once, and none waits again."""
        self._closed = True
        for event in self._decided.values():
            event.set()
