"""`unseal-agent run`: watch the local manager; when it is locked, unlock it from escrowed
shares; while it is unlocked, make sure the escrow holds its current key.

One task does the work, in this order on every turn: ask dockerd for the node's state, then
- not answering: wait for dockerd to come back (agent/node_watch.py: inotify on its pid
  file and socket, agent/dockerd_files.py, or every `docker_poll_seconds` where dockerd keeps
  no pid file beside its socket), so a restarted daemon is seen as its API answers;
- `locked`: request an unseal, wait for the quorum, combine, unlock, report
  (agent/unseal_flow.py, performing the steps agent/decision.py decides);
- `active`: check the unlock key for rotation (agent/rotation_watch.py), then wait on dockerd's
  event stream, which ends when dockerd stops (or after `key_check_seconds`), so an idle agent
  does not poll (agent/node_watch.py).
A second task pings systemd's watchdog while the first keeps making progress
(agent/runtime.py), and a third sends the escrow a heartbeat every `heartbeat_seconds`, with the
lock state the first last saw, and a goodbye when the agent stops (agent/heartbeat.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from agent.backoff import Backoff
from agent.client import EscrowClient
from agent.config import CA_SETTING, AgentConfig
from agent.docker_state import Docker
from agent.errors import AgentError
from agent.heartbeat import Heartbeat
from agent.loaded_key import LoadedKey
from agent.log import NodeLog
from agent.node_watch import NodeWatch
from agent.parts import Parts
from agent.rotation_watch import RotationWatch
from agent.runtime import Runtime
from agent.unseal_flow import UnsealFlow
from escrow.core.notify import Notifier, watchdog_interval
from escrow.core.tls import client_context


class Agent:
    def __init__(self, config: AgentConfig, docker: Docker, client: EscrowClient,
                 notifier: Notifier, log: logging.Logger) -> None:
        node_log = NodeLog(log)
        self.parts = Parts(config, docker, client, Runtime(notifier), node_log,
                           LoadedKey(config, node_log), Backoff(cap=config.retry_max_seconds))
        self.node = NodeWatch(self.parts, self._warm_escrow)
        self.rotation = RotationWatch(self.parts)
        self.unseal = UnsealFlow(self.parts, self.node, self.rotation.unlocked)
        self.heartbeat = Heartbeat(self.parts)

    async def run(self) -> None:
        config, runtime = self.parts.config, self.parts.runtime
        status = runtime.notifier.status
        runtime.notifier.ready("watching docker")
        self.parts.log.info("watching docker at %s; escrow %s", config.docker_host,
                            ", ".join(config.escrow_url))
        runtime.in_background(self.heartbeat.run())
        while True:
            runtime.beat()
            state = await self.node.state()
            self.heartbeat.saw(state)
            if state is None:
                status("docker is not answering; watching for it")
                await runtime.sleep(config.docker_poll_seconds)
            elif state == "locked":
                await self.node.wait_while_locked(await self.unseal.attempt())
            elif state == "active":
                await self.rotation.update()
                await self.node.watch()
            else:
                status(f"swarm state {state!r}: nothing to unlock; watching")
                await self.node.watch()

    def _warm_escrow(self) -> None:
        """dockerd went away, so it will most likely come back locked: open the TLS
        connection to the escrow now, so the unseal request does not wait for a handshake."""
        async def touch() -> None:
            with contextlib.suppress(AgentError):
                await self.parts.client.info()
        self.parts.runtime.in_background(touch())


def check_startup(config: AgentConfig) -> None:
    """Fail at start on what no retry can fix: an unreadable escrow CA."""
    client_context(config.escrow_ca, CA_SETTING)


async def run(config: AgentConfig, log: logging.Logger) -> None:
    """Run until SIGTERM or SIGINT."""
    notifier = Notifier()
    docker = Docker(config.docker_host, timeout=30)
    # Connections kept a minute, so one warmed while dockerd restarts is still open when it
    # comes back locked.
    async with EscrowClient(config.escrow_url, config.escrow_ca, keepalive=60.0) as client:
        agent = Agent(config, docker, client, notifier, log)
        main = asyncio.current_task()
        stop = asyncio.Event()

        def on_signal() -> None:
            # The first signal stops the work; a second cuts the goodbye short (and a dead
            # escrow, GOODBYE_TIMEOUT).
            if stop.is_set() and main is not None:
                main.cancel()
            stop.set()

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal)
        interval = watchdog_interval()
        runtime = agent.parts.runtime
        watchdog = asyncio.create_task(runtime.watchdog(interval)) if interval else None
        work = asyncio.create_task(agent.run())
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():  # it ends only by raising
                work.result()
            log.info("stopping")
            await cancel_until_done(work)
        except asyncio.CancelledError:  # a second signal while the work was stopping
            pass
        finally:
            stopped.cancel()
            notifier.stopping()
            for task in [watchdog, *runtime.background]:
                if task is not None:
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*runtime.background, return_exceptions=True)
                await agent.heartbeat.goodbye()


async def cancel_until_done(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` until it ends. One cancellation can be lost: Python 3.11's
    asyncio.wait_for, for one, returns a result that came at the same moment instead of
    raising it, and the agent would then run on after SIGTERM."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    with contextlib.suppress(asyncio.CancelledError):
        task.result()
