"""The agent's progress beats: systemd's watchdog is pinged while the work keeps making progress
(the heartbeats the escrow hears are agent/heartbeat.py's, and never count as progress).

Progress is a beat: every blocking call (dockerd's API, run in a thread) beats before and after,
and a deliberate wait (a sleep, dockerd's event stream) counts as progress for as long as it
lasts. Work that goes longer than STALL_LIMIT without a beat is a hang, and the watchdog stops
pinging, so systemd restarts the agent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from escrow.core.notify import Notifier

T = TypeVar("T")
# Every docker and escrow call is bounded well below this, so a turn that takes longer is a
# hang, and systemd's watchdog should see it.
STALL_LIMIT = 120.0


class Runtime:
    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.background: set[asyncio.Task[None]] = set()
        self._last_beat = time.monotonic()
        self._idle = False

    def beat(self) -> None:
        self._last_beat = time.monotonic()

    async def call(self, fn: Callable[[], T]) -> T:
        """A blocking call (dockerd's API), in a thread."""
        self.beat()
        try:
            return await asyncio.to_thread(fn)
        finally:
            self.beat()

    async def idle(self, wait: Awaitable[T]) -> T:
        """A deliberate wait: the watchdog counts it as progress."""
        self._idle = True
        try:
            return await wait
        finally:
            self._idle = False
            self.beat()

    async def sleep(self, seconds: float) -> None:
        await self.idle(asyncio.sleep(seconds))

    def healthy(self) -> bool:
        return self._idle or time.monotonic() - self._last_beat < STALL_LIMIT

    async def watchdog(self, interval: float) -> None:
        while True:
            if self.healthy():
                self.notifier.watchdog()
            await asyncio.sleep(interval)

    def in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Work that must not hold up the loop; cancelled when the agent stops."""
        task = asyncio.create_task(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
