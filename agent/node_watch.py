"""The local manager's swarm state as the agent watches it: looked up, waited on, or followed
on dockerd's event stream, which ends when dockerd stops, so an idle agent does not poll."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from agent.docker_state import DockerUnavailable
from agent.errors import AgentError
from agent.parts import Parts

# dockerd can take seconds to answer /info right after an unlock (the manager rejoins).
ACTIVE_TIMEOUT = 60.0


class NodeWatch:
    def __init__(self, parts: Parts, on_gone: Callable[[], None]) -> None:
        self.parts = parts
        self.on_gone = on_gone  # called when dockerd stops answering
        self._gone = False

    async def state(self) -> str | None:
        """The node's swarm state, or None while dockerd does not answer."""
        try:
            swarm = await self.parts.runtime.call(self.parts.docker.swarm)
            state = str(swarm.get("LocalNodeState", ""))
        except DockerUnavailable:
            if not self._gone:
                self._gone = True
                self.parts.log.warning("dockerd is not answering at %s; watching for it",
                                       self.parts.config.docker_host)
                self.on_gone()
            return None
        if self._gone:
            self._gone = False
            self.parts.log.info("dockerd answers again; the swarm is %s", state)
        return state

    async def wait_while_locked(self, until: float) -> None:
        """Wait until the monotonic time `until`, but stop waiting as soon as the node is not
        locked any more (unlocked by hand, or dockerd restarted), looking every few seconds."""
        while (rest := until - time.monotonic()) > 0:
            await self.parts.runtime.sleep(min(rest, 5.0))
            if await self.state() != "locked":
                return

    async def wait_active(self) -> None:
        deadline = time.monotonic() + ACTIVE_TIMEOUT
        while time.monotonic() < deadline:
            if await self.state() in ("active", None):
                return
            await self.parts.runtime.sleep(0.2)
        self.parts.log.warning("the manager was unlocked but is not active after %.0f s",
                               ACTIVE_TIMEOUT)

    async def watch(self) -> None:
        """Wait until dockerd stops or `key_check_seconds` pass, without polling it."""
        started = time.monotonic()
        try:
            stream = await self.parts.runtime.call(
                lambda: self.parts.docker.events_until(self.parts.config.key_check_seconds))
        except AgentError:
            stream = None
        if stream is not None:
            try:
                await self.parts.runtime.idle(asyncio.to_thread(lambda: [None for _ in stream]))
            finally:
                stream.close()
        # An event stream that ends at once (dockerd shutting down) must not become a spin.
        rest = self.parts.config.docker_poll_seconds - (time.monotonic() - started)
        if rest > 0:
            await self.parts.runtime.sleep(rest)
