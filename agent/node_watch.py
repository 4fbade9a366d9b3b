"""The local manager's swarm state as the agent watches it: looked up, waited on, or followed
on dockerd's event stream, which ends when dockerd stops, so an idle agent does not poll.

The agent outlives dockerd. Once dockerd is away it is not asked again until another dockerd
runs (agent/dockerd_files.py): a question to docker.socket while docker is stopped would start
docker, and an answer would only come once a new dockerd serves anyway.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from agent.docker_state import DockerUnavailable
from agent.dockerd_files import DockerdFiles
from agent.errors import AgentError
from agent.parts import Parts

# dockerd can take seconds to answer /info right after an unlock (the manager rejoins).
ACTIVE_TIMEOUT = 60.0
# dockerd ends the event stream at `until`; ended a second or more before, dockerd is stopping.
EARLY = 1.0
# How long a stopped dockerd's successor is waited for before the agent says dockerd is away:
# docker.service's own restart delay (0.1 s in Debian's unit, 2 s in Docker's) and the new
# dockerd's first steps. Saying it sooner would cost the loop a `docker_poll_seconds` pause
# (agent/daemon.py) just when the successor may be about to answer.
SUCCESSOR_WAIT = 5.0


class NodeWatch:
    def __init__(self, parts: Parts, on_gone: Callable[[], None]) -> None:
        self.parts = parts
        self.on_gone = on_gone  # called when dockerd stops answering
        self.files = DockerdFiles(parts.config.docker_host)
        self._gone = False
        self._stopping = False  # the event stream ended early: do not ask the dockerd that left
        self._streaming: int | None = None  # the pid of the dockerd whose events are followed
        self._lost: int | None = None  # the pid of the dockerd that went away, if known

    async def state(self) -> str | None:
        """The node's swarm state; None when dockerd has just gone away. Once it is away, this
        waits until another dockerd runs, then asks it at once. A dockerd seen stopping on the
        event stream is given SUCCESSOR_WAIT for another to run, whose state is then the
        answer."""
        if self._stopping:
            self._stopping = False
            # Its pid as read when the stream opened: by now the pid file may name its successor.
            self._went_away(self._streaming)
            try:
                # asyncio.timeout, not wait_for: in Python 3.11 wait_for can lose SIGTERM's
                # cancellation (agent/daemon.py).
                async with asyncio.timeout(SUCCESSOR_WAIT):
                    await self.parts.runtime.idle(self.files.until_it_may_answer(self._lost))
            except TimeoutError:
                return None
        elif self._gone:
            await self.parts.runtime.idle(self.files.until_it_may_answer(self._lost))
        try:
            swarm = await self.parts.runtime.call(self.parts.docker.swarm)
            state = str(swarm.get("LocalNodeState", ""))
        except DockerUnavailable:
            if not self._gone:
                self._went_away(None)
            return None
        if self._gone:
            self._gone = False
            self.parts.log.info("dockerd answers again; the swarm is %s", state)
        return state

    def _went_away(self, lost: int | None) -> None:
        self._gone = True
        self._lost = lost
        self.parts.log.warning("dockerd is not answering at %s; watching for it",
                               self.parts.config.docker_host)
        self.on_gone()

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
        until = int(time.time() + self.parts.config.key_check_seconds) + 1
        self._streaming = self.files.running()
        try:
            stream = await self.parts.runtime.call(lambda: self.parts.docker.events_until(until))
        except AgentError:
            stream = None
        if stream is not None:
            try:
                await self.parts.runtime.idle(asyncio.to_thread(stream.wait))
            finally:
                stream.close()
            if time.time() < until - EARLY:
                self._stopping = True
                return
        # An event stream that cannot be opened must not become a spin.
        rest = self.parts.config.docker_poll_seconds - (time.monotonic() - started)
        if rest > 0:
            await self.parts.runtime.sleep(rest)
