"""The agent key as the running agent holds it: loaded once, since a token session stays open
for the agent's life, and dropped when the escrow refuses the node, since it may have been
re-enrolled with a new agent key since it was loaded."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec

from agent import keys
from agent.config import AgentConfig
from agent.log import Level, NodeLog, Topic
from escrow.core.errors import EscrowError


class LoadedKey:
    def __init__(self, config: AgentConfig, log: NodeLog) -> None:
        self.config = config
        self.log = log
        self._key: ec.EllipticCurvePrivateKey | None = None

    def get(self) -> ec.EllipticCurvePrivateKey | None:
        """The agent key, or None (said once) while it cannot be loaded."""
        if self._key is None:
            try:
                self._key = keys.load(self.config)
            except EscrowError as exc:
                self.log.once(Topic.AGENT_KEY, Level.ERROR, "%s (%s)", exc.message, exc.hint)
                return None
            self.log.clear(Topic.AGENT_KEY)
        return self._key

    def drop(self) -> None:
        if self._key is not None and self.config.agent_key_pkcs11_module:
            # Loaded by keys.load along with the key; a file key never needs it.
            from agent.token_key import TokenKey  # noqa: PLC0415

            if isinstance(self._key, TokenKey):
                self._key.close()
        self._key = None
