"""While the manager is unlocked: make sure the escrow holds its current unlock key (someone
may have rotated it by hand), and say in the status when it last unlocked and whether the
current key may not be escrowed."""

from __future__ import annotations

import contextlib
import time

from agent import state as agent_state
from agent.deposit import ensure_escrowed, pin_deposit_key
from agent.errors import AgentError, DepositKeyMismatch
from agent.log import Level, Topic
from agent.parts import Parts
from agent.state import AgentState, LastUnlock
from agent.swarm_identity import CERT_DIR, NodeIdentity, kek_version, read_identity


class RotationWatch:
    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self.config = parts.config
        self.log = parts.log
        self._next_check = 0.0
        self._last_unlock: LastUnlock | None = None
        self._not_escrowed = ""  # why the current key may not be escrowed, while it may not

    async def update(self) -> None:
        """Check the key if a check is due, and show the unlocked manager's status."""
        if time.monotonic() >= self._next_check:
            self._next_check = time.monotonic() + await self._check_key()
        last = self._last_unlock
        status = f"unlocked at {last.at} with key version {last.version}" if last else "unlocked"
        if self._not_escrowed:
            status += f"; the current unlock key is NOT escrowed yet ({self._not_escrowed})"
        self.parts.runtime.notifier.status(status + "; watching")

    def unlocked(self, identity: NodeIdentity, last: LastUnlock) -> None:
        """Record an unlock, and check the key at once: the node may already be on a newer
        key (it was down during a rotation, and catches up once unlocked)."""
        self._last_unlock = last
        state = self._load_state()
        if state.knows(identity.node_id, identity.cluster_id):
            state.last_unlock = last
            agent_state.save(self.config.state_path, state)
        self._next_check = 0.0

    def _load_state(self) -> AgentState:
        try:
            return agent_state.load(self.config.state_path)
        except AgentError as exc:
            self.log.once(Topic.STATE, Level.WARNING, "%s; starting from an empty state",
                          exc.message)
            return AgentState()

    async def _check_key(self) -> float:
        """Deposit the manager's current unlock key if the escrow may not hold it. Reading the
        `kek-version:` header is free; the key itself is only fetched when that header moved.
        Returns the seconds until the next check."""
        key_path = self.config.docker_root / CERT_DIR / "swarm-node.key"
        try:
            identity = read_identity(self.config.docker_root)
            kek = kek_version(key_path.read_bytes())
        except (AgentError, OSError):
            return self.config.key_check_seconds
        self.log.about(identity.node_id, identity.cluster_id)
        # Read each time: `unseal-agent enroll` runs in another process and writes it.
        state = self._load_state()
        if self._last_unlock is None:
            self._last_unlock = state.last_unlock
        if not state.knows(identity.node_id, identity.cluster_id):
            self.log.once(Topic.NOT_ENROLLED, Level.WARNING,
                          "this manager is not enrolled with the escrow (no record in %s): run "
                          "`unseal-agent enroll`, or it cannot be unlocked after a restart",
                          self.config.state_path)
            return self.config.key_check_seconds
        self.log.clear(Topic.NOT_ENROLLED)
        # A node enrolled before agents pinned the deposit key pins it now, not only at its
        # next deposit: the sooner, the likelier it is the escrow it enrolled with.
        with contextlib.suppress(AgentError):
            await self._pin_deposit_key(state)
        if kek == state.checked_kek_version:
            return self.config.key_check_seconds
        agent_key = self.parts.key.get()
        if agent_key is None:
            return self.config.key_check_seconds
        try:
            await self._pin_deposit_key(state)
            key = await self.parts.runtime.call(self.parts.docker.unlock_key)
            version, deposited = await ensure_escrowed(self.parts.client, state, agent_key, key)
            del key
        except AgentError as exc:  # escrow or dockerd unreachable, a refusal, a wrong key
            return self._not_deposited(exc)
        self.parts.backoff.reset()
        self.log.clear(Topic.DEPOSIT)
        self.log.clear(Topic.DEPOSIT_KEY)
        self._not_escrowed = ""
        state.checked_kek_version = kek
        agent_state.save(self.config.state_path, state)
        if deposited:
            self.log.info("escrowed the manager's new unlock key as version %d", version,
                          KEY_VERSION=str(version))
        return self.config.key_check_seconds

    def _not_deposited(self, exc: AgentError) -> float:
        """Log why the current key may not be escrowed (once) and put it in the status;
        returns the seconds until the next try."""
        delay = self.parts.backoff.next_delay()
        if isinstance(exc, DepositKeyMismatch):  # nothing was sent; the real escrow may return
            self.log.once(Topic.DEPOSIT_KEY, Level.CRITICAL, "%s; checking again in %.0f s. "
                          "Until then a restart leaves this manager locked (%s)", exc.message,
                          delay, exc.hint)
            self._not_escrowed = (f"the escrow offers deposit key sha256 {exc.offered[:16]}..., "
                                  f"not the pinned {exc.pinned[:16]}...: an impersonator? "
                                  "nothing was sent")
        else:
            self.log.once(Topic.DEPOSIT, Level.ERROR, "the current unlock key may not be "
                          "escrowed (%s); retrying in %.0f s. Until it is, a restart leaves this "
                          "manager locked", exc.message, delay)
            self._not_escrowed = f"{type(exc).__name__}, retrying in {delay:.0f} s"
        return delay

    async def _pin_deposit_key(self, state: AgentState) -> None:
        if await pin_deposit_key(self.parts.client, state, self.config.escrow_deposit_key_sha256):
            agent_state.save(self.config.state_path, state)
            self.log.warning("pinned the escrow's deposit key sha256 %s on first use: this node "
                             "was enrolled before agents pinned it; deposits go only to this key "
                             "from now on", state.deposit_key_sha256)
