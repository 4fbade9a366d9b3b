"""The running agent's heartbeats: every `heartbeat_seconds` an enrolled agent tells the escrow,
signed by its agent key over a fresh nonce, that its node is up under this boot and whether the
manager is locked; when the agent stops it says goodbye, so the escrow need not wait three
intervals to call the node unreachable.

Beats run in a task of their own: they never hold up an unseal, and a beat that fails is said
once and tried again at the next interval, never sooner. They go through the agent's one escrow
client, so the TLS connection an unseal request will use stays open. They never beat the
runtime (agent/runtime.py): a heartbeat that goes on while the work hangs must not hide the hang
from systemd's watchdog.
"""

from __future__ import annotations

import asyncio
import math
import random
import time

from cryptography.hazmat.primitives.asymmetric import ec

from agent import state as agent_state
from agent.errors import AgentError
from agent.host import boot_id
from agent.log import Level, Topic
from agent.parts import Parts
from agent.swarm_identity import NodeIdentity, read_identity
from escrow.core import protocol
from escrow.core.protocol import HeartbeatRequest
from escrow.core.states import LockState
from escrow.core.version import VERSION

# The protocol's bound: a local version label (1.2.3+build.metadata) can be longer.
AGENT_VERSION = VERSION[:32]
# systemd waits TimeoutStopSec (30 s) for the agent to stop; a dead escrow must not use it up.
GOODBYE_TIMEOUT = 3.0
# Managers that came back together (a power cut) would otherwise beat in step, every one in
# the same second: each pause is shortened by up to this share of the interval, at random.
# Never lengthened: the escrow counts a beat later than the interval said as missed.
JITTER = 0.2


def pause(interval: float, draw: float) -> float:
    """Seconds from the start of one beat to the next, given `draw` uniform in [0, 1)."""
    return interval * (1 - JITTER * draw)


def lock_state(swarm_state: str | None) -> LockState:
    """What a beat says of the manager, from its swarm state (None: dockerd does not answer).
    Only an active manager serves; a locked one, or one whose dockerd is down, does not."""
    return LockState.UNLOCKED if swarm_state == "active" else LockState.LOCKED


def beat_request(identity: NodeIdentity, lock: LockState, nonce: bytes, *, boot: str,
                 uptime: float, interval: float, goodbye: bool,
                 agent_key: ec.EllipticCurvePrivateKey) -> HeartbeatRequest:
    """One beat, signed over the escrow's `nonce`. The interval is rounded up: the escrow
    counts beats missed against it, and a beat due a fraction of a second later than said
    would count as missed."""
    unsigned = HeartbeatRequest(
        cluster_id=identity.cluster_id, node_id=identity.node_id, boot_id=boot,
        lock_state=lock.value, kek_version=identity.kek_version, agent_version=AGENT_VERSION,
        uptime_seconds=int(uptime), interval_seconds=math.ceil(interval), goodbye=goodbye,
        nonce=protocol.b64e(nonce), signature="")
    signature = protocol.sign(agent_key, protocol.heartbeat_payload(unsigned, nonce))
    return unsigned.model_copy(update={"signature": signature})


class Heartbeat:
    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self.config = parts.config
        self.log = parts.log
        self._started = time.monotonic()
        self._boot = boot_id()  # a new boot is a new agent process
        self._swarm_state: str | None = None
        self._seen = asyncio.Event()

    def saw(self, swarm_state: str | None) -> None:
        """What the agent last learnt of the node's swarm state (None: dockerd is down)."""
        self._swarm_state = swarm_state
        self._seen.set()

    async def run(self) -> None:
        """Beat every `heartbeat_seconds` from the first look at the node, until cancelled."""
        await self._seen.wait()
        interval = self.config.heartbeat_seconds
        while True:
            due = time.monotonic() + pause(interval, random.random())  # noqa: S311 (spread, not secrecy)
            # A beat still unanswered when the next is due is lost: the next one says more.
            failure = await self._beat(goodbye=False, within=interval)
            if failure:
                self.log.once(Topic.HEARTBEAT, Level.WARNING, "heartbeat not delivered: %s; "
                              "sending one every %.0f s meanwhile", failure, interval)
            else:
                self.log.clear(Topic.HEARTBEAT)
            await asyncio.sleep(due - time.monotonic())

    async def goodbye(self) -> None:
        """The last beat, as the agent stops."""
        failure = await self._beat(goodbye=True, within=GOODBYE_TIMEOUT)
        if failure:
            self.log.warning("goodbye heartbeat not delivered: %s", failure)

    async def _beat(self, *, goodbye: bool, within: float) -> str:
        """Send one beat within `within` seconds if this node is enrolled; why it was not
        delivered, or ""."""
        enrolled = self._enrolled()
        if enrolled is None or self.parts.key.get() is None:
            return ""
        identity, pinned = enrolled
        lock, uptime = lock_state(self._swarm_state), time.monotonic() - self._started

        def signed(nonce: bytes) -> HeartbeatRequest:
            # The key is taken again once the nonce came: the unseal flow drops (and closes)
            # it when the escrow refuses the node, and may have done so meanwhile.
            agent_key = self.parts.key.get()
            if agent_key is None:
                raise AgentError("the agent key cannot be loaded")
            return beat_request(identity, lock, nonce, boot=self._boot, uptime=uptime,
                                interval=self.config.heartbeat_seconds, goodbye=goodbye,
                                agent_key=agent_key)
        try:
            await self.parts.client.heartbeat(signed, pinned, within=within)
        except AgentError as exc:  # unreachable, refused, out of time, or the key is gone
            return exc.message + (f" ({exc.hint})" if exc.hint else "")
        return ""

    def _enrolled(self) -> tuple[NodeIdentity, str] | None:
        """The node's identity and the escrow's pinned deposit key if the agent enrolled it;
        None otherwise, or while its state cannot be read (agent/rotation_watch.py says
        why)."""
        try:
            identity = read_identity(self.config.docker_root)
            enrolled = agent_state.load(self.config.state_path)
        except AgentError:
            return None
        if not enrolled.knows(identity.node_id, identity.cluster_id):
            return None
        return identity, enrolled.deposit_key_sha256
